"""Optimizer groups chosen by parameter name, per-group gradient clipping, the LR schedule.

The paper trains memory values with their own learning rate (1e-3 against
1e-4 for the rest) and clips their gradients separately. Parameters are put
in three named groups:

    values    the memory pools' tables (names ending in ``pool.values`` or,
              for PEER, ``pool.up``): ``value_lr``, ``value_weight_decay``,
              clipped to ``value_grad_clip``;
    experts   the stacked expert weights of a MoE (``w1``, ``w2``, ``w3``
              held as parameters, not linear layers): ``expert_lr`` (``lr``
              when null), ``weight_decay``; so that a MoE baseline is tuned
              over as many learning rates as a memory model;
    decay     every other matrix (2-D or more): ``lr``, ``weight_decay``;
    no_decay  vectors (norm gains, biases): ``lr``, no weight decay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from memlayers.config import check
from memlayers.kernels.embedding_bag import row_grad_of
from memlayers.train.row_optim import ROW_OPTIMIZERS, RowAdagrad, RowAdamW

VALUE_PARAM = re.compile(r"(^|\.)(memory_pool|pool)\.(values|up)$")
EXPERT_PARAM = re.compile(r"(^|\.)w[123]$")
"""A MoE's stacked expert weights; a dense FFN's are ``w1.weight``, never matched."""


@dataclass
class OptimConfig:
    """AdamW settings, with separate ones for the memory values."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    """Max global grad norm of all non-value parameters; null disables."""
    value_lr: float = 1e-3
    expert_lr: float | None = None
    """Learning rate of a MoE's expert weights; null: ``lr``."""
    value_weight_decay: float = 0.0
    value_grad_clip: float | None = 1.0
    """Max grad norm of the value tables alone; null disables."""
    value_optimizer: Literal["adamw", "row_adamw", "row_adagrad", "row_sgd"] = "adamw"
    """adamw: torch's dense AdamW (every row, every step, as the paper); row_*: row-sparse
    optimizers that update only the rows a step touches (see memlayers.train.row_optim)."""
    value_state_dtype: Literal["float32", "bfloat16"] = "float32"
    """Moment dtype of row_adamw (bfloat16 halves its state)."""

    def __post_init__(self) -> None:
        for name in ("lr", "value_lr", "eps"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.expert_lr is None or self.expert_lr > 0, "expert_lr", f"must be > 0 or null (= lr), got {self.expert_lr}")
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "value_weight_decay"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("grad_clip", "value_grad_clip"):
            value = getattr(self, name)
            check(value is None or value > 0, name, f"must be > 0 or null (no clipping), got {value}")


def is_value_param(name: str) -> bool:
    """True for the parameters of a memory value pool."""
    return VALUE_PARAM.search(name) is not None


def peak_lr(config: OptimConfig, group: str) -> float:
    """The learning rate of parameter group ``group`` before the schedule's factor."""
    if group == "values":
        return config.value_lr
    if group == "experts" and config.expert_lr is not None:
        return config.expert_lr
    return config.lr


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """The ``values`` / ``experts`` / ``decay`` / ``no_decay`` groups (empty ones left out)."""
    groups = {
        "values": {"params": [], "weight_decay": config.value_weight_decay},
        "experts": {"params": [], "weight_decay": config.weight_decay},
        "decay": {"params": [], "weight_decay": config.weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_value_param(name):
            key = "values"
        elif EXPERT_PARAM.search(name) is not None and param.dim() == 3:
            key = "experts"
        elif param.dim() >= 2:
            key = "decay"
        else:
            key = "no_decay"
        groups[key]["params"].append(param)
    return [{"name": name, "lr": peak_lr(config, name), **group} for name, group in groups.items() if group["params"]]


class ChainedOptimizer:
    """Several torch optimizers stepped as one: AdamW for the model, a row-sparse one for the values.

    ``param_groups`` lists every child's live groups (so a schedule can set
    ``lr`` on them) and ``state`` merges their states for reading.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        """Every child's parameter groups, in order."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        """Per-parameter state of all children (a merged copy: write through the children)."""
        return {param: state for optimizer in self.optimizers for param, state in optimizer.state.items()}

    def step(self) -> None:
        """Step every child."""
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every child's gradients (row gradients included)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def uses_row_grads(config: OptimConfig) -> bool:
    """True when the value tables are trained by a row-sparse optimizer (so reads should
    leave their gradient as rows, ``table_grad="rows"``)."""
    return config.value_optimizer in ROW_OPTIMIZERS


def _adamw(groups: list[dict], config: OptimConfig) -> torch.optim.AdamW:
    """torch's AdamW over ``groups``, fused (one kernel over all tensors: on the CPU about 3x
    faster than the default for-each step, 2026-12-03) where torch has the fused kernel."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=fused or None)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW | ChainedOptimizer:
    """AdamW over :func:`param_groups`, or AdamW for the model chained with the
    row-sparse ``value_optimizer`` for the value tables."""
    groups = param_groups(model, config)
    betas = (config.beta1, config.beta2)
    if not uses_row_grads(config):
        return _adamw(groups, config)
    values = [g for g in groups if g["name"] == "values"]
    rest = [g for g in groups if g["name"] != "values"]
    cls = ROW_OPTIMIZERS[config.value_optimizer]
    kwargs = {"lr": config.value_lr, "weight_decay": config.value_weight_decay}
    if cls is RowAdamW:
        kwargs.update(betas=betas, eps=config.eps, state_dtype=getattr(torch, config.value_state_dtype))
    elif cls is RowAdagrad:
        kwargs["eps"] = config.eps
    optimizers = [_adamw(rest, config)] if rest else []
    if values:
        optimizers.append(cls(values, **kwargs))
    return ChainedOptimizer(optimizers)


def clip_gradients(
    optimizer: torch.optim.Optimizer | ChainedOptimizer,
    config: OptimConfig,
    row_norm_reduce: Callable[[float], float] | None = None,
) -> dict[str, float]:
    """Clip the value tables and the rest separately; returns both norms before clipping.

    Value tables may hold their gradient as rows (``param.row_grad``); those
    are clipped by scaling, without writing the rows out. Under memory
    parallelism each rank holds a column slice of them: ``row_norm_reduce``
    sums their squared norms over the slices. Sharded (DTensor) gradients
    give their global norm by themselves.
    """
    values = [p for g in optimizer.param_groups if g.get("name") == "values" for p in g["params"]]
    others = [p for g in optimizer.param_groups if g.get("name") != "values" for p in g["params"]]
    norms = {}
    for key, params, limit in (("grad_norm", others, config.grad_clip), ("value_grad_norm", values, config.value_grad_clip)):
        dense = [p.grad for p in params if p.grad is not None]
        rows = [g for g in map(row_grad_of, params) if g is not None]
        if not dense and not rows:
            continue
        rows_sq = sum(g.sq_norm() for g in rows)
        if rows and row_norm_reduce is not None:
            rows_sq = row_norm_reduce(rows_sq)
        norm = math.sqrt(_norm(dense) ** 2 + rows_sq)
        if limit is not None:
            coef = min(1.0, limit / (norm + 1e-6))
            if coef < 1.0:
                if dense:
                    torch._foreach_mul_(dense, coef)
                for g in rows:
                    g.scale *= coef
        norms[key] = norm
    return norms


def _norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all ``grads`` together (sharded DTensor gradients: over all shards)."""
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly from 1/warmup to 1 over ``warmup_steps`` steps; then
    ``cosine`` and ``linear`` decay to ``min_ratio`` at ``total_steps`` and
    ``constant`` stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * shape
