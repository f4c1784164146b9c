"""Shared helpers for the model tests: a factory of tiny ModelConfigs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from memlayers.memory.config import MemoryConfig
from memlayers.model import ModelConfig, MoEConfig


def make_tiny_config(**overrides) -> ModelConfig:
    """A tiny model config; ``memory={...}`` and ``moe={...}`` update the sub-configs."""
    memory = {"n_keys": 6, "heads": 2, "knn": 3, "k_dim": 8}
    memory.update(overrides.pop("memory", {}))
    moe = {"n_experts": 4, "top_k": 2, "hidden_dim": 8}
    moe.update(overrides.pop("moe", {}))
    fields = {
        "dim": 16,
        "n_layers": 2,
        "n_heads": 2,
        "vocab_size": 37,
        "max_seq_len": 12,
        "ffn_hidden_dim": 24,
        "init_std": 0.1,
    }
    fields.update(overrides)
    return ModelConfig(**fields, memory=MemoryConfig(**memory), moe=MoEConfig(**moe))


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    """The :func:`make_tiny_config` factory."""
    return make_tiny_config
