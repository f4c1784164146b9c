"""Usage statistics: slots read since the last read-out, coverage, KL from uniform, no host sync."""

import math

import pytest
import torch

from memlayers.memory import MemoryConfig, MemoryLayer, UsageTracker


def test_counts_accumulate_until_read():
    tracker = UsageTracker(n_slots=10)
    tracker.update(torch.tensor([[0, 1, 1], [1, 2, 2]]))
    tracker.update(torch.tensor([5, 6]))
    assert tracker.counts.tolist() == [1, 3, 2, 0, 0, 1, 1, 0, 0, 0] and tracker.batches == 2
    assert tracker.read()["coverage"] == pytest.approx(0.5)
    # reading starts a new window
    tracker.update(torch.tensor([9]))
    assert tracker.stats()["coverage"] == pytest.approx(0.1) and tracker.batches == 1
    assert tracker.counts.tolist() == [0] * 9 + [1]


def test_kl_from_uniform():
    n = 8
    tracker = UsageTracker(n_slots=n)
    tracker.update(torch.arange(n).repeat(3))
    assert tracker.read()["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    tracker.update(torch.full((50,), 3))
    assert tracker.read()["kl_uniform"] == pytest.approx(math.log(n))
    # p = (1/2, 1/4, 1/4): KL = sum p log(p n)
    tracker.update(torch.tensor([0, 0, 1, 2]))
    expected = 0.5 * math.log(0.5 * n) + 2 * 0.25 * math.log(0.25 * n)
    assert tracker.read()["kl_uniform"] == pytest.approx(expected)


def test_an_update_never_reads_the_device():
    # a meta tensor has no data: anything that copies a value to the host (unique's size,
    # a bounds check, .item()) raises on it, so an update that runs here cannot sync
    tracker = UsageTracker(n_slots=1 << 16, device="meta")
    tracker.update(torch.empty(4, 32, 4, 32, dtype=torch.long, device="meta"))
    assert tracker.batches == 1 and tracker.counts.device.type == "meta"


def test_layer_records_the_slots_it_reads():
    torch.manual_seed(0)
    layer = MemoryLayer(16, MemoryConfig(n_keys=8, heads=2, knn=3, k_dim=8))
    tracker = layer.track_usage()
    x = torch.randn(2, 5, 16)
    layer(x)
    _, indices = layer.lookup(x)
    assert tracker.counts.sum() == indices.numel()
    assert torch.equal(tracker.counts, torch.bincount(indices.flatten(), minlength=64))
    layer.eval()
    layer(x)  # evaluation reads are not counted
    assert tracker.batches == 1
