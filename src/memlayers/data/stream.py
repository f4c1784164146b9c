"""Streaming training data: batches read from memory-mapped token shards.

``memlayers tokenize`` writes a corpus as raw token shards plus an
``index.json`` (format ``memlayers-token-shards``, version 1; see
:mod:`memlayers.data.shards_write`). Here a split of such a directory is one
token stream (its shards concatenated in index order), memory-mapped so that
nothing is read before it is used: start-up reads the index, and resident
memory holds only the pages of the windows a run has read.

The stream is cut into windows exactly as :func:`memlayers.data.packing.pack_documents`
cuts a packed corpus: window ``w`` is tokens ``[w * L, w * L + L + 1)``, inputs
its first ``L`` and targets its last ``L``. Each epoch visits the windows in a
seeded pseudo-random order that costs no memory: a Feistel permutation of the
window ids (keyed by seed and epoch), so the order of a 100B-token corpus is as
cheap as that of a small one. A global batch is ``batch_size * world`` windows;
rank ``r`` reads only its own ``batch_size`` of them, so ranks read disjoint
data. ``state_dict()`` (epoch, windows consumed) resumes at the exact token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memlayers.data.text import DataError

FORMAT, VERSION = "memlayers-token-shards", 1
"""The index's format tag and version, as :mod:`memlayers.data.shards_write` writes them."""
INDEX = "index.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass
class Shard:
    """One shard file of a split: its path, token count and where it starts in the stream."""

    path: Path
    tokens: int
    start: int


def read_index(directory: str | Path) -> dict:
    """The checked ``index.json`` of a shard directory (raises :class:`DataError` naming what is wrong)."""
    directory = Path(directory)
    path = directory / INDEX
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of token shards; write one with `memlayers tokenize`")
    if not path.is_file():
        raise DataError(f"{path}: missing (an unfinished `memlayers tokenize`?); run it again to finish the shards")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); run `memlayers tokenize` again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a memlayers token-shard index (format {FORMAT!r} expected)")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: shard format version {index.get('version')!r}; this memlayers reads version {VERSION}")
    if index.get("dtype") not in DTYPES:
        raise DataError(f"{path}: dtype {index.get('dtype')!r}; expected one of {sorted(DTYPES)}")
    if not isinstance(index.get("splits"), dict) or "train" not in index["splits"]:
        raise DataError(f"{path}: no 'train' split; run `memlayers tokenize` again")
    return index


