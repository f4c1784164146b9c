"""Sparse memory finetuning: the TF-IDF ranking, and a step that changes only the chosen rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from memlayers.continual.slot_stats import collect_slot_stats, memory_layout
from memlayers.continual.sparse import TfidfSelector, sparse_step, train_values_only
from memlayers.train.row_optim import RowAdamW, RowSGD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slot_stats import _batches, _model  # noqa: E402


def _hand_tfidf(model, background, batch) -> dict[str, torch.Tensor]:
    """TF-IDF per table row from a hand count of the batch's reads and the smoothed idf formula."""
    layout = memory_layout(model)
    seen = []
    hooks = [layer.search.register_forward_hook(lambda m, i, out, table=table: seen.append((table, out[1])))
             for layer, table in layout.values()]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    scores = {}
    for table, count in background.batches.items():
        tf = [0] * count.numel()
        for t, indices in seen:
            if t == table:
                for slot in indices.reshape(-1).tolist():
                    tf[slot] += 1
        idf = [torch.log(torch.tensor((1 + background.n_batches) / (1 + int(df)), dtype=torch.float64)).item() + 1
               for df in count]
        scores[table] = torch.tensor([f * i for f, i in zip(tf, idf, strict=True)], dtype=torch.float64)
    return scores


@pytest.mark.parametrize("shared", [True, False])
def test_tfidf_ranking_equals_a_hand_computation(shared):
    model = _model(shared)
    background = collect_slot_stats(model, _batches(6, seed=2), progress=False)
    (batch,) = _batches(1, seed=9)
    selector = TfidfSelector(model, background, top_t=7)
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
    loss, chosen = sparse_step(model, TfidfSelector(model, background, top_t=4),
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
        TfidfSelector(model, background, top_t=0)
    with pytest.raises(ValueError, match="collect them for this model"):
        TfidfSelector(_model(shared=False), background, top_t=3)
