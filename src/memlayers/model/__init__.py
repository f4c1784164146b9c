"""The decoder LM: attention, dense FFN, MoE, blocks, config and accounting."""

from memlayers.model.accounting import FlopCounts, ParamCounts, count_flops, count_parameters
from memlayers.model.config import ModelConfig, MoEConfig
from memlayers.model.transformer import LMOutput, Transformer

__all__ = [
    "FlopCounts",
    "LMOutput",
    "ModelConfig",
    "MoEConfig",
    "ParamCounts",
    "Transformer",
    "count_flops",
    "count_parameters",
]
