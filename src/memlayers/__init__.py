"""memlayers: language models with product-key memory layers (Memory Layers at Scale)."""

from memlayers.config import ConfigError, load_config
from memlayers.memory import MemoryConfig, MemoryLayer, MemoryPool, UsageTracker
from memlayers.model import ModelConfig, MoEConfig, Transformer, count_flops, count_parameters
from memlayers.train import OptimConfig, RunConfig, build_optimizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryPool",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "RunConfig",
    "Transformer",
    "UsageTracker",
    "build_optimizer",
    "count_flops",
    "count_parameters",
    "load_config",
]
