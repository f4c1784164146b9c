"""RunConfig: the root of a run's configuration (one YAML preset = one RunConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from memlayers.model.config import ModelConfig
from memlayers.train.optim import OptimConfig


@dataclass
class RunConfig:
    """Everything a run needs, filled from ``configs/*.yaml`` plus dotted overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
