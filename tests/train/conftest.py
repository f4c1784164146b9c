"""Shared fixtures for the training tests: a tiny RunConfig writing under tmp_path.

Every config here keeps shapes tiny and runs torch on one thread
(``train.threads=1``): the suite shares two cores with other work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memlayers.bench.reliability import TINY_RUN
from memlayers.config import apply_overrides, from_dict
from memlayers.train.config import RunConfig


def tiny_config_dict(out_dir: Path) -> dict[str, Any]:
    """A tiny model with one Memory+ layer (layer 1 of 2) on a fact world of 30 people."""
    return {**TINY_RUN, "train": {**TINY_RUN["train"], "out_dir": str(out_dir)}}


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


EXACT_KEYS = ("loss", "lr", "grad_norm", "value_grad_norm", "tokens")
"""Per-step values that an exactly resumed run must reproduce bit for bit."""


class Crash(Exception):
    """Stands in for the process dying in the middle of a run."""


def crash_at(step: int) -> Callable[[int], None]:
    """An ``on_step`` callback that raises :class:`Crash` after step ``step``."""

    def on_step(current: int) -> None:
        if current == step:
            raise Crash(f"simulated crash after step {current}")

    return on_step
