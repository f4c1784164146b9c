"""Usage statistics: slots read, coverage over a window, KL from uniform."""

import math

import pytest
import torch

from memlayers.memory import MemoryConfig, MemoryLayer, UsageTracker


def test_batch_counts_and_coverage():
    tracker = UsageTracker(n_slots=10, window=2)
    stats = tracker.update(torch.tensor([[0, 1, 1], [1, 2, 2]]))
    assert stats["batch_slots"] == 3
    assert stats["batch_fraction"] == pytest.approx(0.3)
    assert stats["coverage"] == pytest.approx(0.3)
    stats = tracker.update(torch.tensor([5, 6]))
    assert stats["coverage"] == pytest.approx(0.5)
    # the third batch pushes the first out of the window of 2
    stats = tracker.update(torch.tensor([9]))
    assert stats["coverage"] == pytest.approx(0.3)
    assert tracker.counts.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 1]


def test_kl_from_uniform():
    n = 8
    tracker = UsageTracker(n_slots=n, window=5)
    assert tracker.update(torch.arange(n).repeat(3))["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    tracker.reset()
    assert tracker.update(torch.full((50,), 3))["kl_uniform"] == pytest.approx(math.log(n))
    tracker.reset()
    # p = (1/2, 1/4, 1/4): KL = sum p log(p n)
    stats = tracker.update(torch.tensor([0, 0, 1, 2]))
    expected = 0.5 * math.log(0.5 * n) + 2 * 0.25 * math.log(0.25 * n)
    assert stats["kl_uniform"] == pytest.approx(expected)


def test_out_of_range_index_is_an_error():
    tracker = UsageTracker(n_slots=4)
    with pytest.raises(ValueError, match="out of range"):
        tracker.update(torch.tensor([0, 4]))


def test_layer_records_the_slots_it_reads():
    torch.manual_seed(0)
    layer = MemoryLayer(16, MemoryConfig(n_keys=8, heads=2, knn=3, k_dim=8))
    tracker = layer.track_usage(window=10)
    x = torch.randn(2, 5, 16)
    layer(x)
    _, indices = layer.lookup(x)
    assert tracker.counts.sum() == indices.numel()
    assert torch.equal(tracker.counts, torch.bincount(indices.flatten(), minlength=64))
