"""Product-key search: the exact top-knn of n_keys**2 slots at O(n_keys) cost.

Each head owns two sub-key tables K1, K2 of ``n_keys`` rows of size
``k_dim // 2``. Slot (i, j) has key [K1_i ; K2_j], index ``i * n_keys + j``,
and score ``q1 . K1_i + q2 . K2_j``. Because the score is a sum of two
independent parts, the top-knn slots are among the knn x knn pairs formed
from the top-knn of each half, so the search is exact (Lample et al. 2019).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from memlayers.kernels.search import half_scores, product_key_search
from memlayers.memory.config import MemoryConfig


class _UnitNorm(torch.autograd.Function):
    """``x / max(||x||, eps)`` over the last axis (``F.normalize``) in fewer passes over ``x``:
    one reciprocal norm per row and a product, and a backward of one dot product per row and
    two elementwise passes instead of the chain of divisions autograd records for the quotient."""

    @staticmethod
    def forward(ctx, x, eps):  # noqa: D102 (autograd hook)
        norm = x.norm(dim=-1, keepdim=True)  # (..., 1)
        clamped = norm < eps  # (..., 1): there the map is x / eps, a plain scaling
        inv = norm.clamp_min_(eps).reciprocal_()  # (..., 1)
        y = x * inv  # (..., d)
        ctx.save_for_backward(y, inv, clamped)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102 (autograd hook)
        y, inv, clamped = ctx.saved_tensors
        # d(x / |x|) = (g - y (g . y)) / |x|: the gradient less its component along y
        along = (grad * y).sum(dim=-1, keepdim=True).masked_fill_(clamped, 0)  # (..., 1)
        return torch.addcmul(grad, y, along, value=-1).mul_(inv), None  # (..., d)


def unit_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along its last axis, ``x / max(||x||, eps)``, as
    ``F.normalize(x, dim=-1)`` computes it, with a cheaper backward (qk-norm runs it on every
    query and sub-key of every step)."""
    return _UnitNorm.apply(x, eps)


class ProductKeySearch(nn.Module):
    """Query projection, sub-keys and the exact multi-head product-key top-k
    (``backend``: see :func:`memlayers.kernels.search.product_key_topk`)."""

    def __init__(self, dim: int, config: MemoryConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.dim = dim
        self.backend = backend
        self.query_proj = nn.Linear(dim, config.heads * config.k_dim, bias=config.query_bias)
        half = config.k_dim // 2
        # (heads, 2 halves, n_keys, k_dim/2)
        self.keys = nn.Parameter(torch.empty(config.heads, 2, config.n_keys, half))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_q Xavier, bias zero, sub-keys uniform(+-1/sqrt(k_dim))."""
        nn.init.xavier_uniform_(self.query_proj.weight)
        if self.query_proj.bias is not None:
            nn.init.zeros_(self.query_proj.bias)
        bound = 1.0 / math.sqrt(self.config.k_dim)
        nn.init.uniform_(self.keys, -bound, bound)

    def queries_and_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``(..., heads, 2, k_dim/2)`` and sub-keys ``(heads, 2, n_keys, k_dim/2)``
        as they are scored (normalised with qk-norm, keys in the queries' dtype)."""
        cfg = self.config
        q = self.query_proj(x)  # (..., heads * k_dim)
        q = q.view(*x.shape[:-1], cfg.heads, 2, cfg.k_dim // 2)  # (..., heads, 2, k_dim/2)
        keys = self.keys  # (heads, 2, n_keys, k_dim/2)
        if cfg.qk_norm:
            q = unit_normalize(q)
            keys = unit_normalize(keys)
        return q, keys.to(q.dtype)

    def half_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of every sub-key of both halves, ``(..., heads, 2, n_keys)``."""
        return half_scores(*self.queries_and_keys(x))  # (..., heads, 2, n_keys)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-knn slots per head.

        Args:
            x: ``(..., dim)`` normalised hidden states.

        Returns:
            ``(scores, indices)``, each ``(..., heads, knn)``: the raw dot-product
            scores in descending order and the slot ids in ``[0, n_keys**2)``.
        """
        return product_key_search(*self.queries_and_keys(x), self.config.knn, self.backend)

    def slot_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Brute-force score of every slot, ``(..., heads, n_keys**2)``.

        Memory grows with n_keys**2: for tests and inspecting small memories.
        """
        s = self.half_scores(x)  # (..., heads, 2, n_keys)
        return (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)  # (..., heads, n_keys**2)
