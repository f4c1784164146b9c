"""Log-likelihood of continuations: the scoring behind QA answer NLL and lm-eval's loglikelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    sequences: list[list[int]],
    n_scored: list[int],
    pad_id: int = 0,
) -> list[tuple[float, bool]]:
    """Per sequence, the summed log-probability of its last ``n_scored[i]`` tokens given
    the tokens before them, and whether each of those tokens is the model's argmax.

    One forward over the batch. Sequences of different lengths are padded on the
    right with ``pad_id``, which a causal model's earlier positions cannot see.
    Each sequence must fit in ``model.config.max_seq_len + 1`` tokens (the model
    reads all but the last) and score ``1 .. len - 1`` tokens. Log-probabilities
    are computed in float32 or better and summed in float64; the model runs in
    whatever mode it is in.
    """
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences) - 1
    tokens = torch.full((len(sequences), width + 1), pad_id, dtype=torch.long)  # (B, T + 1)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    tokens = tokens.to(device)
    ends = torch.tensor([len(s) - 1 for s in sequences], device=device)  # (B,) inputs per row
    starts = ends - torch.tensor(n_scored, device=device)  # (B,) first scored position per row
    first = int(starts.min())  # positions before every row's continuation need no softmax
    logits = model(tokens[:, :-1]).logits[:, first:]  # (B, W, V): position t predicts t + 1
    log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (B, W, V)
    targets = tokens[:, first + 1 :]  # (B, W)
    target_lp = log_probs.gather(-1, targets[..., None]).squeeze(-1).double()  # (B, W)
    position = torch.arange(first, width, device=device)  # (W,)
    scored = (position >= starts[:, None]) & (position < ends[:, None])  # (B, W)
    sums = torch.where(scored, target_lp, 0.0).sum(dim=1)  # (B,)
    greedy = ((log_probs.argmax(dim=-1) == targets) | ~scored).all(dim=1)  # (B,)
    return list(zip(sums.tolist(), greedy.tolist(), strict=True))
