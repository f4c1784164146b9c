"""Held-out language-modelling loss and perplexity over fixed-length token rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, rows: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean next-token NLL and perplexity of ``model`` on ``rows`` ``(n, L+1)`` of token ids.

    Each row gives inputs ``row[:-1]`` and targets ``row[1:]``. The loss is
    cross-entropy of ``model(inputs).logits`` computed here in float32 or
    better (the model's own loss would add the MoE balancing loss), averaged
    over all ``n * L`` target tokens. Returns ``{"loss": nats per token,
    "perplexity": exp(loss), "tokens": n * L}``. Runs in batches of
    ``batch_size`` rows with the model in eval mode on its own device; its
    train/eval mode is restored afterwards.
    """
    if rows.dim() != 2 or rows.shape[0] < 1 or rows.shape[1] < 2:
        shape = tuple(rows.shape)
        raise ValueError(f"rows must be (n >= 1, L+1 >= 2) token ids, got shape {shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size].to(device=device, dtype=torch.long)  # (B, L+1)
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, L), (B, L)
            logits = model(inputs).logits  # (B, L, V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")  # ()
            total_nll += float(nll)
    finally:
        model.train(was_training)
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    loss = total_nll / tokens
    perplexity = math.inf if loss > 709.0 else math.exp(loss)  # exp overflows a float past ~709.78
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}
