"""Streaming batches from token shards: the stream across shard files, the window order,
disjoint ranks, exact resume, and the errors of a bad shard directory."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memlayers.data.stream import ShardBatches, TokenShards, WindowOrder, heldout_rows, read_index
from memlayers.data.text import DataError


def write_shards(directory: Path, parts: list[np.ndarray], dtype: str = "uint16", heldout: list[np.ndarray] = ()) -> Path:
    """A shard directory in the format ``memlayers tokenize`` writes (index.json + raw parts)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text("{}")
    splits = {}
    for split, arrays in (("train", parts), ("heldout", heldout)):
        if not arrays:
            continue
        entries = []
        for i, tokens in enumerate(arrays):
            name = f"{split}-00000-{i:05d}.bin"
            tokens.astype(dtype).tofile(directory / name)
            entries.append({"file": name, "tokens": int(tokens.size), "documents": 1})
        splits[split] = {"tokens": sum(e["tokens"] for e in entries), "documents": len(entries), "shards": entries}
    index = {"format": "memlayers-token-shards", "version": 1, "dtype": dtype, "vocab_size": 5000,
             "tokenizer": {"file": "tokenizer.json", "sha256": "0"}, "bos_id": None, "eos_id": None,
             "splits": splits, "sources": []}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture
def stream(tmp_path):
    """A 1,000-token stream 0..999 in three shards of uneven size."""
    tokens = np.arange(1000)
    write_shards(tmp_path / "shards", [tokens[:300], tokens[300:301], tokens[301:]])
    return tmp_path / "shards", tokens


def test_reads_across_shard_boundaries(stream):
    directory, tokens = stream
    shards = TokenShards(directory)
    assert len(shards) == 1000
    for start, length in ((0, 1000), (295, 10), (299, 3), (300, 1), (998, 2), (500, 0)):
        assert np.array_equal(shards.read(start, length), tokens[start : start + length])
    with pytest.raises(IndexError):
        shards.read(995, 10)


def test_uint32_shards(tmp_path):
    tokens = np.array([0, 70_000, 2**32 - 1, 5])
    shards = TokenShards(write_shards(tmp_path / "s", [tokens], dtype="uint32"))
    assert shards.read(0, 4).tolist() == tokens.tolist()


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_window_order_is_a_seeded_permutation(n):
    order = WindowOrder(n, seed=3)
    ids = order(np.arange(n))
    assert sorted(ids.tolist()) == list(range(n))
    assert np.array_equal(ids, WindowOrder(n, seed=3)(np.arange(n)))
    if n >= 7:
        assert not np.array_equal(ids, WindowOrder(n, seed=4)(np.arange(n)))
        assert not np.array_equal(ids, np.arange(n))


def test_batches_are_the_stream_windows_each_once_per_epoch(stream):
    directory, tokens = stream
    L, B = 10, 4  # 99 windows: 24 steps an epoch, 3 windows left over
    batches = ShardBatches(TokenShards(directory), L, B, seed=0)
    seen = []
    for _ in range(24):
        inputs, targets = next(batches)
        assert inputs.shape == targets.shape == (B, L) and inputs.dtype == torch.long
        for row_in, row_t in zip(inputs, targets, strict=True):
            w = int(row_in[0]) // L  # the stream is 0..999, so a window starts at w * L
            assert row_in.tolist() == tokens[w * L : w * L + L].tolist()
            assert row_t.tolist() == tokens[w * L + 1 : w * L + L + 1].tolist()
            seen.append(w)
    assert len(set(seen)) == len(seen) == 96 and batches.epoch == 1
    second = [int(x) // L for _ in range(24) for x in next(batches)[0][:, 0]]
    assert second != seen  # a fresh order every epoch


def test_ranks_read_disjoint_parts_of_the_same_global_batch(stream):
    directory, _ = stream
    shards = TokenShards(directory)
    one = ShardBatches(shards, 10, 6, seed=1)
    ranks = [ShardBatches(shards, 10, 3, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(20):  # across an epoch boundary (16 steps an epoch)
        whole = next(one)[0]
        parts = [next(r)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)


def test_resume_continues_with_the_same_batches(stream):
    directory, _ = stream
    shards = TokenShards(directory)
    straight = ShardBatches(shards, 10, 4, seed=2)
    expected = [next(straight) for _ in range(30)]
    first = ShardBatches(shards, 10, 4, seed=2)
    for _ in range(17):
        next(first)
    resumed = ShardBatches(TokenShards(directory), 10, 4, seed=2)
    resumed.load_state_dict(first.state_dict())
    for inputs, targets in expected[17:]:
        got = next(resumed)
        assert torch.equal(got[0], inputs) and torch.equal(got[1], targets)
    with pytest.raises(ValueError, match="shard batch state"):
        resumed.load_state_dict({"epoch": 0, "position": 10_000})


def test_heldout_rows_are_the_first_windows(tmp_path):
    tokens = np.arange(100)
    directory = write_shards(tmp_path / "s", [tokens], heldout=[np.arange(500, 530), np.arange(530, 560)])
    rows = heldout_rows(TokenShards(directory, "heldout"), 8, max_rows=5)
    assert rows.shape == (5, 9)
    assert rows[4].tolist() == list(range(532, 541))  # across the two heldout shards
    assert heldout_rows(TokenShards(directory, "heldout"), 8, max_rows=100).shape == (7, 9)


def test_bad_shard_directories_are_named(tmp_path, stream):
    directory, _ = stream
    with pytest.raises(DataError, match="not a directory of token shards"):
        read_index(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="index.json: missing"):
        read_index(tmp_path / "empty")
    index_path = directory / "index.json"
    good = index_path.read_text()
    index_path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenShards(directory)
    index_path.write_text(json.dumps({**json.loads(good), "version": 9}))
    with pytest.raises(DataError, match="version 9"):
        TokenShards(directory)
    index_path.write_text(good)
    with pytest.raises(DataError, match="no 'heldout' split"):
        TokenShards(directory, "heldout")
    part = directory / "train-00000-00002.bin"
    part.write_bytes(part.read_bytes()[:-2])  # one token short
    with pytest.raises(DataError, match="truncated or changed"):
        TokenShards(directory)
    part.unlink()
    with pytest.raises(DataError, match="is missing"):
        TokenShards(directory)


def test_too_small_a_stream_for_one_global_batch(stream):
    directory, _ = stream
    with pytest.raises(DataError, match="fewer than one global batch of 128"):
        ShardBatches(TokenShards(directory), 10, 64, seed=0, rank=1, world=2)
