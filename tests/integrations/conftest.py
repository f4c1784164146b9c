"""Fixtures for the integration tests: one tiny trained memlayers checkpoint per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from memlayers.train.trainer import Trainer


def _train_conftest():
    """tests/train/conftest.py, loaded under its own name (its tiny run config is reused here)."""
    path = Path(__file__).resolve().parents[1] / "train" / "conftest.py"
    spec = importlib.util.spec_from_file_location("memlayers_tests_train_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _train_conftest().build_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose latest checkpoint is a tiny model (one Memory+ layer,
    tied embeddings) trained for 30 steps on a 30-person fact world; it holds
    ``data/qa.jsonl``, ``checkpoints/step_00000030`` and ``tokenizer.json``."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    config = build_config(out, ["train.steps=30", "model.tie_embeddings=true", "train.eval_qa=5"])
    Trainer(config).fit()
    return out
