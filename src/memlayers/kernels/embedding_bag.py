"""The weighted embedding bag: out[b] = sum_k weights[b, k] * table[indices[b, k]].

This is the memory read of every memory layer. All implementations sit behind
:func:`embedding_bag`; :func:`embedding_bag_reference` is the plain PyTorch
ground truth that every faster implementation is tested against.

Backends:

- ``reference``: gather, scale, sum with plain autograd ops (slow, obviously right);
- ``torch``: ``F.embedding_bag`` (its backward writes a dense table gradient);
- ``cpu``: C kernels for the forward and the weight gradient (:mod:`memlayers.kernels.cpu`);
- ``torch_rows``: ``F.embedding_bag`` ops under the same autograd function as the
  fast kernels (any device; gives row gradients where nothing faster runs);
- ``triton``: Triton kernels (GPU, or the CPU under ``TRITON_INTERPRET=1``);
  ``triton_atomic`` computes a dense table gradient in one atomic pass;
- ``auto``: ``triton`` for CUDA tables when Triton is installed, ``cpu`` for CPU
  tables when a C compiler is there, else ``torch``.

The table's gradient comes in one of two forms (``table_grad``):

- ``"dense"``: ``table.grad``, an ``(N, d)`` tensor, as any torch optimizer expects;
- ``"rows"``: nothing dense is written; the gradient accumulates as a
  :class:`~memlayers.kernels.row_grad.RowGrad` in ``table.row_grad`` (the
  touched rows and their summed gradients, kept factored), which the
  row-sparse optimizers of :mod:`memlayers.train.row_optim` consume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlayers.kernels import cpu
from memlayers.kernels.bag_ops import (
    CpuOps,
    TorchOps,
    TritonAtomicOps,
    TritonOps,
    check_ids,
    fixed_offsets,
)
from memlayers.kernels.quantized import QuantizedTable, quantized_bag
from memlayers.kernels.row_grad import read_table_grad


def embedding_bag_reference(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gather rows, scale by weights, sum over the last index axis.

    Plain autograd ops, so gradients reach ``weights`` and ``table``. Slow
    and memory-hungry (it materialises every gathered row), but obviously right.
    """
    rows = table[indices]  # (..., K, d)
    return (rows * weights.unsqueeze(-1).to(rows.dtype)).sum(dim=-2)  # (..., d)


def over_bags(fn, indices: torch.Tensor, weights: torch.Tensor, *args) -> torch.Tensor:
    """``fn(indices, weights, *args)`` on ``(B, K)`` views of ``(..., K)`` lookups; the
    ``(B, d)`` result comes back as ``(..., d)``."""
    lead, K = indices.shape[:-1], indices.shape[-1]
    out = fn(indices.reshape(lead.numel(), K), weights.reshape(lead.numel(), K), *args)  # (B, d); K may be 0
    return out.reshape(*lead, out.shape[-1])