class TokenShards:
    """One split of a shard directory as a memory-mapped token stream.

    ``len(shards)`` is the number of tokens; ``shards.read(start, length)``
    returns tokens ``[start, start + length)`` as int64, across shard boundaries.
    Every shard file's size is checked against the index when opened.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        if split not in self.index["splits"]:
            raise DataError(f"{self.directory}: no {split!r} split (it has {', '.join(self.index['splits'])})")
        self.split = split
        self.dtype = DTYPES[self.index["dtype"]]
        self.shards: list[Shard] = []
        start = 0
        for entry in self.index["splits"][split]["shards"]:
            path = self.directory / entry["file"]
            expected = int(entry["tokens"]) * np.dtype(self.dtype).itemsize
            if not path.is_file():
                raise DataError(f"{path}: shard listed in the index is missing; run `memlayers tokenize` again")
            if path.stat().st_size != expected:
                raise DataError(f"{path}: {path.stat().st_size} bytes, the index says {expected}; "
                                "the shard is truncated or changed: run `memlayers tokenize` again")
            self.shards.append(Shard(path, int(entry["tokens"]), start))
            start += int(entry["tokens"])
        self.n_tokens = start
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)  # (n_shards,)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer the shards were written with (a copy kept in the directory)."""
        return self.directory / self.index["tokenizer"]["file"]

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:  # opened on first use: start-up touches no shard
            self._maps[i] = np.memmap(self.shards[i].path, dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, ``(length,)`` int64."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.n_tokens}")
        out = np.empty(length, dtype=np.int64)  # (length,)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            shard = self.shards[i]
            offset = start + done - shard.start
            take = min(length - done, shard.tokens - offset)
            out[done : done + take] = self._map(i)[offset : offset + take]
            done += take
            i += 1
        return out


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit hash of ``x`` and ``key`` (splitmix64's finaliser), elementwise."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class WindowOrder:
    """A seeded permutation of ``[0, n)`` that is computed, not stored: a 4-round Feistel
    network on ``2 * half`` bits (the smallest even width >= log2 n), with cycle walking
    for values that land past ``n``."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, (max(1, int(n - 1).bit_length()) + 1) // 2)
        digest = hashlib.blake2b(f"{seed}".encode(), digest_size=8 * self.ROUNDS).digest()
        self.keys = [int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(self.ROUNDS)]

    def _once(self, x: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> np.uint64(self.half), x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The window ids at ``positions`` (each in ``[0, n)``) of this order, int64."""
        x = self._once(positions.astype(np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():  # a bijection of [0, 2^(2 half)) walked until it re-enters [0, n)
            x[outside] = self._once(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class ShardBatches:
    """Endless ``(inputs, targets)`` batches, each ``(batch_size, L)``, of this rank's windows.

    Every epoch has ``windows // (batch_size * world)`` steps (the remainder is
    skipped that epoch and comes back in another order in the next). Same
    protocol as :class:`memlayers.data.packing.BatchIterator`: ``epoch``,
    ``state_dict()`` (``{"epoch", "position"}``, position = windows of the epoch
    consumed by all ranks together) and ``load_state_dict``; unlike it, each
    rank's batch is already its own slice (``rank_local``).
    """

    rank_local = True

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"need seq_len, batch_size >= 1 and 0 <= rank < world, got {seq_len}, {batch_size}, {rank}, {world}")
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.rank, self.world = rank, world
        self.windows = (len(shards) - 1) // seq_len
        self.global_batch = batch_size * world
        if self.windows < self.global_batch:
            raise DataError(
                f"{shards.directory} ({shards.split}): {len(shards)} tokens make {self.windows} sequences of "
                f"seq_len={seq_len}, fewer than one global batch of {self.global_batch}; add text or lower "
                "seq_len or the batch size"
            )
        self._epoch, self._position = 0, 0
        self._order: WindowOrder | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (= number of completed epochs)."""
        return self._epoch

    def _window_order(self) -> WindowOrder:
        if self._order is None:
            self._order = WindowOrder(self.windows, self.seed * 1_000_003 + self._epoch)
        return self._order

    def window_ids(self) -> np.ndarray:
        """The window ids of this rank's next batch, ``(batch_size,)``."""
        first = self._position + self.rank * self.batch_size
        return self._window_order()(np.arange(first, first + self.batch_size))

    def __iter__(self) -> ShardBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        rows = np.stack([self.shards.read(int(w) * L, L + 1) for w in self.window_ids()])  # (B, L + 1)
        self._position += self.global_batch
        if self._position + self.global_batch > self.windows:  # no full global batch left: next epoch
            self._epoch, self._position, self._order = self._epoch + 1, 0, None
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, L), (B, L)

    def state_dict(self) -> dict[str, int]:
        """Where the iterator stands: ``{"epoch": int, "position": int}``."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a ``state_dict()`` of batches over the same shards, seed, seq_len and global batch."""
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position <= self.windows):
            raise ValueError(f"shard batch state must be {{'epoch': int >= 0, 'position': 0..{self.windows}}}, got {state!r}")
        self._epoch, self._position, self._order = epoch, position, None
        if self._position + self.global_batch > self.windows:
            self._epoch, self._position = self._epoch + 1, 0


def heldout_rows(shards: TokenShards, seq_len: int, max_rows: int) -> torch.Tensor:
    """The first ``max_rows`` windows of a split in stream order, ``(n, L + 1)`` (for evaluation)."""
    n = min(max_rows, (len(shards) - 1) // seq_len)
    if n < 1:
        raise DataError(f"{shards.directory} ({shards.split}): {len(shards)} tokens, fewer than one sequence of "
                        f"seq_len={seq_len}; add text or lower seq_len")
    flat = torch.from_numpy(shards.read(0, n * seq_len + 1))  # (n * L + 1,)
    return flat.unfold(0, seq_len + 1, seq_len).clone()  # (n, L + 1)
