"""A run's data: its text read (or a fact world generated, or token shards opened), its
tokenizer trained or loaded, and its held-out rows and QA sets, ready for the Trainer."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from memlayers.data.facts import generate_world, world_paths, write_world
from memlayers.data.packing import pack_documents
from memlayers.data.stream import TokenShards
from memlayers.data.stream import heldout_rows as stream_heldout_rows
from memlayers.data.text import DataError, read_documents, read_qa
from memlayers.data.tokenizer import Tokenizer
from memlayers.train.config import RunConfig
from memlayers.train.run_dir import file_fingerprint

WORLD_QA_SETS = {"recall": "seen", "extraction": "test"}
"""The QA sets a run scores on its generated fact world: set name -> split (sets of empty splits
are left out). The validation split is for tuning: ``data.qa.validation=RUN/data/qa_validation.jsonl``."""


@dataclass
class PreparedData:
    """Tokenised, packed data of a run."""

    tokenizer: Tokenizer
    tokenizer_path: Path
    train_docs: list[list[int]] | None
    """Tokenised training documents (packed afresh every epoch); None when they stream from shards."""
    heldout_rows: torch.Tensor | None
    qa_sets: dict[str, list[dict]]
    """Question/answer pairs of each named QA set (``data.qa``, or the fact world's splits)."""
    files: dict[str, Path | None]
    """The files read: train, heldout, ``qa.<name>`` and tokenizer (what a resume fingerprints)."""
    train_shards: TokenShards | None = None
    """The training split of ``data.shards``, memory-mapped."""


def prepare_data(config: RunConfig, run_dir: Path, write: bool = True, tokenizer_file: Path | None = None) -> PreparedData:
    """Read (or generate) the run's text, train or load its tokenizer, pack sequences.

    With ``write=False`` nothing is written: the fact world and tokenizer already
    in ``run_dir`` are read (another rank prepared them, or the run resumes).
    ``tokenizer_file`` (a resumed checkpoint's) is used in place of any other and
    copied into ``run_dir``.
    """
    data = config.data
    if data.shards is not None:
        return _prepare_shards(config, run_dir, write, tokenizer_file)
    heldout_path, qa_paths = data.heldout, dict(data.qa)
    if data.train is None:
        world_dir = run_dir / "data"
        files = write_world(generate_world(data.facts), world_dir) if write else world_paths(world_dir)
        if not files["train"].is_file():
            raise DataError(
                f"{world_dir} holds no fact world: a resumed run reads the world it generated (never a new one); "
                "copy the run's data/ directory there"
            )
        train_path = files["train"]
        if heldout_path is None and data.facts.heldout_people > 0:
            heldout_path = files["heldout"]
        if not qa_paths:
            qa_paths = {name: files[f"qa_{split}"] for name, split in WORLD_QA_SETS.items()
                        if files[f"qa_{split}"].stat().st_size > 0}
    else:
        train_path = data.train
    documents = read_documents(train_path, field=data.text_field)
    tokenizer = _run_tokenizer(config, run_dir, write, tokenizer_file, documents)
    tokenizer_path = run_dir / "tokenizer.json"

    def pack(docs: list[str]) -> torch.Tensor:
        return pack_documents(tokenizer.encode_batch(docs), data.seq_len, tokenizer.bos_id, tokenizer.eos_id)

    heldout_rows = pack(read_documents(heldout_path, field=data.text_field)) if heldout_path else None
    qa_sets = {name: read_qa(path) for name, path in qa_paths.items()}
    files = {"train": Path(train_path), "heldout": heldout_path and Path(heldout_path),
             **{f"qa.{name}": Path(path) for name, path in qa_paths.items()}, "tokenizer": tokenizer_path}
    return PreparedData(tokenizer, tokenizer_path, tokenizer.encode_batch(documents), heldout_rows, qa_sets, files)


def _run_tokenizer(
    config: RunConfig, run_dir: Path, write: bool, tokenizer_file: Path | None, documents: list[str] | None
) -> Tokenizer:
    """The run's tokenizer: a resumed checkpoint's, the run directory's (``write=False``),
    ``data.tokenizer``, or one trained on ``documents``; saved into ``run_dir``."""
    tokenizer_path = run_dir / "tokenizer.json"
    if tokenizer_file is not None:
        tokenizer = Tokenizer.load(tokenizer_file)
    elif not write:
        tokenizer = Tokenizer.load(tokenizer_path)
    elif config.data.tokenizer is not None:
        tokenizer = Tokenizer.load(config.data.tokenizer)
    else:
        tokenizer = Tokenizer.train(documents, config.data.vocab_size)
    if write:
        tokenizer.save(tokenizer_path)
    elif tokenizer_file is not None:  # the checkpoint's copy, byte for byte
        shutil.copyfile(tokenizer_file, tokenizer_path)
    return tokenizer


MAX_SHARD_HELDOUT_ROWS = 100_000
"""Held-out sequences read from a shard directory when ``train.eval_batches`` is 0 (all)."""


def _prepare_shards(config: RunConfig, run_dir: Path, write: bool, tokenizer_file: Path | None) -> PreparedData:
    """:func:`prepare_data` for ``data.shards``: nothing is tokenised or read in full; the
    tokenizer is the one the shards were written with."""
    data, tcfg = config.data, config.train
    shards = TokenShards(data.shards)
    index_path = shards.directory / "index.json"
    if data.tokenizer is not None and file_fingerprint(data.tokenizer) != file_fingerprint(shards.tokenizer_file):
        raise DataError(f"{data.tokenizer}: not the tokenizer {shards.directory} was written with; "
                        "leave data.tokenizer out (the shards bring theirs) or tokenize again with this one")
    if write and tokenizer_file is None:
        tokenizer_file = shards.tokenizer_file
    tokenizer = _run_tokenizer(config, run_dir, write, tokenizer_file, None)
    heldout_path = data.heldout
    if heldout_path is not None:
        rows = pack_documents(tokenizer.encode_batch(read_documents(heldout_path, field=data.text_field)),
                              data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    elif "heldout" in shards.index["splits"]:
        heldout_path = index_path
        max_rows = tcfg.eval_batches * tcfg.batch_size or MAX_SHARD_HELDOUT_ROWS
        rows = stream_heldout_rows(TokenShards(data.shards, "heldout"), data.seq_len, max_rows)
    else:
        rows = None
    qa_sets = {name: read_qa(path) for name, path in data.qa.items()}
    files = {"train": index_path, "heldout": heldout_path and Path(heldout_path),
             **{f"qa.{name}": Path(path) for name, path in data.qa.items()}, "tokenizer": run_dir / "tokenizer.json"}
    return PreparedData(tokenizer, run_dir / "tokenizer.json", None, rows, qa_sets, files, train_shards=shards)
