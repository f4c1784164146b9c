"""Row-sparse optimizers for memory value tables: a step costs what the touched rows cost.

Dense AdamW reads and writes every row of a value table every step (and keeps
two full-size moments), although a batch touches a small fraction of the
rows. These optimizers update only the rows a step's gradient touches:

- :class:`RowAdamW`: Adam moments per element, a step count per row (so a row
  first touched late gets the bias correction of its own first step); with
  every row touched every step it is exactly torch's AdamW;
- :class:`RowAdagrad`: one float32 accumulator per row (FBGEMM's row-wise
  Adagrad for embedding tables): about 4 bytes of state per row, not per value;
- :class:`RowSGD`: no state.

Each reads the gradient of a parameter from ``param.row_grad`` (the
``table_grad="rows"`` form written by :func:`memlayers.kernels.embedding_bag`)
or, failing that, from a dense ``param.grad`` (rows with a nonzero entry count
as touched). Moments can be kept in bfloat16 (``state_dtype``). They are
standard :class:`torch.optim.Optimizer` subclasses: ``state_dict()`` holds
their tensors, and memlayers checkpoints save them as safetensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memlayers.distributed.comm import sum_over
from memlayers.kernels import row_update
from memlayers.kernels.embedding_bag import RowGrad, row_grad_of


def local(param: torch.Tensor) -> torch.Tensor:
    """The tensor to update in place: a DTensor's local shard, or the parameter itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def _sum_over_shards(param: torch.Tensor):
    """For a table sharded over several ranks: a function summing a per-row tensor over them."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None or mesh.size() == 1:
        return None
    return sum_over(mesh.get_group())


def table_gradient(param: torch.Tensor) -> RowGrad | tuple[torch.Tensor, torch.Tensor] | None:
    """The gradient of a table parameter as rows, or None when it has none."""
    grad = row_grad_of(param)
    if grad is not None:
        return grad
    if param.grad is None:
        return None
    if param.grad.is_sparse:
        raise ValueError("row-sparse optimizers take dense or row gradients, not torch sparse tensors")
    return row_update.dense_rows(local(param.grad))


class _RowOptimizer(torch.optim.Optimizer):
    """Shared plumbing: 2-D parameters only, row gradients cleared by ``zero_grad``."""

    def __init__(self, params: Iterable, defaults: dict):
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"{type(self).__name__} updates tables (rows, dim); got a parameter of shape {tuple(p.shape)}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear dense gradients and row gradients."""
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.row_grad = None

    def _apply(self, group: dict, p: torch.Tensor, grad) -> None:
        raise NotImplementedError

    def _new_state(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of ``p`` (of its local shard when it is a DTensor), created as zeros if new."""
        state = self.state[p]
        if not state:
            state.update(self._new_state(local(p)))
        return state

    @torch.no_grad()
    def step(self, closure=None, only_rows: dict[int, torch.Tensor] | None = None):
        """Update the touched rows of every parameter that has a gradient.

        ``only_rows`` maps ``id(param)`` to the rows of that table that may change (sparse
        memory finetuning): its other touched rows are skipped, state included. A
        column-sharded table (a DTensor, under memory parallelism) is updated through its
        local shard, with state of the shard's shape.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                grad = table_gradient(p)
                if grad is not None and only_rows is not None and id(p) in only_rows:
                    grad = row_update.restrict_rows(grad, only_rows[id(p)])
                if grad is not None:
                    self._apply(group, p, grad)
        return loss


class RowSGD(_RowOptimizer):
    """SGD on the touched rows, with decoupled weight decay."""

    def __init__(self, params: Iterable, lr: float = 1e-2, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _apply(self, group: dict, p: torch.Tensor, grad) -> None:
        row_update.sgd_update(local(p), grad, group["lr"], group["weight_decay"])


class RowAdagrad(_RowOptimizer):
    """Row-wise Adagrad: one float32 accumulator of the mean squared gradient per row."""

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def _apply(self, group: dict, p: torch.Tensor, grad) -> None:
        state = self.init_state(p)
        reduce = _sum_over_shards(p)
        row_update.adagrad_update(
            local(p), state["sum"], grad, group["lr"], group["eps"], group["weight_decay"],
            row_sum_reduce=reduce, row_width=p.shape[1] if reduce else None,
        )

    def _new_state(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)}


class RowAdamW(_RowOptimizer):
    """AdamW on the touched rows, with a step count per row and moments in ``state_dtype``."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.float32,
    ):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype

    def _apply(self, group: dict, p: torch.Tensor, grad) -> None:
        state = self.init_state(p)
        beta1, beta2 = group["betas"]
        row_update.adam_update(
            local(p), state["exp_avg"], state["exp_avg_sq"], state["row_step"], grad,
            group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
        )

    def _new_state(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        zeros = {"dtype": self.state_dtype, "device": table.device}
        return {
            "exp_avg": torch.zeros(table.shape, **zeros),
            "exp_avg_sq": torch.zeros(table.shape, **zeros),
            "row_step": torch.zeros(table.shape[0], dtype=torch.int32, device=table.device),
        }


ROW_OPTIMIZERS = {"row_adamw": RowAdamW, "row_adagrad": RowAdagrad, "row_sgd": RowSGD}
