"""Writing a corpus as token shards (``memlayers tokenize``), read back by :mod:`memlayers.data.stream`.

Each document is tokenised and framed as ``[bos] + ids + [eos]`` (whichever of
bos/eos the tokenizer has); the framed documents of a split, concatenated, are
its token stream. An output directory holds:

- ``tokenizer.json``: a byte copy of the tokenizer file;
- raw shards ``<split>-<source:05d>-<part:05d>.bin``: little-endian ``uint16``
  (vocabulary <= 65536) or ``uint32`` tokens, no header. A part holds whole
  documents; a new one starts once a part has reached ``shard_tokens`` tokens;
- ``index.json``, written last and atomically: format, dtype, tokenizer, bos/eos
  ids, per split its tokens, documents and shards in stream order (source
  order, then part order), per source its path, bytes, sha256, documents and tokens;
- ``progress.json``: the settings and each finished source, which lets a rerun
  with the same arguments skip the sources finished and unchanged and redo the rest.

A document goes to the ``heldout`` split when a hash of (seed, source index,
document index) falls below ``heldout_fraction``. Tokenising runs in worker
processes whose results are taken in order, so the output is the same bytes
for any number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from memlayers.data.sources import Source, find_sources
from memlayers.data.stream import FORMAT, INDEX, VERSION
from memlayers.data.text import DataError, file_sha256, write_text_atomic
from memlayers.data.tokenizer import FILE_NAME, Tokenizer

PROGRESS = "progress.json"
TRAIN, HELDOUT = "train", "heldout"
DEFAULT_SHARD_TOKENS = 1 << 27
"""Tokens after which a shard part is closed (2**27: 256 MiB of uint16)."""
CHUNK_DOCUMENTS = 1000
"""Documents sent to a worker at a time."""
SHARD_NAME = re.compile(r"^(?:train|heldout)-(\d{5})-\d{5}\.bin$")


def token_dtype(vocab_size: int) -> str:
    """The shard dtype of a vocabulary: ``uint16`` when every id fits (<= 65536 ids), else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, source: int, part: int) -> str:
    """A shard file's name, e.g. ``train-00003-00000.bin``."""
    return f"{split}-{source:05d}-{part:05d}.bin"


