"""The reference backend: every operation of the seam from plain torch ops, on any device.

It is the ground truth the fast backends (C, Triton) are tested against, and
what runs where no fast kernel does (a GPU table's row updates, a bfloat16
gradient, a column shard whose Adagrad accumulator spans ranks).

The row updates are written out as formulas on the gathered rows: gather
the touched rows of the table and its state, update them in float32, and
write them back rounded once to the stored dtype. Weight decay is decoupled
(AdamW-style) and, like every other part of the update, applies to touched
rows only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlayers.kernels.lookups import fixed_offsets


def rows_of(grad) -> tuple[torch.Tensor, torch.Tensor]:
    """A row gradient (a ``RowGrad`` or explicit ``(rows, grads)``) as ``(rows (U,) int64, grads (U, d))``."""
    rows, grads = grad if isinstance(grad, tuple) else grad.rows()
    return rows.long(), grads  # index_select / index_copy_ take int64 rows


@torch.no_grad()
def sgd_reference(table: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``p = p * (1 - lr * wd) - lr * g`` on ``rows``."""
    p = table.index_select(0, rows).float()  # (U, d)
    table.index_copy_(0, rows, (p * (1 - lr * weight_decay) - lr * grads).to(table.dtype))


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


class TorchOps:
    """``F.embedding_bag`` and its per-sample-weight backward, and the reference row updates
    (any device, any float dtype)."""

    @staticmethod
    def bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """CSR weighted bags, float32 ``(len(offsets) - 1, d)``."""
        out = F.embedding_bag(
            ids, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype), include_last_offset=True
        )  # (S, d)
        return out.to(torch.promote_types(table.dtype, torch.float32))

    @staticmethod
    def bag_dot(table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out[b] . table[ids[b, k]]``, float32 ``(B, K)``."""
        B, K = ids.shape
        offsets = fixed_offsets(B, K, ids.device)[:-1]  # (B,)
        offset2bag = torch.arange(B, device=ids.device).repeat_interleave(K)  # (B*K,)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out.to(table.dtype), table, ids.reshape(-1), offsets, offset2bag, 0, -1
        )  # (B*K,)
        return out.to(torch.promote_types(table.dtype, torch.float32)).view(B, K)

    @staticmethod
    def sq_norm(grad) -> float:
        """Squared Frobenius norm of a ``RowGrad`` (scale included)."""
        return float(grad.rows()[1].double().square().sum())

    @staticmethod
    def sgd(table: torch.Tensor, grad, lr: float, weight_decay: float) -> None:
        """Row-sparse SGD on ``table`` (see :func:`sgd_reference`)."""
        sgd_reference(table, *rows_of(grad), lr, weight_decay)

    @staticmethod
    def adagrad(table: torch.Tensor, state_sum: torch.Tensor, grad, lr: float, eps: float, weight_decay: float) -> None:
        """Row-wise Adagrad on ``table`` (see :func:`adagrad_reference`)."""
        adagrad_reference(table, state_sum, *rows_of(grad), lr, eps, weight_decay)

    @staticmethod
    def adam(
        table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor, grad,
        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    ) -> None:
        """Row-sparse AdamW on ``table`` (see :func:`adam_reference`)."""
        adam_reference(table, exp_avg, exp_avg_sq, steps, *rows_of(grad), lr, beta1, beta2, eps, weight_decay)
