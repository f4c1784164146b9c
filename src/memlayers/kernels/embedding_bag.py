"""The weighted embedding bag: out[b] = sum_k weights[b, k] * table[indices[b, k]].

This is the memory read of every memory layer. All implementations sit behind
:func:`embedding_bag`; :func:`embedding_bag_reference` is the plain PyTorch
ground truth that every faster implementation is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def embedding_bag_reference(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gather rows, scale by weights, sum over the last index axis.

    Plain autograd ops, so gradients reach ``weights`` and ``table``. Slow
    and memory-hungry (it materialises every gathered row), but obviously right.
    """
    rows = table[indices]  # (..., K, d)
    return (rows * weights.unsqueeze(-1).to(rows.dtype)).sum(dim=-2)  # (..., d)


def embedding_bag_torch(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.embedding_bag`` in sum mode with per-sample weights."""
    lead = indices.shape[:-1]
    flat_indices = indices.reshape(-1, indices.shape[-1])  # (B, K)
    flat_weights = weights.reshape(-1, weights.shape[-1]).to(table.dtype)  # (B, K)
    out = F.embedding_bag(flat_indices, table, per_sample_weights=flat_weights, mode="sum")  # (B, d)
    return out.reshape(*lead, table.shape[-1])


BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "reference": embedding_bag_reference,
    "torch": embedding_bag_torch,
}


def embedding_bag(
    indices: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Weighted sum of table rows per bag.

    Args:
        indices: ``(..., K)`` integer row ids into ``table``.
        weights: ``(..., K)`` weight of each selected row.
        table: ``(N, d)`` value table.
        backend: one of :data:`BACKENDS`.

    Returns:
        ``(..., d)`` tensor in ``table``'s dtype.
    """
    if indices.shape != weights.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have the same shape")
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (rows, dim), got shape {tuple(table.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedding_bag backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](indices, weights, table)
