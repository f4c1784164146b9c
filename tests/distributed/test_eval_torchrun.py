"""Evaluation of a sharded model under torchrun (gloo): the ranks stay in lockstep and give
one process's results, with uneven batches per rank and answers that end at different steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memlayers.train.metrics import read_metrics
from memlayers.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from conftest import build_config, tiny_config_dict  # noqa: E402

WORKER = Path(__file__).with_name("worker_eval.py")


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` with ``args`` (a script or ``-m module`` and its arguments)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 memory-parallel ranks saw (see worker_eval.py)."""
    out = tmp_path_factory.mktemp("eval")
    run = torchrun(2, str(WORKER), str(out), "2")
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiprocess
def test_the_qa_case_has_uneven_batches_and_answers_that_stop_at_different_steps(ranks):
    """Without lockstep this case deadlocks: the ranks run different numbers of forwards."""
    qa = ranks[0]["qa"]
    assert qa["batches"] % 2 == 1  # one rank has a batch more than the other
    pairs_of_rounds = list(zip(qa["steps"][0::2], qa["steps"][1::2], strict=False))
    assert any(a != b for a, b in pairs_of_rounds), qa["steps"]  # one rank's batch ends before the other's
    assert 0 < qa["cache_free_prompts"] < len(qa["one"][1])  # both the KV-cache and the re-run path
    assert 0 < qa["one"][0]["exact_match"] < 1


@pytest.mark.multiprocess
def test_qa_on_ranks_equals_one_process(ranks):
    for result in ranks:
        (one, one_predictions), (spread, spread_predictions) = result["qa"]["one"], result["qa"]["spread"]
        assert [p["prediction"] for p in spread_predictions] == [p["prediction"] for p in one_predictions]
        assert [p["correct"] for p in spread_predictions] == [p["correct"] for p in one_predictions]
        assert [p["nll"] for p in spread_predictions] == pytest.approx([p["nll"] for p in one_predictions], rel=1e-5)
        assert spread["exact_match"] == one["exact_match"]
        assert spread["answer_nll"] == pytest.approx(one["answer_nll"], rel=1e-5)
        assert spread["n"] == one["n"] == len(one_predictions)
    assert ranks[0]["qa"]["spread"] == ranks[1]["qa"]["spread"]  # every rank returns all results
    assert ranks[0]["qa"]["forwards"] == ranks[1]["qa"]["forwards"]  # in lockstep


@pytest.mark.multiprocess
def test_generate_with_different_prompts_per_rank_equals_one_process(ranks):
    lengths = set()
    for result in ranks:
        gen = result["generate"]
        assert gen["spread"] == gen["one"]
        assert gen["none"] == ([] if result["rank"] == 0 else gen["one"])
        lengths |= {len(ids) for ids in gen["one"]}
    assert [len(r["generate"]["one"]) for r in ranks] == [1, 2]
    assert ranks[0]["generate"]["forwards"] == ranks[1]["generate"]["forwards"]


@pytest.mark.multiprocess
def test_perplexity_with_uneven_batches_per_rank_equals_one_process(ranks):
    for result in ranks:
        one, spread = result["perplexity"]["one"], result["perplexity"]["spread"]
        assert spread["tokens"] == one["tokens"] == 5 * 12
        assert spread["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.multiprocess
def test_bad_input_on_one_rank_stops_every_rank_and_they_stay_in_step(ranks):
    first, last = ranks
    assert last["refused"]["generate"] == "prompt 0 is empty; a prompt needs at least one token"
    assert "refused on another rank" in first["refused"]["generate"]
    for result in ranks:
        assert "inputs differ between ranks" in result["refused"]["qa"]
        assert result["refused"]["after"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_under_torchrun_evaluates_like_one_process(tmp_path):
    """The end of `memlayers train` under torchrun with memory parallelism: the final evaluation
    finishes (it used to deadlock) with one process's held-out loss and QA scores."""
    settings = ["train.steps=2", "train.eval_qa=7", "train.eval_batches=0", "train.threads=1", "parallel.memory_parallel=2"]
    single = build_config(tmp_path / "single", [*settings, "train.batch_size=8"])
    Trainer(single).fit(progress=False)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "ranks")))
    run = torchrun(2, "-m", "memlayers.cli", "train", str(config_file), *settings, "train.batch_size=4",
                   "parallel.timeout_s=60")
    assert run.returncode == 0, run.stderr[-3000:]
    one, spread = read_metrics(Path(single.train.out_dir))[-1], read_metrics(tmp_path / "ranks")[-1]
    for key in ("heldout_loss", "answer_nll"):
        assert spread[key] == pytest.approx(one[key], rel=1e-4), key
    assert spread["qa_em"] == one["qa_em"]
