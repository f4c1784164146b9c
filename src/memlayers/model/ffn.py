"""Feed-forward blocks: the dense SwiGLU FFN and the routed mixture of experts.

MoE: token-choice top-k routing over SwiGLU experts.

Dropless (no capacity limit), so each token's output depends only on that
token: the block stays causal. The load-balancing loss is the Switch
Transformer one, ``n_experts * sum_e f_e * P_e`` with f_e the fraction of
routed assignments that went to expert e and P_e its mean router probability;
it equals 1 when routing is perfectly balanced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.model.config import MoEConfig


class FeedForward(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN position-wise."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed SwiGLU experts: ``(..., dim) -> (..., dim)``.

    After each forward, ``aux_loss`` holds the batch's load-balancing loss.
    """

    def __init__(self, dim: int, hidden_dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        E = config.n_experts
        self.router = nn.Linear(dim, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(E, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(E, dim, hidden_dim))
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Router and expert inputs normal(0, std), expert outputs normal(0, out_std or std)."""
        for weight in (self.router.weight, self.w1, self.w3):
            nn.init.normal_(weight, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities ``(M, E)`` and top-k weights and experts ``(M, k)``.

        With top_k > 1 the weights are renormalised to sum to 1 (Mixtral); with
        top_k = 1 the weight is the raw probability (Switch), so the task loss
        still reaches the router.
        """
        logits = self.router(x)  # (M, E)
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (M, E)
        weights, experts = probs.topk(self.config.top_k, dim=-1)  # (M, k)
        if self.config.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Send each position to its top-k experts and mix their outputs."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (M, dim)
        probs, weights, experts = self.route(flat)
        k = self.config.top_k
        order = experts.flatten().argsort(stable=True)  # (M*k,) assignments grouped by expert
        token = order // k  # (M*k,)
        weight = weights.flatten()[order].unsqueeze(-1)  # (M*k, 1)
        counts = torch.bincount(experts.flatten(), minlength=self.config.n_experts).tolist()
        # unbind, not w1[e]: indexing one expert gives a full-size zero gradient per expert
        # in backward (quadratic in n_experts); unbind's backward stacks the slices once.
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outputs = []
        for e, (rows, mix) in enumerate(zip(token.split(counts), weight.split(counts), strict=True)):
            if rows.numel() == 0:
                continue
            h = flat[rows]  # (m, dim)
            h = F.silu(h @ w1[e].T) * (h @ w3[e].T)  # (m, hidden)
            outputs.append((h @ w2[e].T) * mix.to(h.dtype))  # (m, dim)
        out = torch.zeros_like(flat)  # (M, dim)
        if outputs:
            out.index_add_(0, token, torch.cat(outputs).to(flat.dtype))
        assigned = F.one_hot(experts, self.config.n_experts).sum(dim=(0, 1)).float()  # (E,)
        fraction = assigned / experts.numel()  # (E,)
        self.aux_loss = self.config.n_experts * (fraction * probs.mean(dim=0)).sum()
        return out.reshape(shape)