def embedding_bag_torch(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.embedding_bag`` in sum mode with per-sample weights."""

    def bags(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # flat ids and explicit offsets, as torch does for (B, K) ids, which it cannot take with K = 0
        starts = fixed_offsets(*ids.shape, ids.device)[:-1]  # (B,)
        return F.embedding_bag(ids.reshape(-1), table, starts, per_sample_weights=w.reshape(-1).to(table.dtype), mode="sum")

    return over_bags(bags, indices, weights)


class BagFunction(torch.autograd.Function):
    """A fixed-size weighted bag on ``ops``, with the table gradient dense or as rows."""

    @staticmethod
    def forward(ctx, indices, weights, table, ops, table_grad):  # noqa: D102 (autograd hook)
        B, K = indices.shape
        offsets = fixed_offsets(B, K, indices.device)  # (B + 1,)
        out = ops.bag(table, indices.reshape(-1), weights.reshape(-1), offsets)  # (B, d), >= float32
        ctx.save_for_backward(indices, weights, table)
        ctx.ops, ctx.table_grad = ops, table_grad
        ctx.table_param = table if table_grad == "rows" else None  # the leaf that receives row_grad
        return out.to(table.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 (autograd hook)
        indices, weights, table = ctx.saved_tensors
        grad_out = grad_out.to(torch.promote_types(grad_out.dtype, torch.float32)).contiguous()  # (B, d)
        grad_weights = grad_table = None
        if ctx.table_grad == "dense" and ctx.needs_input_grad[2] and hasattr(ctx.ops, "backward_atomic"):
            grad_weights, rows, row_grads = ctx.ops.backward_atomic(table, indices, weights, grad_out)
            grad_table = torch.zeros_like(table).index_copy_(0, rows, row_grads.to(table.dtype))  # (N, d)
            return None, grad_weights.to(weights.dtype) if ctx.needs_input_grad[1] else None, grad_table, None, None
        if ctx.needs_input_grad[1]:
            grad_weights = ctx.ops.bag_dot(table, indices, grad_out).to(weights.dtype)  # (B, K)
        if ctx.needs_input_grad[2]:
            grad_table = read_table_grad(
                ctx.table_grad, ctx.table_param, table.shape[0], indices, weights, grad_out, ctx.ops, table.dtype
            )  # (N, d) or None (rows)
        return None, grad_weights, grad_table, None, None


OPS = {"torch_rows": TorchOps, "cpu": CpuOps, "triton": TritonOps, "triton_atomic": TritonAtomicOps}
"""The raw ops (:mod:`memlayers.kernels.bag_ops`) behind each fast backend."""

BACKENDS = ("reference", "torch", *OPS)


def triton_available() -> bool:
    """True when Triton imports (it runs on CUDA, or anywhere with ``TRITON_INTERPRET=1``)."""
    from memlayers.kernels import triton_bag

    return triton_bag.AVAILABLE


def resolve_backend(backend: str, table: torch.Tensor, table_grad: str = "dense") -> str:
    """The concrete backend ``auto`` stands for, given the table's device."""
    if backend != "auto":
        return backend
    if table.device.type == "cuda" and table.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available():
        return "triton"
    if table.device.type == "cpu" and table.dtype in cpu.DTYPE_SUFFIX and cpu.available():
        return "cpu"
    return "torch_rows" if table_grad == "rows" else "torch"


def _fast_backend(indices: torch.Tensor, table: torch.Tensor, backend: str, table_grad: str, what: str) -> str:
    """Resolve and check a backend for ``table``; returns its name (``reference``/``torch`` included)."""
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (rows, dim), got shape {tuple(table.shape)}")
    if indices.dim() == 0:
        raise ValueError(f"{what}: indices must have a lookup axis (..., K), got a 0-D tensor")
    if table_grad not in ("dense", "rows"):
        raise ValueError(f"table_grad must be 'dense' or 'rows', got {table_grad!r}")
    name = resolve_backend(backend, table, table_grad)
    if name not in BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}; choose auto or one of {sorted(BACKENDS)}")
    if name in ("reference", "torch") and table_grad == "rows":
        raise ValueError(f"backend {name!r} gives a dense table gradient only; use table_grad='dense' or backend 'auto'")
    if table_grad == "rows" and table.requires_grad and not table.is_leaf:
        raise ValueError("table_grad='rows' needs the table to be a leaf tensor (the value parameter itself)")
    if name == "cpu":
        if table.device.type != "cpu" or table.dtype not in cpu.DTYPE_SUFFIX:
            raise ValueError(f"backend 'cpu' takes float32 or bfloat16 CPU tables, got {table.dtype} on {table.device}")
        if not cpu.available():
            raise ValueError("backend 'cpu' needs the C kernels, which could not be built (no C compiler); use backend 'auto'")
    # every backend, so that all refuse the same ids (the reference's indexing would wrap negative ids)
    check_ids(indices, table.shape[0], what, "indices")
    return name


