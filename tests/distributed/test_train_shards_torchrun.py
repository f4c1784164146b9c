"""Streaming from token shards under torchrun (gloo, 2 ranks): each rank reads only its own
half of every global batch, and the run follows one process training on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memlayers.train.metrics import read_metrics
from memlayers.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_trainer_shards import make_shards  # noqa: E402

from conftest import build_config, tiny_config_dict  # noqa: E402


@pytest.mark.multiprocess
def test_two_ranks_on_shards_train_like_one_process(tmp_path):
    shards = make_shards(tmp_path)
    settings = [f"data.shards={shards}", "train.steps=4", "train.eval_qa=0", "train.threads=1",
                "optim.value_optimizer=row_adamw"]
    single = build_config(tmp_path / "single", [*settings, "train.batch_size=8"])
    Trainer(single).fit(progress=False)

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "ranks")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "memlayers.cli", "train", str(config_file), *settings, "train.batch_size=4"],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    a = [r for r in read_metrics(single.train.out_dir) if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "ranks") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["tokens"] == ra["tokens"]  # the global batch's tokens, counted over both ranks
        for key in ("loss", "grad_norm", "value_grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
