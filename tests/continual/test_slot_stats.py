"""Slot statistics: counts equal a hand count, add over data, round-trip through safetensors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from memlayers.continual.slot_stats import (
    SlotStats,
    SlotStatsCollector,
    SlotStatsError,
    memory_layout,
)
from memlayers.memory.usage import kl_from_uniform
from memlayers.model.transformer import Transformer


def _model_tests_helpers():
    """tests/model/conftest.py under a name of its own: importing it as ``conftest`` would shadow
    the ``conftest`` that other test modules import from tests/train."""
    path = Path(__file__).resolve().parents[1] / "model" / "conftest.py"
    spec = importlib.util.spec_from_file_location("memlayers_tests_model_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tiny_config = _model_tests_helpers().make_tiny_config


def _model(shared: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = make_tiny_config(n_layers=3, memory_layers=(0, 2), memory={"shared_values": shared, "n_keys": 5})
    return Transformer(config).eval()


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 37, (2, 7), generator=generator) for _ in range(n)]


def _collect(model: Transformer, batches: list[torch.Tensor]) -> SlotStats:
    with torch.no_grad(), SlotStatsCollector(model) as collector:
        for batch in batches:
            model(batch)
            collector.end_batch(batch.numel())
    return collector.stats


def _hand_count(model: Transformer, batches: list[torch.Tensor]) -> tuple[dict, dict]:
    """Reads per (layer, head, slot) and batches per (table, slot), from each layer's own lookup."""
    layout = memory_layout(model)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layout}
    hooks = [layer.search.register_forward_hook(lambda m, i, out, name=name: seen[name].append(out[1]))
             for name, (layer, _) in layout.items()]
    reads = {name: torch.zeros(layer.config.heads, layer.config.n_slots, dtype=torch.long)
             for name, (layer, _) in layout.items()}
    batches_read: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            for name in seen:
                seen[name].clear()
            model(batch)
            in_batch: dict[str, set[int]] = {}
            for name, (layer, table) in layout.items():
                (indices,) = seen[name]  # (batch, seq, heads, knn)
                for head in range(indices.shape[-2]):
                    for slot in indices[..., head, :].reshape(-1).tolist():
                        reads[name][head, slot] += 1
                in_batch.setdefault(table, set()).update(indices.reshape(-1).tolist())
                batches_read.setdefault(table, torch.zeros(layer.config.n_slots, dtype=torch.long))
            for table, slots in in_batch.items():
                batches_read[table][sorted(slots)] += 1
    for hook in hooks:
        hook.remove()
    return reads, batches_read


@pytest.mark.parametrize("shared", [True, False])
def test_counts_equal_a_hand_count(shared):
    model, batches = _model(shared), _batches(4)
    stats = _collect(model, batches)
    reads, batches_read = _hand_count(model, batches)
    assert stats.tables == {name: table for name, (_, table) in memory_layout(model).items()}
    assert len(set(stats.tables.values())) == (1 if shared else 2)
    assert {k: v.tolist() for k, v in stats.reads.items()} == {k: v.tolist() for k, v in reads.items()}
    assert {k: v.tolist() for k, v in stats.batches.items()} == {k: v.tolist() for k, v in batches_read.items()}
    assert stats.n_batches == 4 and stats.n_tokens == 4 * 14
    config = model.config.memory
    for name in stats.reads:  # every token reads knn slots per head
        assert int(stats.reads[name].sum()) == 4 * 14 * config.heads * config.knn
    assert int(max(v.max() for v in stats.batches.values())) <= 4
    # a shared table's row is in a batch when either layer read it: never more than the batches, at
    # least as often as each layer alone
    if shared:
        (table,) = stats.batches
        assert torch.equal(stats.table_reads(table), sum(r.sum(0) for r in stats.reads.values()))


def test_statistics_add_over_data():
    model, batches = _model(), _batches(5)
    whole = _collect(model, batches)
    parts = _collect(model, batches[:2]).add(_collect(model, batches[2:]))
    assert parts.n_batches == whole.n_batches and parts.n_tokens == whole.n_tokens
    for name in whole.reads:
        assert torch.equal(parts.reads[name], whole.reads[name])
    for table in whole.batches:
        assert torch.equal(parts.batches[table], whole.batches[table])
    with pytest.raises(SlotStatsError, match="different memory layouts"):
        whole.add(_collect(_model(shared=False), batches[:1]))


def test_idf_is_the_smoothed_formula():
    model = _model()
    stats = _collect(model, _batches(3))
    (table,) = stats.batches
    df = stats.batches[table]
    for slot in (int(df.argmax()), int(df.argmin())):
        assert stats.idf(table)[slot].item() == pytest.approx(math.log(4 / (1 + int(df[slot]))) + 1)
    assert stats.idf(table).min() >= 1.0  # a row every batch read still weighs 1


def test_round_trip_and_clear_errors(tmp_path):
    model = _model()
    stats = _collect(model, _batches(3))
    stats.metadata["data"] = "background.jsonl"
    path = stats.save(tmp_path / "stats.safetensors")
    back = SlotStats.load(path)
    assert back.tables == stats.tables and back.metadata == {"data": "background.jsonl"}
    assert (back.n_batches, back.n_tokens) == (stats.n_batches, stats.n_tokens)
    assert all(torch.equal(back.reads[k], stats.reads[k]) for k in stats.reads)
    assert all(torch.equal(back.batches[k], stats.batches[k]) for k in stats.batches)
    back.check_model(model)
    with pytest.raises(SlotStatsError, match="collect them for this model"):
        back.check_model(_model(shared=False))
    with pytest.raises(SlotStatsError, match="not found"):
        SlotStats.load(tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SlotStatsError, match="unreadable"):
        SlotStats.load(cut)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(SlotStatsError, match="not a memlayers slot statistics file"):
        SlotStats.load(tmp_path / "other.safetensors")


def test_a_model_without_memory_is_refused():
    with pytest.raises(ValueError, match="no memory layers"):
        SlotStatsCollector(Transformer(make_tiny_config()))


def test_kl_from_uniform():
    assert kl_from_uniform(torch.full((8,), 3)) == pytest.approx(0.0)
    assert kl_from_uniform(torch.tensor([0, 5, 0, 0])) == pytest.approx(math.log(4))
    assert kl_from_uniform(torch.zeros(4, dtype=torch.long)) == 0.0
    assert 0 < kl_from_uniform(torch.tensor([1, 2, 3, 4])) < math.log(4)
