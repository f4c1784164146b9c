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
        counts = torch.bincount(experts.flatten(), minlength=self.config.n_experts)  # (E,)
        run = expert_outputs if grouped_mm_supported(flat, self.w1) else expert_outputs_reference
        routed = run(flat[token], self.w1, self.w3, self.w2, counts) * weight.to(flat.dtype)  # (M*k, dim)
        out = torch.zeros_like(flat).index_add_(0, token, routed.to(flat.dtype))  # (M, dim)
        assigned = F.one_hot(experts, self.config.n_experts).sum(dim=(0, 1)).float()  # (E,)
        fraction = assigned / experts.numel()  # (E,)
        self.aux_loss = self.config.n_experts * (fraction * probs.mean(dim=0)).sum()
        return out.reshape(shape)


def grouped_mm_supported(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: on the CPU float32 / bfloat16 / float16,
    on CUDA bfloat16 from sm80 (its documented support), with rows whose bytes are multiples of 16."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    return all(size * x.element_size() % 16 == 0 for size in w1.shape[1:])


def expert_outputs(h: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on rows grouped by expert: ``h`` (N, dim), rows of expert e contiguous and
    ``counts[e]`` of them; ``w1``, ``w3`` (E, hidden, dim), ``w2`` (E, dim, hidden) -> (N, dim).

    Three grouped matmuls for all experts at once, and no host sync (the group ends stay on
    the device); see :func:`expert_outputs_reference` for the per-expert loop it replaces."""
    ends = counts.cumsum(0).to(torch.int32)  # (E,)
    gate = F.grouped_mm(h, w1.transpose(1, 2), offs=ends)  # (N, hidden)
    up = F.grouped_mm(h, w3.transpose(1, 2), offs=ends)  # (N, hidden)
    return F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)  # (N, dim)


def expert_outputs_reference(h: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                             counts: torch.Tensor) -> torch.Tensor:
    """:func:`expert_outputs` as a loop over experts (any dtype, shape and device)."""
    # unbind, not w1[e]: indexing one expert gives a full-size zero gradient per expert
    # in backward (quadratic in n_experts); unbind's backward stacks the slices once.
    w1s, w3s, w2s = w1.unbind(0), w3.unbind(0), w2.unbind(0)
    outputs = [h.new_zeros(0, w2.shape[1])]
    for e, rows in enumerate(h.split(counts.tolist())):
        if rows.numel():
            outputs.append((F.silu(rows @ w1s[e].T) * (rows @ w3s[e].T)) @ w2s[e].T)  # (m, dim)
    return torch.cat(outputs)
