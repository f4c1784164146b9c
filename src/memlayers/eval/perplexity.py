"""Held-out language-modelling loss and perplexity over fixed-length token rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.eval.lockstep import Ranks


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

    A model sharded over the ranks of a process group (DTensor parameters)
    needs every rank to call this with the same rows (checked): the ranks
    split the batches between them and each returns the result of all rows.
    """
    ranks = Ranks(model)
    error = None
    if rows.dim() != 2 or rows.shape[0] < 1 or rows.shape[1] < 2:
        error = ValueError(f"rows must be (n >= 1, L+1 >= 2) token ids, got shape {tuple(rows.shape)}")
    elif batch_size < 1:
        error = ValueError(f"batch_size must be >= 1, got {batch_size}")
    ranks.agree(error, same=rows.cpu().numpy().tobytes())
    n = rows.shape[0]
    batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    mine: list[tuple[int, float]] = []
    was_training = model.training
    model.eval()
    try:
        for batch_rows in ranks.rounds(batches):
            if batch_rows is None:
                ranks.idle_forward(model)
                continue
            batch = rows[batch_rows.start : batch_rows.stop].to(ranks.device, torch.long)  # (B, L+1)
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, L), (B, L)
            logits = model(inputs).logits  # (B, L, V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")  # ()
            mine.append((batch_rows.start, float(nll)))
    finally:
        model.train(was_training)
    tokens = n * (rows.shape[1] - 1)
    loss = math.fsum(nll for _, nll in sorted(ranks.gather(mine))) / tokens
    perplexity = math.inf if loss > 709.0 else math.exp(loss)  # exp overflows a float past ~709.78
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}
