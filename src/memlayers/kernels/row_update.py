"""Row-sparse optimizer updates: only the touched rows of a table are read and written.

Each update takes the table, its optimizer state and the gradient, either a
:class:`~memlayers.kernels.embedding_bag.RowGrad` or explicit ``(rows, grads)``,
checks that they fit together, and hands them to the backend that made the
gradient (:mod:`memlayers.kernels.backends`): the C backend reduces a
``RowGrad`` and applies it in one fused pass per row; the reference
(:mod:`memlayers.kernels.backends.torch_ops`, any device) writes the gradient
rows out and applies the same arithmetic with torch ops. Explicit
``(rows, grads)`` always take the reference.

All arithmetic is float32; tables and states may be float32 or bfloat16 and
are rounded once when stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memlayers.kernels.backends import TorchOps
from memlayers.kernels.backends.torch_ops import adagrad_reference, rows_of
from memlayers.kernels.embedding_bag import RowGrad
from memlayers.kernels.lookups import check_ids

Grad = RowGrad | tuple[torch.Tensor, torch.Tensor]


def _ops(grad: Grad):
    """The backend that applies ``grad``: the one that recorded a ``RowGrad``, else the reference."""
    return grad.ops if isinstance(grad, RowGrad) else TorchOps


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


@torch.no_grad()
def sgd_update(table: torch.Tensor, grad: Grad, lr: float, weight_decay: float = 0.0) -> None:
    """Row-sparse SGD with decoupled weight decay: ``p = p * (1 - lr * wd) - lr * g``."""
    _check_grad(table, grad)
    _ops(grad).sgd(table, grad, lr, weight_decay)


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
        rows, grads = rows_of(grad)
        mean_sq = row_sum_reduce(grads.square().sum(dim=1)) / (row_width or table.shape[1])  # (U,)
        adagrad_reference(table, state_sum, rows, grads, lr, eps, weight_decay, mean_sq)
    else:
        _ops(grad).adagrad(table, state_sum, grad, lr, eps, weight_decay)


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
    _ops(grad).adam(table, exp_avg, exp_avg_sq, steps, grad, lr, beta1, beta2, eps, weight_decay)


def restrict_rows(grad: Grad, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` on the rows of ``keep`` (any order; rows it lacks are skipped) as ``(rows, grads)``:
    the form that updates those rows and leaves every other row untouched."""
    rows, grads = rows_of(grad)
    mask = torch.isin(rows, keep.to(rows.device))  # (U,)
    return rows[mask], grads[mask]


def dense_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense table gradient as ``(rows, grads)``: the rows with any nonzero entry."""
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)  # (U,)
    return rows, grad.index_select(0, rows).float()
