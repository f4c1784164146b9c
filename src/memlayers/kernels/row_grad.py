"""RowGrad: the gradient of a value table as rows, kept factored until it is used.

A bag read ``out[b] = sum_k w[b, k] * V[ids[b, k]]`` gives the table the
gradient ``dV[r] = sum over lookups (b, k) of row r of w[b, k] * grad_out[b]``.
Rather than writing that out (a dense ``N x d`` tensor, or ``U x d`` for the
``U`` touched rows, which costs page faults and bandwidth), the backward only
records its factors: the lookups, their weights and ``grad_out``. Every memory
layer that reads a shared table, and every micro-batch of gradient
accumulation, appends one part; their sum is the concatenation.

When the gradient is used, :meth:`RowGrad.segments` sorts all lookups by row
(stable, so the summation order and result are deterministic), and

- :meth:`rows` gives the unique touched row ids and their summed gradients;
- :meth:`sq_norm` the squared norm, for clipping, without writing rows out;
- the row-sparse optimizers of :mod:`memlayers.kernels.row_update` reduce each
  row's segment and update that row in one pass.

``scale`` multiplies the whole gradient (gradient clipping sets it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlayers.kernels import cpu
from memlayers.kernels.bag_ops import CpuOps, TorchOps, check_ids


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
        seg = self.segments()
        if self.ops is CpuOps and seg.grad_out.dtype == torch.float32 and seg.grad_out.device.type == "cpu":
            parts = cpu.parallel_for(
                cpu.library().row_grad_sq_norm, seg.rows.numel(), cpu.ptr(seg.offsets), cpu.ptr(seg.bags),
                cpu.ptr(seg.weights), cpu.ptr(seg.grad_out), self.dim, grain=64,
            )
            return float(sum(parts)) * self.scale**2
        return float(self.rows()[1].double().square().sum())

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
    rows = RowGrad(n_rows, grad_out.shape[-1], ops)
    rows.add(ids, weights, grad_out)
    return rows.to_dense(dtype)
