"""Training: run configuration and optimizer groups."""

from memlayers.train.config import RunConfig
from memlayers.train.optim import (
    OptimConfig,
    build_optimizer,
    clip_gradients,
    is_value_param,
    param_groups,
)

__all__ = ["OptimConfig", "RunConfig", "build_optimizer", "clip_gradients", "is_value_param", "param_groups"]