def is_heldout(seed: int, source: int, document: int, fraction: float) -> bool:
    """Whether document ``document`` of source ``source`` is held out: a blake2b hash of the three
    numbers, read as a uniform number in [0, 1), falls below ``fraction``."""
    digest = hashlib.blake2b(f"{seed}/{source}/{document}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


class _Encoder:
    """Texts -> framed token ids per split, as ``{split: (tokens (n,) dtype, lengths (docs,) int64)}``."""

    def __init__(self, tokenizer: Tokenizer, dtype: str, seed: int, heldout_fraction: float):
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.seed = seed
        self.heldout_fraction = heldout_fraction

    def __call__(self, texts: list[str], source: int, first: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Encode ``texts``, documents ``first, first + 1, ...`` of source ``source``."""
        tokenizer = self.tokenizer
        ids = tokenizer.encode_batch(texts, bos=tokenizer.bos_id is not None, eos=tokenizer.eos_id is not None)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (docs,)
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))  # (n,)
        if tokens.size and tokens.max() > np.iinfo(self.dtype).max:
            raise DataError(f"token id {tokens.max()} does not fit {self.dtype.name}: the tokenizer's vocabulary "
                            "size is wrong; fix the tokenizer file")
        tokens = tokens.astype(self.dtype)  # (n,)
        if self.heldout_fraction == 0:
            return {TRAIN: (tokens, lengths)}
        held = np.array([is_heldout(self.seed, source, first + i, self.heldout_fraction)
                         for i in range(len(texts))], dtype=bool)  # (docs,)
        held_tokens = np.repeat(held, lengths)  # (n,)
        return {TRAIN: (tokens[~held_tokens], lengths[~held]), HELDOUT: (tokens[held_tokens], lengths[held])}


_WORKER_ENCODER: _Encoder | None = None  # a worker process's encoder, made once by _init_worker


def _init_worker(tokenizer_file: str, dtype: str, seed: int, heldout_fraction: float) -> None:
    """Load the tokenizer once per worker; one thread each, as the workers share the cores. Ctrl-C is
    the parent's to handle: it stops the pool, and a worker finishes its chunk and leaves quietly."""
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = _Encoder(Tokenizer.load(tokenizer_file), dtype, seed, heldout_fraction)


def _encode_in_worker(texts: list[str], source: int, first: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:class:`_Encoder` of the worker process."""
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(texts, source, first)


class _SplitWriter:
    """The shard parts of one split of one source: framed documents appended, a part closed
    once it holds ``shard_tokens`` tokens."""

    def __init__(self, out: Path, split: str, source: int, shard_tokens: int):
        self.out, self.split, self.source, self.shard_tokens = out, split, source, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._tokens = self._documents = 0  # of the open part

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` (n,) their ids one after another, ``lengths`` (docs,) int64."""
        ends = np.cumsum(lengths)  # (docs,) where each document ends in ``tokens``
        done = start = 0  # documents and tokens written
        while done < len(lengths):
            # the first document with which the open part reaches shard_tokens
            last = done + int(np.searchsorted(ends[done:] - start, self.shard_tokens - self._tokens))
            stop = min(last + 1, len(lengths))
            self._append(tokens[start : ends[stop - 1]], stop - done)
            if last < len(lengths):
                self._close_part()
            done, start = stop, int(ends[stop - 1])

    def _append(self, tokens: np.ndarray, documents: int) -> None:
        if self._file is None:
            self._file = open(self.out / shard_name(self.split, self.source, len(self.shards)), "wb")
        self._file.write(tokens.tobytes())
        self._tokens += tokens.size
        self._documents += documents

    def _close_part(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before progress.json calls the source finished
        self._file.close()
        self.shards.append({"file": Path(self._file.name).name, "tokens": self._tokens, "documents": self._documents})
        self._file, self._tokens, self._documents = None, 0, 0

    def finish(self) -> dict[str, Any]:
        """Close the last part; ``{"tokens", "documents", "shards"}`` of this split of the source."""
        if self._file is not None:
            self._close_part()
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards), "shards": self.shards}

    def abandon(self) -> None:
        """Close an open part without recording it (its source is redone by a later run)."""
        if self._file is not None:
            self._file.close()


def _chunks(documents: Iterator[str], size: int) -> Iterator[tuple[list[str], int]]:
    """``(up to size non-empty documents, index of the first)``, in order."""
    first = 0
    non_empty = (doc for doc in documents if doc)
    while texts := list(itertools.islice(non_empty, size)):
        yield texts, first
        first += len(texts)


def _in_order(pool: ProcessPoolExecutor | None, encoder: _Encoder, source: Source, index: int,
              chunks: Iterable[tuple[list[str], int]], ahead: int) -> Iterator[tuple[dict, int]]:
    """``(encoded chunk, source bytes read when it was read)`` for each chunk, in order, with at most
    ``ahead`` chunks in the workers at once (memory bounded, whatever the corpus)."""
    if pool is None:
        for texts, first in chunks:
            yield encoder(texts, index, first), source.bytes_read()
        return
    pending: deque[tuple[Future, int]] = deque()
    for texts, first in chunks:
        pending.append((pool.submit(_encode_in_worker, texts, index, first), source.bytes_read()))
        if len(pending) >= ahead:
            future, read = pending.popleft()
            yield future.result(), read
    while pending:
        future, read = pending.popleft()
        yield future.result(), read


@dataclass
class TokenizeSummary:
    """What :func:`write_shards` did: the index written, and this run's work."""

    index: dict[str, Any]
    out: Path
    seconds: float
    tokens_written: int
    sources_skipped: int

    def line(self) -> str:
        """One line for the terminal."""
        splits = self.index["splits"]
        documents = sum(s["documents"] for s in splits.values())
        tokens = sum(s["tokens"] for s in splits.values())
        shards = sum(len(s["shards"]) for s in splits.values())
        held = f" ({splits[HELDOUT]['tokens']:,} held out)" if HELDOUT in splits else ""
        skipped = f", {self.sources_skipped} unchanged sources skipped" if self.sources_skipped else ""
        rate = self.tokens_written / max(self.seconds, 1e-9)
        return (f"{documents:,} documents, {tokens:,} tokens{held} in {shards} shards ({self.index['dtype']}) "
                f"-> {self.out}; {self.seconds:.1f} s, {rate:,.0f} tokens/s{skipped}")


def write_shards(inputs: list[str | Path], tokenizer: str | Path, out: str | Path, *, text_field: str = "text",
                 workers: int | None = None, heldout_fraction: float = 0.0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0, progress: bool = True,
                 chunk_documents: int = CHUNK_DOCUMENTS) -> TokenizeSummary:
    """Tokenise the documents of ``inputs`` (see :mod:`memlayers.data.sources`) into token shards in ``out``.

    ``workers`` processes tokenise (default ``os.cpu_count()``; 1: in this
    process). Rerun with the same arguments after an interruption, it skips the
    sources finished and unchanged and redoes the rest. Raises
    :class:`DataError` (one line) for bad arguments, inputs, tokenizer, an
    ``out`` written with other settings, or a corpus without documents.
    """
    started = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else workers
    for flag, ok, value, rule in (("--shard-tokens", shard_tokens >= 1, shard_tokens, ">= 1"),
                                  ("--heldout-fraction", 0 <= heldout_fraction < 1, heldout_fraction, "in [0, 1)"),
                                  ("--workers", workers >= 1, workers, ">= 1")):
        if not ok:
            raise DataError(f"{flag} must be {rule}, got {value}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a directory; pass a new directory as --out")
    loaded = Tokenizer.load(tokenizer)
    tokenizer_file = Path(tokenizer) / FILE_NAME if Path(tokenizer).is_dir() else Path(tokenizer)
    sources = find_sources(inputs)
    dtype = token_dtype(loaded.vocab_size)
    settings = {"tokenizer_sha256": file_sha256(tokenizer_file), "dtype": dtype, "text_field": text_field,
                "heldout_fraction": heldout_fraction, "seed": seed}
    finished = _start(out, settings)
    write_text_atomic(out / FILE_NAME, tokenizer_file.read_bytes().decode("utf-8"))  # a byte copy
    splits = (TRAIN, HELDOUT) if heldout_fraction > 0 else (TRAIN,)
    encoder = _Encoder(loaded, dtype, seed, heldout_fraction)
    entries: list[dict[str, Any]] = []
    tokens_written = skipped = 0
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=sum(s.size() for s in sources), unit="B", unit_scale=True,
                                       desc="tokenize", disable=None if progress else True, dynamic_ncols=True))
        pool = None
        for index, source in enumerate(sources):
            size, sha256 = source.size(), source.sha256()
            entry = finished.get(str(index))
            if entry is not None and (entry["path"], entry["bytes"], entry["sha256"]) == (str(source.path), size, sha256):
                entries.append(entry)
                skipped += 1
                bar.update(size)
                continue
            if finished.pop(str(index), None) is not None:  # changed: no longer finished, before its shards go
                _save_progress(out, settings, finished)
            _remove_shards(out, {index}.__contains__)  # of a changed or interrupted source
            if pool is None and workers > 1:
                pool = ProcessPoolExecutor(workers, initializer=_init_worker,
                                           initargs=(str(tokenizer_file), dtype, seed, heldout_fraction))
                stack.callback(pool.shutdown, cancel_futures=True)
            entry = _write_source(out, source, index, sha256, size, splits, encoder, pool, 2 * workers,
                                  text_field, shard_tokens, chunk_documents, bar)
            entries.append(entry)
            tokens_written += entry["tokens"]
            finished[str(index)] = entry
            _save_progress(out, settings, finished)
    if len(finished) > len(sources):  # sources a previous run had beyond the last of this one
        finished = {key: entry for key, entry in finished.items() if int(key) < len(sources)}
        _save_progress(out, settings, finished)
        _remove_shards(out, lambda source: source >= len(sources))
    if not any(entry["documents"] for entry in entries):
        raise DataError(f"{', '.join(map(str, inputs))}: no documents in the corpus; "
                        f"add text (field {text_field!r} of JSONL, parquet and datasets)")
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": loaded.vocab_size,
             "tokenizer": {"file": FILE_NAME, "sha256": settings["tokenizer_sha256"]},
             "bos_id": loaded.bos_id, "eos_id": loaded.eos_id,
             "splits": {split: _split_total(entries, split) for split in splits},
             "sources": [{key: entry[key] for key in ("path", "bytes", "sha256", "documents", "tokens")}
                         for entry in entries],
             "text_field": text_field, "heldout_fraction": heldout_fraction, "seed": seed}
    write_text_atomic(out / INDEX, json.dumps(index, indent=1) + "\n")
    return TokenizeSummary(index, out, time.perf_counter() - started, tokens_written, skipped)


