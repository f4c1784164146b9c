"""Sparse memory finetuning: the TF-IDF ranking, and a step that changes only the chosen rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from memlayers.continual.slot_stats import collect_slot_stats, memory_layout
from memlayers.continual.sparse import RowSelector, sparse_step, train_values_only
from memlayers.train.row_optim import RowAdamW, RowSGD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slot_stats import _batches, _model  # noqa: E402


def _hand_counts(model, batch) -> dict[str, list[int]]:
    """Per value table, a hand count of the batch's reads of each row."""
    layout = memory_layout(model)
    seen = []
    hooks = [layer.search.register_forward_hook(lambda m, i, out, table=table: seen.append((table, out[1])))
             for layer, table in layout.values()]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    counts = {table: [0] * layer.config.n_slots for layer, table in layout.values()}
    for table, indices in seen:
        for slot in indices.reshape(-1).tolist():
            counts[table][slot] += 1
    return counts


def _hand_tfidf(model, background, batch) -> dict[str, torch.Tensor]:
    """TF-IDF per table row from a hand count of the batch's reads and the smoothed idf formula."""
    scores = {}
    for table, tf in _hand_counts(model, batch).items():
        idf = [math.log((1 + background.n_batches) / (1 + int(df))) + 1 for df in background.batches[table]]
        scores[table] = torch.tensor([f * i for f, i in zip(tf, idf, strict=True)], dtype=torch.float64)
    return scores


def test_kl_ranking_equals_a_hand_computation():
    model = _model()
    background = collect_slot_stats(model, _batches(6, seed=2), progress=False)
    (batch,) = _batches(1, seed=9)
    selector = RowSelector(model, background, top_t=5, ranking="kl")
    with torch.no_grad(), selector:
        model(batch)
    for table, tf in _hand_counts(model, batch).items():
        reads = [int(r) + 1 for r in background.table_reads(table)]  # add-one smoothed background reads
        hand = torch.tensor([f / sum(tf) * math.log((f / sum(tf)) / (r / sum(reads))) if f else 0.0
                             for f, r in zip(tf, reads, strict=True)], dtype=torch.float64)
        assert torch.allclose(selector.scores(table).double(), hand, rtol=1e-5, atol=1e-7)
        rows = selector.select()[table]
        others = torch.ones_like(hand, dtype=torch.bool)
        others[rows] = False
        assert rows.numel() == 5 and hand[rows].min() >= hand[others].max()
    with pytest.raises(ValueError, match="ranking must be one of"):
        RowSelector(model, background, top_t=5, ranking="entropy")


@pytest.mark.parametrize("shared", [True, False])
def test_tfidf_ranking_equals_a_hand_computation(shared):
    model = _model(shared)
    background = collect_slot_stats(model, _batches(6, seed=2), progress=False)
    (batch,) = _batches(1, seed=9)
    selector = RowSelector(model, background, top_t=7)
    with torch.no_grad(), selector:
        model(batch)
    expected = _hand_tfidf(model, background, batch)
    scores = {table: selector.scores(table).double() for table in expected}
    chosen = selector.select()
    assert set(chosen) == set(expected)
    for table, hand in expected.items():
        assert torch.allclose(scores[table], hand, rtol=1e-6)
        rows = chosen[table]
        assert rows.numel() == min(7, int((hand > 0).sum())) and torch.equal(rows, rows.sort().values)
        others = torch.ones_like(hand, dtype=torch.bool)
        others[rows] = False
        assert hand[rows].min() >= hand[others].max()  # no unchosen row outranks a chosen one
        assert (hand[rows] > 0).all()
    assert all(float(selector.tf[t].sum()) == 0 for t in selector.tf)  # cleared for the next batch


@pytest.mark.parametrize("optimizer", [RowSGD, RowAdamW])
def test_a_step_changes_only_the_chosen_rows(optimizer):
    model = _model().train()
    background = collect_slot_stats(model, _batches(6, seed=2), progress=False)
    tables = train_values_only(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    (batch,) = _batches(1, seed=5)
    loss, chosen = sparse_step(model, RowSelector(model, background, top_t=4),
                               optimizer(list(tables.values()), lr=0.5), batch[:, :-1], batch[:, 1:])
    assert loss > 0
    for name, p in model.named_parameters():
        if name not in tables:
            assert torch.equal(p, before[name]), name  # bit-identical
            continue
        changed = (p != before[name]).any(1).nonzero().squeeze(1)
        assert 0 < changed.numel() <= 4
        assert set(changed.tolist()) <= set(chosen[name].tolist())


def test_a_bad_top_t_or_other_statistics_are_refused():
    model = _model()
    background = collect_slot_stats(model, _batches(2), progress=False)
    with pytest.raises(ValueError, match="top_t must be >= 1"):
        RowSelector(model, background, top_t=0)
    with pytest.raises(ValueError, match="collect them for this model"):
        RowSelector(_model(shared=False), background, top_t=3)
