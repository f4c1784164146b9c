"""evaluate_perplexity(): NLL against a naive per-row loop, exp, modes, no MoE aux loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlayers.eval import evaluate_perplexity
from memlayers.model import ModelConfig, MoEConfig, Transformer

VOCAB = 40


def _model(**overrides) -> Transformer:
    """A tiny random float64 Transformer."""
    torch.manual_seed(0)
    fields = dict(
        dim=32,
        n_layers=2,
        n_heads=2,
        vocab_size=VOCAB,
        max_seq_len=32,
        ffn_hidden_dim=48,
        init_std=0.3,
    )
    fields.update(overrides)
    return Transformer(
        ModelConfig(**fields, moe=MoEConfig(n_experts=4, top_k=2, hidden_dim=16))
    ).double()


def _rows(n: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random token rows ``(n, length)``."""
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _naive(model: Transformer, rows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over all rows, one row at a time, and the number of targets."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(row[None, :-1]).logits[0].double()  # (L, V)
            total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return total, count


@pytest.mark.parametrize("batch_size", [1, 3, 32])
@pytest.mark.parametrize("moe", [False, True])
def test_matches_naive_per_row_loss(batch_size, moe):
    model = _model(moe_layers=(1,) if moe else ())
    model.train()
    rows = _rows(7, 13)
    result = evaluate_perplexity(model, rows, batch_size=batch_size)
    total, count = _naive(model, rows)
    assert result["tokens"] == count == 7 * 12
    assert result["loss"] == pytest.approx(total / count, rel=1e-10)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert 1.0 < result["perplexity"] < 10 * VOCAB
    assert model.training
    if moe:  # the model's own loss adds the balancing loss; this one must not
        with torch.no_grad():
            own = model(rows[:, :-1], targets=rows[:, 1:]).loss
        assert float(own) > result["loss"] + 1e-6


def test_float32_model_matches_naive_loss():
    model = _model().float()
    rows = _rows(5, 9, seed=2)
    result = evaluate_perplexity(model, rows, batch_size=2)
    total, count = _naive(model, rows)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["tokens"] == count == 40


def test_runs_in_eval_mode_and_restores_mode():
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    evaluate_perplexity(model, _rows(4, 6), batch_size=2)
    assert seen == [False, False] and model.training
    model.eval()
    evaluate_perplexity(model, _rows(4, 6), batch_size=2)
    assert not model.training


def test_invalid_rows():
    model = _model()
    with pytest.raises(ValueError, match="rows"):
        evaluate_perplexity(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        evaluate_perplexity(model, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        evaluate_perplexity(model, torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_perplexity(model, _rows(2, 4), batch_size=0)