def embedding_bag(
    indices: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    backend: str = "auto",
    table_grad: str = "dense",
) -> torch.Tensor:
    """Weighted sum of table rows per bag.

    Args:
        indices: ``(..., K)`` int64 or int32 row ids in ``[0, N)`` (others raise
            ValueError, ids out of range IndexError).
        weights: ``(..., K)`` weight of each selected row.
        table: ``(N, d)`` value table, or a
            :class:`~memlayers.kernels.quantized.QuantizedTable` (forward only).
        backend: ``auto`` or one of :data:`BACKENDS`.
        table_grad: ``"dense"`` (``table.grad``) or ``"rows"`` (``table.row_grad``,
            a :class:`~memlayers.kernels.row_grad.RowGrad`; the table must be a leaf).

    Returns:
        ``(..., d)`` tensor in ``table``'s dtype.
    """
    if isinstance(table, QuantizedTable):  # inference: the C kernel on CPU, else torch ops
        return quantized_bag(indices, weights, table, "cpu" if backend == "cpu" else "auto")
    if indices.shape != weights.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have the same shape")
    name = _fast_backend(indices, table, backend, table_grad, "embedding_bag")
    if name == "reference":
        return embedding_bag_reference(indices, weights, table)
    if name == "torch":
        return embedding_bag_torch(indices, weights, table)
    return over_bags(BagFunction.apply, indices, weights, table, OPS[name], table_grad)


def embedding_dot_reference(indices: torch.Tensor, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[indices[..., k]] . x`` with plain autograd ops: ``(..., K)``."""
    return torch.einsum("...kd,...d->...k", table[indices], x.to(table.dtype))  # (..., K)


class DotFunction(torch.autograd.Function):
    """``out[b, k] = table[ids[b, k]] . x[b]`` on ``ops``, with the table gradient dense or as rows."""

    @staticmethod
    def forward(ctx, indices, table, x, ops, table_grad):  # noqa: D102 (autograd hook)
        ctx.save_for_backward(indices, table, x)
        ctx.ops, ctx.table_grad = ops, table_grad
        ctx.table_param = table if table_grad == "rows" else None
        return ops.bag_dot(table, indices, x)  # (B, K), >= float32

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 (autograd hook)
        indices, table, x = ctx.saved_tensors
        grad = grad.contiguous()  # (B, K)
        grad_table = grad_x = None
        if ctx.needs_input_grad[2]:  # dx[b] = sum_k grad[b, k] * table[ids[b, k]]: a bag
            offsets = fixed_offsets(*indices.shape, indices.device)
            grad_x = ctx.ops.bag(table, indices.reshape(-1), grad.reshape(-1), offsets).to(x.dtype)  # (B, d)
        if ctx.needs_input_grad[1]:  # dtable[r] = sum over lookups of r of grad[b, k] * x[b]
            x_acc = x.to(torch.promote_types(x.dtype, torch.float32))
            grad_table = read_table_grad(
                ctx.table_grad, ctx.table_param, table.shape[0], indices, grad, x_acc, ctx.ops, table.dtype
            )  # (N, d) or None (rows)
        return None, grad_table, grad_x, None, None


def embedding_dot(
    indices: torch.Tensor,
    table: torch.Tensor,
    x: torch.Tensor,
    backend: str = "auto",
    table_grad: str = "dense",
) -> torch.Tensor:
    """Dot products of each selected row with its query: ``out[..., k] = table[indices[..., k]] . x``.

    PEER's expert input projections: one input vector per slot, read only
    for the selected slots. The gradient of ``x`` is a weighted bag of the
    selected rows, and the table's is again a row gradient, so the same
    kernels, backends and ``table_grad`` forms serve it.

    Args:
        indices: ``(..., K)`` row ids; ``table``: ``(N, d)``; ``x``: ``(..., d)``.

    Returns:
        ``(..., K)`` in float32 (float64 for float64 tables).
    """
    if indices.shape[:-1] != x.shape[:-1] or x.shape[-1] != table.shape[-1]:
        raise ValueError(f"indices {tuple(indices.shape)}, x {tuple(x.shape)} and table {tuple(table.shape)} do not fit")
    name = _fast_backend(indices, table, backend, table_grad, "embedding_dot")
    if name in ("reference", "torch"):
        return embedding_dot_reference(indices, table, x).to(torch.promote_types(table.dtype, torch.float32))
    lead = indices.shape[:-1]
    flat_indices = indices.reshape(lead.numel(), indices.shape[-1])  # (B, K); K may be 0
    out = DotFunction.apply(flat_indices, table, x.reshape(lead.numel(), x.shape[-1]), OPS[name], table_grad)  # (B, K)
    return out.reshape(*lead, indices.shape[-1])
