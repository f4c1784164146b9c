"""`memlayers train` under torchrun (gloo, 2 ranks) against one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from memlayers.train.metrics import read_metrics
from memlayers.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from conftest import build_config, tiny_config_dict  # noqa: E402


def torchrun_train(config_file: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "memlayers.cli", "train", str(config_file), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def losses(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.memory_parallel=2"],
        ["parallel.memory_parallel=2", "optim.value_optimizer=row_adamw", "optim.value_grad_clip=0.01"],
        ["parallel.memory_parallel=1", "optim.value_optimizer=row_adamw", "train.grad_accum=2"],
    ],
    ids=["mp2-adamw", "mp2-row-adamw-clipped", "dp2-row-adamw-accum"],
)
def test_two_ranks_train_like_one_process_on_the_whole_batch(tmp_path, overrides):
    settings = ["train.steps=4", "train.eval_qa=4", "train.threads=1", *overrides]
    single = build_config(tmp_path / "single", [*settings, "train.batch_size=8"])
    summary = Trainer(single).fit(progress=False)

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "ranks")))
    run = torchrun_train(config_file, [*settings, "train.batch_size=4"])
    assert run.returncode == 0, run.stderr[-3000:]

    a, b = losses(Path(single.train.out_dir)), losses(tmp_path / "ranks")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # rank 0 alone logged
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "value_grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
        assert rb["tokens"] == ra["tokens"]
    single_weights = load_file(Path(summary["checkpoint"]) / "model.safetensors")
    rank_weights = load_file(tmp_path / "ranks" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert single_weights.keys() == rank_weights.keys()
    for key, tensor in single_weights.items():
        torch.testing.assert_close(rank_weights[key], tensor, atol=2e-5, rtol=1e-4, msg=key)


def test_resume_under_torchrun_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from memlayers.train.trainer import TrainingError

    with pytest.raises(TrainingError, match="needs sharded checkpoints"):
        Trainer(build_config(tmp_path / "run"), resume=True)


def test_config_rejects_row_adagrad_with_memory_parallelism(tmp_path):
    from memlayers.config import ConfigError

    with pytest.raises(ConfigError, match=r"^optim.value_optimizer: row_adagrad keeps one accumulator per whole row"):
        build_config(tmp_path, ["optim.value_optimizer=row_adagrad", "parallel.memory_parallel=2"])
    with pytest.raises(ConfigError, match=r"^parallel.memory_parallel: must be >= 1"):
        build_config(tmp_path, ["parallel.memory_parallel=0"])
    assert build_config(tmp_path, ["optim.value_optimizer=row_adamw", "parallel.memory_parallel=2"]).parallel.memory_parallel == 2