def _write_source(out: Path, source: Source, index: int, sha256: str, size: int, splits: tuple[str, ...],
                  encoder: _Encoder, pool: ProcessPoolExecutor | None, ahead: int, text_field: str,
                  shard_tokens: int, chunk_documents: int, bar: tqdm) -> dict[str, Any]:
    """Tokenise one source into its shards; its progress entry (path, bytes, sha256, totals, splits)."""
    writers = {split: _SplitWriter(out, split, index, shard_tokens) for split in splits}
    done = 0  # of the source's bytes, as the bar has counted them
    try:
        chunks = _chunks(source.documents(text_field), chunk_documents)
        for encoded, read in _in_order(pool, encoder, source, index, chunks, ahead):
            for split, (tokens, lengths) in encoded.items():
                writers[split].write(tokens, lengths)
            bar.update(read - done)
            done = read
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    bar.update(size - done)
    totals = {split: writer.finish() for split, writer in writers.items()}
    return {"path": str(source.path), "bytes": size, "sha256": sha256,
            "documents": sum(t["documents"] for t in totals.values()),
            "tokens": sum(t["tokens"] for t in totals.values()), "splits": totals}


def _split_total(entries: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """A split of the index: its tokens, documents and shards over all sources, in stream order."""
    parts = [entry["splits"][split] for entry in entries]
    return {"tokens": sum(p["tokens"] for p in parts), "documents": sum(p["documents"] for p in parts),
            "shards": [shard for p in parts for shard in p["shards"]]}


def _start(out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Prepare ``out`` for a run; the sources a previous run finished there, by index.

    Refuses an ``out`` written with other settings, or a non-empty one that no run wrote. Removes
    the index (it is written again at the end) and the shards of sources not finished.
    """
    progress_file = out / PROGRESS
    finished: dict[str, dict[str, Any]] = {}
    if progress_file.is_file():
        try:
            saved = json.loads(progress_file.read_text(encoding="utf-8"))
            before, finished = saved["settings"], saved["sources"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{progress_file}: unreadable ({type(error).__name__}); use a new --out or "
                            f"delete {out}") from None
        changed = [f"{key} {before.get(key)!r}, now {value!r}" for key, value in settings.items()
                   if before.get(key) != value]
        if changed:
            raise DataError(f"{out}: written with other settings ({'; '.join(changed)}); use a new --out "
                            f"or delete {out} to start again")
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: not empty and not written by `memlayers tokenize` (no {PROGRESS}); "
                        "pass a new or empty directory as --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    _remove_shards(out, lambda source: str(source) not in finished)  # of a source interrupted last time
    _save_progress(out, settings, finished)
    return finished


def _remove_shards(out: Path, remove: Callable[[int], bool]) -> None:
    """Delete the shard files in ``out`` of each source index for which ``remove`` is true."""
    for shard in out.glob("*.bin"):
        match = SHARD_NAME.match(shard.name)
        if match and remove(int(match.group(1))):
            shard.unlink()


def _save_progress(out: Path, settings: dict[str, Any], finished: dict[str, dict[str, Any]]) -> None:
    """Write ``progress.json`` atomically: the settings and each finished source's entry."""
    by_index = dict(sorted(finished.items(), key=lambda item: int(item[0])))  # the same file however it was reached
    write_text_atomic(out / PROGRESS, json.dumps({"format": f"{FORMAT}-progress", "version": VERSION,
                                                  "settings": settings, "sources": by_index}) + "\n")
