"""Row-sparse optimizer updates: only the touched rows of a table are read and written.

Each update takes the table, its optimizer state and the gradient, either a
:class:`~memlayers.kernels.row_grad.RowGrad` or explicit ``(rows, grads)``.
On the CPU, with the C kernels built, a ``RowGrad`` is reduced and applied in
one fused pass per row (the gradient rows are never written out); otherwise
the gradient rows are materialised and the ``*_reference`` functions, plain
torch ops that run on any device, apply the same arithmetic. The references
are the ground truth the fused kernels are tested against.

All arithmetic is float32; tables and states may be float32 or bfloat16 and
are rounded once when stored. Weight decay is decoupled (AdamW-style) and,
like every other part of the update, applies to touched rows only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memlayers.kernels import cpu
from memlayers.kernels.bag_ops import CpuOps, check_ids
from memlayers.kernels.row_grad import RowGrad

Grad = RowGrad | tuple[torch.Tensor, torch.Tensor]


def _check_grad(table: torch.Tensor, grad: Grad) -> None:
    """Refuse a gradient that does not fit ``table``: the fused kernels index the table,
    its state and the gradient rows by address, so a mismatch would write out of bounds."""
    if isinstance(grad, RowGrad):
        if (grad.n_rows, grad.dim) != tuple(table.shape):
            raise ValueError(f"a row gradient of a ({grad.n_rows}, {grad.dim}) table cannot update a {tuple(table.shape)} table")
        return
    rows, grads = grad
    if rows.dim() != 1 or grads.shape != (rows.numel(), table.shape[1]):
        raise ValueError(f"rows {tuple(rows.shape)} and grads {tuple(grads.shape)} must be (U,) and (U, {table.shape[1]})")
    check_ids(rows, table.shape[0], "row update", "rows")


def _fused(table: torch.Tensor, grad: Grad, *states: torch.Tensor) -> bool:
    """True when the fused C kernel can apply ``grad`` to ``table`` and ``states``."""
    if not (isinstance(grad, RowGrad) and grad.ops is CpuOps and cpu.available()):
        return False
    grad_out = grad.segments().grad_out
    return (
        all(t.device.type == "cpu" and t.is_contiguous() for t in (table, grad_out, *states))
        and table.dtype in cpu.DTYPE_SUFFIX
        and grad_out.dtype == torch.float32
        and all(s.dtype in (*cpu.DTYPE_SUFFIX, torch.int32) for s in states)
    )


def _rows(grad: Grad) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (U,) int64, grads (U, d))`` of a checked gradient."""
    rows, grads = grad.rows() if isinstance(grad, RowGrad) else grad
    return rows.long(), grads  # index_select / index_copy_ take int64 rows


def _launch(name: str, dtypes: tuple[torch.dtype, ...], grad: RowGrad, tensors: tuple, scalars: tuple) -> None:
    seg = grad.segments()
    table = tensors[0]
    args = [cpu.ptr(t) for t in tensors] + [table.shape[1]]
    args += [cpu.ptr(seg.rows), cpu.ptr(seg.offsets), cpu.ptr(seg.bags), cpu.ptr(seg.weights), cpu.ptr(seg.grad_out)]
    args += [grad.scale, *scalars]
    cpu.parallel_for(cpu.kernel(name, *dtypes), seg.rows.numel(), *args, grain=64)
    # written through raw pointers: tell autograd, so a graph that saved the old values fails loudly
    torch.autograd.graph.increment_version(list(tensors))


