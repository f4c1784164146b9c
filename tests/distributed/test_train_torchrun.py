"""`memlayers train` under torchrun (gloo, 2 ranks) against one process on the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from memlayers.train.checkpoint import CheckpointError, load_checkpoint
from memlayers.train.metrics import read_metrics
from memlayers.train.sharded_checkpoint import export_checkpoint, shard_checkpoint
from memlayers.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from conftest import build_config, tiny_config_dict  # noqa: E402


def torchrun_train(config_file: Path, overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
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
        ["parallel.memory_parallel=2", "optim.value_optimizer=row_adagrad"],
    ],
    ids=["mp2-adamw", "mp2-row-adamw-clipped", "dp2-row-adamw-accum", "mp2-row-adagrad"],
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
    # the ranks' sharded checkpoint, consolidated, holds the one-process run's weights and optimizer state
    exported = export_checkpoint(tmp_path / "ranks", tmp_path / "exported")
    for name in ("model.safetensors", "optimizer.safetensors"):
        single_tensors = load_file(Path(summary["checkpoint"]) / name)
        rank_tensors = load_file(exported / name)
        assert single_tensors.keys() == rank_tensors.keys()
        for key, tensor in single_tensors.items():
            assert rank_tensors[key].dtype == tensor.dtype, key
            torch.testing.assert_close(rank_tensors[key], tensor, atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.multiprocess
def test_a_distributed_resume_from_a_single_process_checkpoint_says_what_to_do(tmp_path):
    Trainer(build_config(tmp_path / "run", ["train.steps=2"])).fit(progress=False)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run")))
    run = torchrun_train(config_file, ["train.steps=4", "--resume"])
    assert run.returncode != 0
    assert "is a single-process checkpoint; a distributed run resumes from sharded ones" in run.stderr
    assert "memlayers shard" in run.stderr


def test_config_checks_the_parallel_section(tmp_path):
    from memlayers.config import ConfigError

    with pytest.raises(ConfigError, match=r"^parallel.memory_parallel: must be >= 1"):
        build_config(tmp_path, ["parallel.memory_parallel=0"])
    with pytest.raises(ConfigError, match=r"^parallel.timeout_s: must be > 0"):
        build_config(tmp_path, ["parallel.timeout_s=0"])
    assert build_config(tmp_path, ["parallel.memory_parallel=2"]).parallel.memory_parallel == 2


def trimmed_copy(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of a run directory as if it had crashed after its step ``keep_step`` checkpoint."""
    import shutil

    shutil.copytree(src, dst)
    for checkpoint in (dst / "checkpoints").iterdir():
        if int(checkpoint.name.split("_")[1]) > keep_step:
            shutil.rmtree(checkpoint)
    return dst


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sharded_checkpoints_resume_on_two_and_four_ranks_and_in_one_process(tmp_path):
    settings = ["train.steps=4", "train.checkpoint_every=2", "train.keep_last=5", "train.eval_qa=4", "train.threads=1",
                "parallel.memory_parallel=2", "optim.value_optimizer=row_adamw"]
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "straight")))
    run = torchrun_train(config_file, [*settings, "train.batch_size=4"])
    assert run.returncode == 0, run.stderr[-3000:]
    straight = losses(tmp_path / "straight")
    step2 = tmp_path / "straight" / "checkpoints" / "step_00000002"
    assert json.loads((step2 / "state.json").read_text())["sharded"] is True
    assert any(p.suffix == ".safetensors" for p in (step2 / "shards").iterdir())

    for name, nproc_batch in (("two", 4), ("four", 2)):
        run_dir = trimmed_copy(tmp_path / "straight", tmp_path / name, keep_step=2)
        config_file.write_text(yaml.safe_dump(tiny_config_dict(run_dir)))
        nproc = 8 // nproc_batch
        run = torchrun_train(config_file, [*settings, f"train.batch_size={nproc_batch}", "--resume"], nproc=nproc)
        assert run.returncode == 0, run.stderr[-3000:]
        resumed = losses(run_dir)
        assert [r["step"] for r in resumed] == [1, 2, 3, 4]
        for ra, rb in zip(straight, resumed, strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (name, ra["step"])

    one = trimmed_copy(tmp_path / "straight", tmp_path / "one", keep_step=2)
    config = build_config(one, [*settings, "train.batch_size=8"])
    trainer = Trainer(config, resume=True)
    assert trainer.step == 2
    trainer.fit(progress=False)
    for ra, rb in zip(straight, losses(one), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ("one", ra["step"])


def test_single_process_checkpoint_shards_and_consolidates_back_unchanged(tmp_path):
    config = build_config(tmp_path / "single", ["train.steps=2", "optim.value_optimizer=row_adamw", "optim.value_state_dtype=bfloat16"])
    trainer = Trainer(config)
    original = Path(trainer.fit(progress=False)["checkpoint"])
    sharded = shard_checkpoint(original, tmp_path / "sharded")
    assert json.loads((sharded / "state.json").read_text())["sharded"] is True
    with pytest.raises(CheckpointError, match="is a sharded checkpoint .*memlayers consolidate"):
        load_checkpoint(sharded, trainer.model)  # the single-process loader says what it is
    back = export_checkpoint(sharded, tmp_path / "back")
    shutil.copytree(tmp_path / "single" / "data", tmp_path / "back" / "data")  # a resumed run reads its world
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(original / name), load_file(back / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
    resumed = Trainer(build_config(tmp_path / "back", ["train.steps=3", "optim.value_optimizer=row_adamw",
                                                       "optim.value_state_dtype=bfloat16"]), resume=True)
    assert resumed.step == 2
