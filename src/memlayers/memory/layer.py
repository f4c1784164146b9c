"""MemoryLayer: a product-key memory that stands in for a transformer FFN.

Per token x (already normalised by the block), with heads h and selected slots i:

    scores, slots = top-knn product-key search of q = W_q x + b
    w = softmax(scores / temperature)             (per head, fp32)
    y = sum_h sum_i w_hi * V[slot_hi]             (the embedding bag)
    plus:  out = W_2 (y * silu(W_1 x))            (Memory+, the default)
    plain: out = y, or W_2 y when value_dim != dim
    peer:  out = sum_h sum_i w_hi * gelu(U[slot_hi] . x) * V[slot_hi]
    gated: out = sigmoid(w_g . x) * out
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.kernels import embedding_bag, embedding_dot
from memlayers.memory.config import MemoryConfig
from memlayers.memory.pool import MemoryPool
from memlayers.memory.product_keys import ProductKeySearch
from memlayers.memory.usage import UsageTracker


class MemoryLayer(nn.Module):
    """A memory layer mapping ``(..., dim) -> (..., dim)``.

    Args:
        dim: model dimension.
        config: the memory's shape and options.
        pool: a :class:`MemoryPool` shared with other layers. The layer keeps
            a reference to it but does not register it: its owner (the model)
            does, so the table appears once in ``parameters()`` and
            ``state_dict()``. Without a pool the layer creates and owns one.
        bag_backend: implementation of :func:`memlayers.kernels.embedding_bag`
            (``auto``: Triton on GPU, the C kernels on CPU).
        search_backend: implementation of the product-key top-k,
            :func:`memlayers.kernels.search.product_key_topk` (``auto``: the C
            search on CPU, torch ops elsewhere).
        table_grad: how the value table's gradient is left: ``"dense"``
            (``values.grad``, for any torch optimizer) or ``"rows"``
            (``values.row_grad``, for the row-sparse optimizers). The trainer
            sets it from ``optim.value_optimizer``.
    """

    def __init__(
        self,
        dim: int,
        config: MemoryConfig,
        pool: MemoryPool | None = None,
        bag_backend: str = "auto",
        table_grad: str = "dense",
        search_backend: str = "auto",
    ):
        super().__init__()
        self.dim = dim
        self.config = config
        self.bag_backend = bag_backend
        self.table_grad = table_grad
        # how the value rows are read: ``embedding_bag``, or a memory-parallel read
        # that memlayers.distributed installs from outside (same signature)
        self.value_reader = embedding_bag
        self.dot_reader = embedding_dot  # PEER's input projections, likewise replaceable
        self.search = ProductKeySearch(dim, config, backend=search_backend)
        if pool is None:
            self.pool = MemoryPool(dim, config)
        else:
            expected = (config.n_slots, config.resolved_value_dim(dim))
            if tuple(pool.values.shape) != expected or (pool.up is not None) != (config.variant == "peer"):
                raise ValueError(
                    f"shared pool has values {tuple(pool.values.shape)} (peer={pool.up is not None}); "
                    f"this layer needs {expected} (peer={config.variant == 'peer'})"
                )
            object.__setattr__(self, "pool", pool)  # shared: referenced, registered by the owner
        value_dim = config.resolved_value_dim(dim)
        self.w1 = nn.Linear(dim, value_dim, bias=False) if config.variant == "plus" else None
        needs_w2 = config.variant == "plus" or (config.variant == "plain" and value_dim != dim)
        self.w2 = nn.Linear(value_dim, dim, bias=False) if needs_w2 else None
        self.gate = nn.Linear(dim, 1) if config.gated else None
        self.usage: UsageTracker | None = None
        self.reset_parameters()

    @property
    def owns_pool(self) -> bool:
        """True when the value pool is this layer's own (registered here)."""
        return "pool" in self._modules

    def reset_parameters(self, residual_std: float | None = None) -> None:
        """Initialise as in the paper: W_1, W_2 and the gate normal(0, fan_in^-1/2).

        With ``config.output_init == "model"`` and the host model's ``residual_std``
        given, W_2 takes that std instead. The pool is re-initialised only when this
        layer owns it.
        """
        self.search.reset_parameters()
        model_scale = self.config.output_init == "model" and residual_std is not None
        for linear in (self.w1, self.w2, self.gate):
            if linear is not None:
                std = residual_std if linear is self.w2 and model_scale else 1.0 / math.sqrt(linear.in_features)
                nn.init.normal_(linear.weight, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        if self.owns_pool:
            self.pool.reset_parameters()

    def track_usage(self) -> UsageTracker:
        """Start counting the slots every forward pass in training mode reads."""
        self.usage = UsageTracker(self.config.n_slots, device=self.search.keys.device)
        return self.usage

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-knn ``(scores, indices)`` per head, each ``(..., heads, knn)``."""
        return self.search(x)

    def slot_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Brute-force score of every slot, ``(..., heads, n_keys**2)``."""
        return self.search.slot_scores(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Read the memory for each position of ``x`` ``(..., dim)``; returns ``(..., dim)``."""
        scores, indices = self.search(x)  # (..., heads, knn)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        weights = F.softmax(scores / self.config.temperature, dim=-1)  # (..., heads, knn)
        if self.usage is not None and self.training:
            self.usage.update(indices)
        indices = indices.flatten(-2)  # (..., heads * knn)
        weights = weights.flatten(-2)  # (..., heads * knn)
        values = self.pool.values
        if self.config.variant == "peer":
            activation = F.gelu(self.dot_reader(indices, self.pool.up, x, self.bag_backend, self.table_grad))  # (..., heads * knn)
            out = self.value_reader(indices, weights * activation, values, self.bag_backend, self.table_grad)  # (..., dim)
        else:
            y = self.value_reader(indices, weights, values, self.bag_backend, self.table_grad)  # (..., value_dim)
            y = y.to(x.dtype)
            if self.w1 is not None:
                out = self.w2(y * F.silu(self.w1(x)))  # (..., dim)
            elif self.w2 is not None:
                out = self.w2(y)  # (..., dim)
            else:
                out = y
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out  # (..., dim)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"dim={self.dim}, slots={cfg.n_slots}, heads={cfg.heads}, knn={cfg.knn}, "
            f"k_dim={cfg.k_dim}, variant={cfg.variant}, shared_pool={not self.owns_pool}"
        )
