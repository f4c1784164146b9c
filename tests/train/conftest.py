"""Shared fixtures for the training tests: a tiny RunConfig writing under tmp_path.

Every config here keeps shapes tiny and runs torch on one thread
(``train.threads=1``): the suite shares two cores with other work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memlayers.config import apply_overrides, from_dict
from memlayers.train.config import RunConfig


def tiny_config_dict(out_dir: Path) -> dict[str, Any]:
    """A tiny model with one Memory+ layer (layer 1 of 2) on a fact world of 30 people."""
    return {
        "model": {
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "multiple_of": 16,
            "max_seq_len": 32,
            "memory_layers": [1],
            "memory": {"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
        },
        "optim": {"lr": 3.0e-3, "value_lr": 1.0e-2},
        "data": {
            "vocab_size": 300,
            "seq_len": 32,
            "facts": {"n_people": 30, "heldout_people": 5, "bios_per_person": 1},
        },
        "train": {
            "out_dir": str(out_dir),
            "steps": 8,
            "batch_size": 4,
            "warmup_steps": 2,
            "device": "cpu",
            "threads": 1,
            "log_every": 1,
            "eval_every": 0,
            "eval_qa": 10,
            "eval_batches": 2,
            "checkpoint_every": 0,
            "keep_last": 2,
        },
    }


def build_config(out_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """The tiny config with dotted ``key=value`` overrides (``train.threads`` stays 1)."""
    data = apply_overrides(tiny_config_dict(out_dir), list(overrides))
    config = from_dict(RunConfig, data)
    assert config.train.threads == 1
    return config


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """``make_config(*overrides, name="run")``: a tiny RunConfig writing to ``tmp_path/name``."""

    def make(*overrides: str, name: str = "run") -> RunConfig:
        return build_config(tmp_path / name, list(overrides))

    return make
