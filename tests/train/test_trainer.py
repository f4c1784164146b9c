"""The training loop: overfitting, exact resume, NaN guard, periodic evaluation, data errors."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from memlayers.config import ConfigError
from memlayers.data.packing import BatchIterator, DocumentBatchIterator
from memlayers.data.text import DataError
from memlayers.device import pick_device
from memlayers.model.accounting import count_flops, count_parameters
from memlayers.model.transformer import Transformer
from memlayers.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from memlayers.train.metrics import read_metrics
from memlayers.train.optim import lr_factor
from memlayers.train.trainer import Trainer, TrainingError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the shared helpers
from conftest import EXACT_KEYS, Crash, crash_at  # noqa: E402


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "heldout_loss" in r or "qa_em" in r]


def test_overfits_one_fixed_batch(make_config):
    config = make_config(
        "data.facts.n_people=8",
        "data.facts.heldout_people=0",
        "train.steps=40",
        "train.warmup_steps=0",
        "train.schedule=constant",
        "optim.lr=1e-2",
        "optim.weight_decay=0",
    )
    trainer = Trainer(config)
    assert isinstance(trainer.batches, DocumentBatchIterator)  # re-packed every epoch by default
    rows = trainer.batches.epoch_rows()[:4]  # (4, seq_len + 1): one batch, every step
    trainer.batches = BatchIterator(rows, 4, seed=0)
    trainer.fit(progress=False)
    losses = [r["loss"] for r in train_records(trainer.run_dir)]
    assert len(losses) == 40
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] > 0.8 * math.log(trainer.data.tokenizer.vocab_size)  # starts near uniform
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        # a small world and big batches: the run crosses epochs, two micro-batches per step
        (
            "data.facts.n_people=4",
            "data.facts.heldout_people=1",
            "train.batch_size=8",
            "train.grad_accum=2",
        ),
        # rows packed once instead of re-packed every epoch
        ("data.facts.n_people=4", "data.facts.heldout_people=1", "train.batch_size=8", "data.repack=false"),
        # row-sparse value optimizers: per-row state and row gradients resume exactly too
        (
            "data.facts.n_people=4",
            "data.facts.heldout_people=1",
            "train.batch_size=8",
            "train.grad_accum=2",
            "optim.value_optimizer=row_adamw",
            "optim.value_state_dtype=bfloat16",
        ),
        ("optim.value_optimizer=row_adagrad", "optim.value_grad_clip=0.01", "model.memory.value_dtype=bfloat16"),
    ],
    ids=["one-epoch", "epochs-and-grad-accum", "fixed-packing", "row-adamw-bf16-state", "row-adagrad-clipped-bf16-values"],
)
def test_resume_after_crash_is_exact(make_config, overrides):
    settings = (
        "train.steps=8",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.keep_last=5",
        *overrides,
    )
    straight = Trainer(make_config(*settings, name="straight"))
    straight.fit(progress=False)

    crashed_config = make_config(*settings, name="crashed")
    with pytest.raises(Crash):
        # dies during step 6: after the step-4 checkpoint, with step 5 already in metrics.jsonl
        Trainer(crashed_config).fit(progress=False, on_step=crash_at(6))
    assert max(r["step"] for r in read_metrics(crashed_config.train.out_dir)) == 5
    assert [p.name for p in list_checkpoints(crashed_config.train.out_dir)] == ["step_00000004"]

    resumed = Trainer(crashed_config, resume=True)
    assert resumed.step == 4
    summary = resumed.fit(progress=False)
    assert summary["step"] == 8

    a, b = train_records(straight.run_dir), train_records(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(1, 9))  # one run: no duplicate, no missing step
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in EXACT_KEYS} == {k: rb[k] for k in EXACT_KEYS}, ra["step"]
    assert eval_records(straight.run_dir) == eval_records(resumed.run_dir)

    final_a = Path(straight.run_dir) / "checkpoints" / "step_00000008"
    final_b = Path(resumed.run_dir) / "checkpoints" / "step_00000008"
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(final_a / name), load_file(final_b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)
    for pa, pb in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_continues_metrics_log_and_tokens(make_config):
    config = make_config("train.steps=6", "train.checkpoint_every=3", "train.log_every=1")
    with pytest.raises(Crash):
        Trainer(config).fit(progress=False, on_step=crash_at(5))
    # steps 4 was logged before the crash, but the run resumes from step 3
    assert max(r["step"] for r in read_metrics(config.train.out_dir)) == 4
    resumed = Trainer(config, resume=True)
    assert max(r["step"] for r in read_metrics(config.train.out_dir)) == 3
    assert resumed.tokens_seen == 3 * 4 * 32
    resumed.fit(progress=False)
    records = train_records(resumed.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in records] == [s * 4 * 32 for s in range(1, 7)]


def test_resume_without_checkpoint_is_a_checkpoint_error(make_config):
    config = make_config()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(config, resume=True)


def test_resume_with_another_model_is_refused_with_the_differing_keys(make_config):
    config = make_config("train.steps=2")
    Trainer(config).fit(progress=False)
    other = make_config("train.steps=4", "model.memory_layers=[]", "model.dim=48")  # same out_dir
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000002") as info:
        Trainer(other, resume=True)
    message = str(info.value)
    assert "model.memory_layers (checkpoint [1], now [])" in message
    assert "model.dim (checkpoint 32, now 48)" in message
    assert "train.steps" not in message  # a key that may change
    assert len(message.splitlines()) == 1


def test_loading_into_another_model_is_a_checkpoint_error(make_config):
    trainer = Trainer(make_config("train.steps=2"))
    checkpoint = trainer.fit(progress=False)["checkpoint"]
    other = Transformer(dataclasses.replace(trainer.config.model, memory_layers=()))
    with pytest.raises(CheckpointError, match="does not fit") as info:
        load_checkpoint(checkpoint, other)
    message = str(info.value)
    # names (the first few of) the keys on each side
    assert "missing: layers.1.ffn.w3.weight" in message
    assert "unexpected: layers.1.ffn.search.keys" in message
    assert len(message.splitlines()) == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make_config):
    config = make_config("train.steps=8", "train.checkpoint_every=2", "train.log_every=1")
    trainer = Trainer(config)

    def poison(module, inputs, output):
        return output * float("nan") if trainer.step == 2 else output  # during step 3

    handle = trainer.model.output.register_forward_hook(poison)
    with pytest.raises(TrainingError) as info:
        trainer.fit(progress=False)
    message = str(info.value)
    assert "nan" in message.lower() and "step 3" in message
    assert "step_00000002" in message  # names the last good checkpoint
    assert len(message.splitlines()) == 1

    run_dir = Path(config.train.out_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert max(r["step"] for r in read_metrics(run_dir)) == 2
    assert trainer.step == 2

    # the poisoned step changed nothing: the live weights are still those of step 2
    fresh = Transformer(trainer.config.model)
    checkpoint = load_checkpoint(run_dir, fresh)
    assert checkpoint.step == 2
    for (name, live), saved in zip(
        trainer.model.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(live, saved), name
    assert all(p.grad is None for p in trainer.model.parameters())

    # and the run can go on from there
    handle.remove()
    summary = Trainer(config, resume=True).fit(progress=False)
    assert summary["step"] == 8
    assert all(math.isfinite(r["loss"]) for r in train_records(run_dir))


def test_nan_before_any_checkpoint_says_so(make_config):
    config = make_config("train.steps=4", "train.checkpoint_every=2")
    trainer = Trainer(config)
    trainer.model.output.register_forward_hook(lambda m, i, out: out * float("inf"))
    with pytest.raises(TrainingError, match=r"step 1\b.*no checkpoint was written"):
        trainer.fit(progress=False)
    assert list_checkpoints(config.train.out_dir) == []


def test_periodic_evaluation_and_usage_stats(make_config):
    config = make_config(
        "train.steps=6", "train.eval_every=2", "train.log_every=3", "train.track_usage=true"
    )
    summary = Trainer(config).fit(progress=False)
    records = read_metrics(config.train.out_dir)
    evals = [r for r in records if "heldout_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]  # periodic, then the final evaluation
    for r in evals:
        assert {"heldout_loss", "heldout_ppl", "qa_em", "answer_nll"} <= r.keys()
        assert 0.0 <= r["qa_em"] <= 1.0 and r["answer_nll"] > 0
        assert r["heldout_ppl"] == pytest.approx(math.exp(r["heldout_loss"]))
    assert evals[-1]["answer_nll"] == summary["answer_nll"]
    train = train_records(config.train.out_dir)
    assert [r["step"] for r in train] == [3, 6]
    for r in train:
        # the memory layer is block 1 of 2: keys carry the block index
        assert 0.0 < r["memory1/coverage"] <= 1.0
        assert r["memory1/kl_uniform"] >= 0.0
        assert not any(k.startswith("memory0/") for k in r)


def test_usage_stats_off(make_config):
    config = make_config("train.steps=2", "train.track_usage=false")
    trainer = Trainer(config)
    trainer.fit(progress=False)
    assert all(layer.usage is None for layer in trainer.model.memory_layers())
    assert not any(k.startswith("memory") for r in read_metrics(config.train.out_dir) for k in r)


def test_logged_learning_rate_follows_the_schedule(make_config):
    config = make_config(
        "train.steps=10", "train.warmup_steps=3", "train.schedule=linear", "train.min_lr_ratio=0.2"
    )
    trainer = Trainer(config)
    trainer.fit(progress=False)
    lrs = [r["lr"] for r in train_records(config.train.out_dir)]
    expected = [lr_factor(s, 10, 3, "linear", 0.2) * config.optim.lr for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    last = lr_factor(9, 10, 3, "linear", 0.2)
    assert groups["values"] == pytest.approx(last * config.optim.value_lr)
    assert groups["decay"] == pytest.approx(last * config.optim.lr)


def test_fit_summary_config_and_files(make_config):
    config = make_config("train.steps=3")
    trainer = Trainer(config)
    vocab = trainer.data.tokenizer.vocab_size
    assert trainer.config.model.vocab_size == vocab  # the model's vocabulary is the tokenizer's
    summary = trainer.fit(progress=False)
    model_config = trainer.config.model
    assert (
        summary["params"]
        == count_parameters(model_config).total
        == sum(p.numel() for p in trainer.model.parameters())
    )
    assert summary["active_params"] == count_parameters(model_config).active
    assert summary["flops_per_token"] == count_flops(model_config, config.data.seq_len).total
    assert summary["step"] == 3 and summary["tokens_per_s"] > 0
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint == Path(config.train.out_dir) / "checkpoints" / "step_00000003"
    assert {"model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    saved = yaml.safe_load((Path(config.train.out_dir) / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == vocab
    assert saved["train"]["steps"] == 3
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3 and state["tokens_seen"] == 3 * 4 * 32


def test_grad_accumulation_counts_tokens(make_config):
    config = make_config("train.steps=2", "train.grad_accum=3", "train.batch_size=2")
    trainer = Trainer(config)
    trainer.fit(progress=False)
    assert trainer.tokens_seen == 2 * 3 * 2 * 32
    assert trainer.batches.state_dict()["position"] == 2 * 3 * 2


def test_text_files_without_qa(make_config, tmp_path):
    rng = random.Random(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "market",
        "paper",
        "light",
    ]
    paragraphs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(12)]
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(paragraphs[:10]))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(paragraphs[10:]))
    config = make_config("train.steps=2", f"data.train={train}", f"data.heldout={heldout}")
    summary = Trainer(config).fit(progress=False)
    assert math.isfinite(summary["heldout_loss"])
    assert "qa_em" not in summary
    assert not (Path(config.train.out_dir) / "data").exists()  # no fact world generated


def test_missing_training_file_is_a_data_error(make_config, tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DataError) as info:
        Trainer(make_config(f"data.train={missing}"))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_bad_jsonl_line_is_a_data_error(make_config, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        '{"text": "Ada was born in London."}\n{"text": "Bo studied law."}\n{"text": broken\n'
    )
    with pytest.raises(DataError) as info:
        Trainer(make_config(f"data.train={train}"))
    message = str(info.value)
    assert str(train) in message and "line 3" in message and len(message.splitlines()) == 1


def test_bad_qa_file_is_a_data_error(make_config, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who?", "answer": "Ada"}\n{"question": "Where?"}\n')
    with pytest.raises(DataError) as info:
        Trainer(make_config(f"data.qa={qa}"))
    assert (
        str(qa) in str(info.value) and "line 2" in str(info.value) and "answer" in str(info.value)
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error_naming_train_device():
    with pytest.raises(ConfigError, match=r"^train\.device: cuda asked for, but no CUDA device is available; use cpu$"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


def test_bfloat16_value_pool_trains_and_checkpoints_in_bfloat16(make_config):
    config = make_config("model.memory.value_dtype=bfloat16", "optim.value_optimizer=row_adagrad", "train.steps=3")
    trainer = Trainer(config)
    values = trainer.model.memory_pool.values
    before = values.detach().clone()
    assert values.dtype == torch.bfloat16
    summary = trainer.fit(progress=False)
    assert math.isfinite(summary["heldout_loss"])
    assert (values.detach() != before).any(dim=1).sum() > 0
    saved = load_file(Path(summary["checkpoint"]) / "model.safetensors")
    assert saved["memory_pool.values"].dtype == torch.bfloat16
    assert saved["layers.0.attention.wq.weight"].dtype == torch.float32