@torch.no_grad()
def sgd_reference(table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``p = p * (1 - lr * wd) - lr * g`` on ``rows``."""
    p = table.index_select(0, rows).float()  # (U, d)
    table.index_copy_(0, rows, (p * (1 - lr * weight_decay) - lr * grads).to(table.dtype))


@torch.no_grad()
def sgd_update(table: torch.Tensor, grad: Grad, lr: float, weight_decay: float = 0.0) -> None:
    """Row-sparse SGD with decoupled weight decay."""
    _check_grad(table, grad)
    if _fused(table, grad):
        _launch("sgd", (table.dtype,), grad, (table,), (lr, weight_decay))
    else:
        sgd_reference(table, *_rows(grad), lr, weight_decay)


@torch.no_grad()
def adagrad_reference(
    table: torch.Tensor, state_sum: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
    lr: float, eps: float, weight_decay: float, row_mean_sq: torch.Tensor | None = None,
) -> None:
    """Row-wise Adagrad: ``s += mean(g^2)`` per row; ``p = p * (1 - lr * wd) - lr * g / (sqrt(s) + eps)``.

    ``row_mean_sq`` ``(U,)`` replaces ``mean(g^2)`` when ``grads`` are only some
    columns of each row (a column-sharded table: the mean is over the whole row).
    """
    mean_sq = grads.square().mean(dim=1) if row_mean_sq is None else row_mean_sq  # (U,)
    s = state_sum.index_select(0, rows) + mean_sq  # (U,)
    state_sum.index_copy_(0, rows, s)
    p = table.index_select(0, rows).float()  # (U, d)
    p = p * (1 - lr * weight_decay) - (lr / (s.sqrt() + eps)).unsqueeze(1) * grads
    table.index_copy_(0, rows, p.to(table.dtype))


@torch.no_grad()
def adagrad_update(
    table: torch.Tensor, state_sum: torch.Tensor, grad: Grad, lr: float, eps: float = 1e-8, weight_decay: float = 0.0,
    row_sum_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, row_width: int | None = None,
) -> None:
    """Row-wise Adagrad (one float32 state per row, as FBGEMM's embedding tables).

    For a column shard of a table, ``row_sum_reduce`` sums each touched row's
    ``sum(g^2)`` over the shards and ``row_width`` is the whole row's width,
    so that every shard applies the accumulator of the whole row.
    """
    if state_sum.dtype != torch.float32 or state_sum.shape != table.shape[:1]:
        raise ValueError(f"row-wise Adagrad state must be float32 of shape ({table.shape[0]},), got {state_sum.dtype} {tuple(state_sum.shape)}")
    _check_grad(table, grad)
    if row_sum_reduce is not None:
        rows, grads = _rows(grad)
        mean_sq = row_sum_reduce(grads.square().sum(dim=1)) / (row_width or table.shape[1])  # (U,)
        adagrad_reference(table, state_sum, rows, grads, lr, eps, weight_decay, mean_sq)
    elif _fused(table, grad, state_sum):
        _launch("adagrad", (table.dtype,), grad, (table, state_sum), (lr, eps, weight_decay))
    else:
        adagrad_reference(table, state_sum, *_rows(grad), lr, eps, weight_decay)


@torch.no_grad()
def adam_reference(
    table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
    rows: torch.Tensor, grads: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """AdamW on ``rows`` with per-row step counts (torch's AdamW arithmetic, row by row)."""
    t = steps.index_select(0, rows) + 1  # (U,)
    steps.index_copy_(0, rows, t)
    tf = t.float().unsqueeze(1)  # (U, 1)
    m = exp_avg.index_select(0, rows).float() * beta1 + (1 - beta1) * grads  # (U, d)
    v = exp_avg_sq.index_select(0, rows).float() * beta2 + (1 - beta2) * grads.square()  # (U, d)
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
    step_size = lr / (1 - beta1**tf)  # (U, 1)
    root_bc2 = torch.sqrt(1 - beta2**tf)  # (U, 1)
    p = table.index_select(0, rows).float() * (1 - lr * weight_decay)
    p = p - step_size * m / (v.sqrt() / root_bc2 + eps)
    table.index_copy_(0, rows, p.to(table.dtype))


@torch.no_grad()
def adam_update(
    table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor, grad: Grad,
    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
) -> None:
    """Row-sparse AdamW with a per-row step count, so a row first touched at step 1000
    gets the bias correction of its own first step."""
    if steps.dtype != torch.int32 or exp_avg.dtype != exp_avg_sq.dtype:
        raise ValueError("Adam state: steps must be int32 and both moments the same dtype")
    if exp_avg.shape != table.shape or exp_avg_sq.shape != table.shape or steps.shape != table.shape[:1]:
        raise ValueError(
            f"Adam state of a {tuple(table.shape)} table must be moments of that shape and ({table.shape[0]},) steps, "
            f"got {tuple(exp_avg.shape)}, {tuple(exp_avg_sq.shape)}, {tuple(steps.shape)}"
        )
    _check_grad(table, grad)
    if _fused(table, grad, exp_avg, exp_avg_sq, steps):
        _launch("adam", (table.dtype, exp_avg.dtype), grad, (table, exp_avg, exp_avg_sq, steps),
                (lr, beta1, beta2, eps, weight_decay))
    else:
        adam_reference(table, exp_avg, exp_avg_sq, steps, *_rows(grad), lr, beta1, beta2, eps, weight_decay)


def restrict_rows(grad: Grad, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` on the rows of ``keep`` (any order; rows it lacks are skipped) as ``(rows, grads)``:
    the form that updates those rows and leaves every other row untouched."""
    rows, grads = _rows(grad)
    mask = torch.isin(rows, keep.to(rows.device))  # (U,)
    return rows[mask], grads[mask]


def dense_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense table gradient as ``(rows, grads)``: the rows with any nonzero entry."""
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)  # (U,)
    return rows, grad.index_select(0, rows).float()

