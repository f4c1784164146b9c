"""The memory read and its gradient: out[b] = sum_k weights[b, k] * table[indices[b, k]].

This is the memory read of every memory layer, written once against the ops
of :mod:`memlayers.kernels.backends` (the seam: one reference, one fast path
per device). :func:`embedding_bag_reference` is the plain PyTorch ground truth
that every faster implementation is tested against.

Backends (``backend=``): ``reference`` (gather, scale, sum with plain autograd
ops), ``torch`` (``F.embedding_bag``; its backward writes a dense table
gradient), and the names of :data:`~memlayers.kernels.backends.OPS`:
``torch_rows``, ``cpu``, ``triton``, ``triton_atomic``; ``auto`` picks the
fast one for the table's device.

The table's gradient comes in one of two forms (``table_grad``):

- ``"dense"``: ``table.grad``, an ``(N, d)`` tensor, as any torch optimizer expects;
- ``"rows"``: nothing dense is written; the gradient accumulates as a
  :class:`RowGrad` in ``table.row_grad``, which the row-sparse optimizers of
  :mod:`memlayers.train.row_optim` consume.

**RowGrad: the table's gradient, kept factored until it is used.** The read
gives the table the gradient ``dV[r] = sum over lookups (b, k) of row r of
w[b, k] * grad_out[b]``. Rather than writing that out (a dense ``N x d``
tensor, or ``U x d`` for the ``U`` touched rows, which costs page faults and
bandwidth), the backward only records its factors: the lookups, their
weights and ``grad_out``. Every memory layer that reads a shared table, and
every micro-batch of gradient accumulation, appends one part; their sum is
the concatenation. When the gradient is used, :meth:`RowGrad.segments` sorts
all lookups by row (stable, so the summation order and result are
deterministic); :meth:`RowGrad.rows` gives the unique touched rows and their
summed gradients, :meth:`RowGrad.sq_norm` the squared norm for clipping, and
the backends' row updates (:mod:`memlayers.kernels.row_update`) reduce each
row's segment and update that row in one pass. ``scale`` multiplies the whole
gradient (gradient clipping sets it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memlayers.kernels import cpu
from memlayers.kernels.backends import BACKENDS, OPS, TorchOps, resolve_backend
from memlayers.kernels.lookups import check_ids, fixed_offsets
from memlayers.kernels.quantized import QuantizedTable, quantized_bag


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


@dataclass
class Segments:
    """All lookups of a :class:`RowGrad` grouped by row.

    Segment ``u`` is row ``rows[u]``; its lookups are members
    ``offsets[u]:offsets[u+1]`` of ``bags`` (row of ``grad_out`` they came
    from) and ``weights``.
    """

    rows: torch.Tensor  # (U,) int64, ascending
    offsets: torch.Tensor  # (U + 1,) int64
    bags: torch.Tensor  # (M,) int64
    weights: torch.Tensor  # (M,) float32 (float64 for float64 gradients)
    grad_out: torch.Tensor  # (B_total, d) likewise


class RowGrad:
    """The factored gradient of an ``(n_rows, dim)`` table (see the module docstring)."""

    def __init__(self, n_rows: int, dim: int, ops=TorchOps):
        self.n_rows = n_rows
        self.dim = dim
        self.ops = ops
        self.scale = 1.0
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._segments: Segments | None = None

    def add(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Add the gradient of one bag read: ``ids``, ``weights`` ``(B, K)``, ``grad_out`` ``(B, d)``.

        ``ids`` must be int64 or int32 in ``[0, n_rows)``: the fused updates write those rows by address.
        """
        if (
            ids.dim() != 2 or grad_out.dim() != 2 or grad_out.shape[-1] != self.dim
            or ids.shape[:-1] != grad_out.shape[:-1] or ids.shape != weights.shape
        ):
            raise ValueError(
                f"row gradient part has ids {tuple(ids.shape)}, weights {tuple(weights.shape)}, "
                f"grad_out {tuple(grad_out.shape)}; expected (B, K), (B, K), (B, {self.dim})"
            )
        check_ids(ids, self.n_rows, "row gradient")
        dtype = torch.promote_types(grad_out.dtype, torch.float32)
        self._parts.append((ids.detach(), weights.detach().to(dtype), grad_out.detach().to(dtype)))
        self._segments = None

    @property
    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The recorded ``(ids (B, K), weights (B, K), grad_out (B, d))`` parts."""
        return list(self._parts)

    def replace_parts(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Swap in other parts (e.g. gathered from data-parallel replicas)."""
        self._parts = []
        self._segments = None
        for ids, weights, grad_out in parts:
            self.add(ids, weights, grad_out)

    @property
    def n_lookups(self) -> int:
        """Number of recorded lookups (over all parts)."""
        return sum(ids.numel() for ids, _, _ in self._parts)

    def segments(self) -> Segments:
        """Lookups sorted by row and grouped into segments (computed once, cached)."""
        if self._segments is not None:
            return self._segments
        device = self._parts[0][2].device if self._parts else torch.device("cpu")
        if not self._parts:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            self._segments = Segments(empty, torch.zeros(1, dtype=torch.long, device=device), empty,
                                      torch.zeros(0, device=device), torch.zeros(0, self.dim, device=device))
            return self._segments
        flat = torch.cat([ids.reshape(-1) for ids, _, _ in self._parts])  # (M,)
        if self.n_rows < 2**31:
            flat = flat.to(torch.int32)  # sorts faster than int64
        sorted_ids, order = torch.sort(flat, stable=True)  # (M,): stable, so sums are deterministic
        rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)  # (U,)
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.long, device=device)
        torch.cumsum(counts, 0, out=offsets[1:])
        if len(self._parts) == 1:
            bags = torch.div(order, self._parts[0][0].shape[1], rounding_mode="floor")  # (M,)
        else:
            bag_of, base = [], 0
            for ids, _, _ in self._parts:
                B, K = ids.shape
                bag_of.append(torch.arange(B * K, device=device) // K + base)  # (B*K,)
                base += B
            bags = torch.cat(bag_of).index_select(0, order)  # (M,)
        weights = torch.cat([w.reshape(-1) for _, w, _ in self._parts]).index_select(0, order)  # (M,)
        self._segments = Segments(
            rows=rows.long(),
            offsets=offsets,
            bags=bags.contiguous(),
            weights=weights.contiguous(),
            grad_out=torch.cat([g for _, _, g in self._parts]).contiguous(),
        )
        return self._segments

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique touched rows ``(U,)`` and their summed, scaled gradients ``(U, dim)`` float32."""
        seg = self.segments()
        grads = self.ops.bag(seg.grad_out, seg.bags, seg.weights, seg.offsets)  # (U, dim)
        if self.scale != 1.0:
            grads.mul_(self.scale)
        return seg.rows, grads

    def sq_norm(self) -> float:
        """Squared Frobenius norm of the (scaled) gradient."""
        return self.ops.sq_norm(self)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The gradient as a dense ``(n_rows, dim)`` tensor (what a dense optimizer needs)."""
        seg = self.segments()
        # one bag per table row, empty for untouched ones: the kernel writes every row once
        # (zeros included) instead of summing into (U, dim) and copying into a zero-filled table
        counts = torch.zeros(self.n_rows, dtype=torch.long, device=seg.offsets.device)  # (N,)
        counts[seg.rows] = seg.offsets.diff()
        offsets = torch.zeros(self.n_rows + 1, dtype=torch.long, device=counts.device)  # (N + 1,)
        torch.cumsum(counts, 0, out=offsets[1:])
        dense = self.ops.bag(seg.grad_out, seg.bags, seg.weights, offsets)  # (N, dim) float32
        if self.scale != 1.0:
            dense.mul_(self.scale)
        return dense if dtype is None else dense.to(dtype)


def row_grad_of(param: torch.Tensor) -> RowGrad | None:
    """The row gradient accumulated on ``param`` by ``table_grad="rows"`` reads, or None."""
    return getattr(param, "row_grad", None)


def accumulate_row_grad(param: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, ops) -> None:
    """Add one bag read's gradient to ``param.row_grad`` (creating it on first use)."""
    grad = row_grad_of(param)
    if grad is None:  # the width is grad_out's: a column-sharded table's rows are its local slices
        grad = RowGrad(param.shape[0], grad_out.shape[-1], ops)
        param.row_grad = grad
    grad.add(ids, weights, grad_out)


def read_table_grad(
    table_grad: str, param: torch.Tensor | None, n_rows: int, ids: torch.Tensor, weights: torch.Tensor,
    grad_out: torch.Tensor, ops, dtype: torch.dtype,
) -> torch.Tensor | None:
    """A read's table gradient, ``sum over lookups of weights * grad_out[bag]`` per row: added to
    ``param.row_grad`` (returns None) for ``"rows"``, else returned as a dense ``(n_rows, d)`` tensor."""
    if table_grad == "rows":
        accumulate_row_grad(param, ids, weights, grad_out, ops)
        return None
    if hasattr(ops, "dense_grad") and ops.one_pass_pays(n_rows, grad_out.shape[-1]):
        return ops.dense_grad(n_rows, ids, weights, grad_out)[0].to(dtype)
    rows = RowGrad(n_rows, grad_out.shape[-1], ops)
    rows.add(ids, weights, grad_out)
    return rows.to_dense(dtype)


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
        dense = ctx.table_grad == "dense" and ctx.needs_input_grad[2]
        if dense and hasattr(ctx.ops, "dense_grad") and ctx.ops.one_pass_pays(*table.shape):
            # the table's gradient, and (handed the table) the weights', in one pass over the lookups
            read = table if ctx.needs_input_grad[1] else None
            grad_table, dots = ctx.ops.dense_grad(table.shape[0], indices, weights, grad_out, read)
            grad_weights = None if dots is None else dots.to(weights.dtype)
            return None, grad_weights, grad_table.to(table.dtype), None, None
        if ctx.needs_input_grad[1]:
            grad_weights = ctx.ops.bag_dot(table, indices, grad_out).to(weights.dtype)  # (B, K)
        if ctx.needs_input_grad[2]:
            grad_table = read_table_grad(
                ctx.table_grad, ctx.table_param, table.shape[0], indices, weights, grad_out, ctx.ops, table.dtype
            )  # (N, d) or None (rows)
        return None, grad_weights, grad_table, None, None


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
            a :class:`~RowGrad`; the table must be a leaf).

    Returns:
        ``(..., d)`` tensor in ``table``'s dtype.
    """
    if isinstance(table, QuantizedTable):  # inference: the C kernel on CPU, Triton on CUDA, else torch ops
        return quantized_bag(indices, weights, table, backend if backend in ("cpu", "triton") else "auto")
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
