"""The demo: its presets, the suite's FLOP/parameter matching, and one end-to-end run at toy size."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from memlayers.config import ConfigError, from_dict, load_config, to_dict
from memlayers.data.tokenizer import Tokenizer
from memlayers.demo import DemoConfig, build_runs, demo_config, run_demo
from memlayers.demo.report import summary_lines
from memlayers.demo.runner import finished_summary
from memlayers.model.accounting import count_flops, count_parameters
from memlayers.train.checkpoint import read_state
from memlayers.train.checkpoint_write import write_state
from memlayers.train.config import DataConfig, RunConfig

KINDS = ["dense", "memory", "memory", "memory", "memory", "moe", "dense_big"]

# A toy version of the demo: 7 runs of 4 steps on a 30-person world, one torch thread per run.
TOY = [
    "facts.n_people=30",
    "facts.heldout_people=5",
    "facts.bios_per_person=1",
    "vocab_size=300",
    "seq_len=32",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.multiple_of=16",
    "memory.knn=4",
    "memory_layers=[1]",
    "memory_sizes=[4,8,16,32]",
    "big_dim=64",
    "big_layers=3",
    "train.steps=4",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "workers=2",
]


def flops(run, seq_len: int) -> float:
    return count_flops(run.config.model, seq_len).total


def check_matching(runs, seq_len: int) -> None:
    """The suite's promises: memory ~ dense FLOPs, MoE ~ largest memory, dense-big >= 4x dense."""
    assert [r.kind for r in runs] == KINDS
    dense, memory, moe, big = runs[0], runs[1:5], runs[5], runs[6]
    base = flops(dense, seq_len)
    for run in memory:
        assert abs(flops(run, seq_len) / base - 1) <= 0.10, run.name
    largest = max(memory, key=lambda r: r.memory_slots)
    target_params = count_parameters(largest.config.model)
    moe_params = count_parameters(moe.config.model)
    assert abs(moe_params.total / target_params.total - 1) <= 0.10
    assert abs(moe_params.active / target_params.active - 1) <= 0.10
    assert abs(flops(moe, seq_len) / flops(largest, seq_len) - 1) <= 0.10
    assert flops(big, seq_len) >= 4 * base
    # and the memory models really are bigger, in total but not in active parameters
    totals = [count_parameters(r.config.model).total for r in memory]
    assert totals == sorted(totals) and totals[-1] > 2 * count_parameters(dense.config.model).total


@pytest.mark.parametrize("quick", [False, True], ids=["demo", "demo_quick"])
def test_presets_load(quick):
    demo = demo_config(quick)
    assert isinstance(demo, DemoConfig)
    assert len(demo.memory_sizes) == 4 and list(demo.memory_sizes) == sorted(set(demo.memory_sizes))
    assert all(0 <= layer < demo.model.n_layers for layer in demo.memory_layers)
    assert demo.facts.heldout_people < demo.facts.n_people
    assert demo.train.steps > demo.train.warmup_steps
    assert demo == load_config(DemoConfig, "demo_quick" if quick else "demo")


@pytest.mark.parametrize("quick", [False, True], ids=["demo", "demo_quick"])
def test_build_runs_matches_flops_and_params_at_preset_size(quick, tmp_path):
    demo = demo_config(quick)
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    # the shared tokenizer has between 259 (specials + bytes) and vocab_size tokens
    for vocab in (259, demo.vocab_size // 2, demo.vocab_size):
        runs = build_runs(demo, data, str(tmp_path), vocab)
        check_matching(runs, demo.flops_tolerance)
        for run in runs:
            assert run.config.model.vocab_size == vocab
            assert run.config.model.max_seq_len == demo.seq_len


def test_build_runs_configs(tmp_path):
    demo = demo_config(True, ["memory_sizes=[64,8,16]", "memory.knn=16", "value_lr_exponent=0.5"])
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    runs = build_runs(demo, data, str(tmp_path), 700)
    assert [r.name for r in runs] == [
        "dense",
        "memory-8x8",
        "memory-16x16",
        "memory-64x64",
        "moe",
        "dense-big",
    ]
    assert [r.memory_slots for r in runs] == [0, 64, 256, 4096, 0, 0]
    for run in runs:
        train = run.config.train
        assert train.threads == 1
        assert Path(train.out_dir) == tmp_path / "runs" / run.name.split("x")[0]
        assert (train.steps, train.batch_size) == (
            demo.train.steps,
            demo.train.batch_size,
        )  # same tokens
        assert run.config.data == data
    dense, mem8, mem16, mem64, moe, big = (r.config for r in runs)
    assert dense.model.memory_layers == () and dense.model.moe_layers == ()
    assert [c.model.memory.n_keys for c in (mem8, mem16, mem64)] == [8, 16, 64]
    assert [c.model.memory.knn for c in (mem8, mem16, mem64)] == [8, 16, 16]  # knn <= n_keys
    assert all(c.model.memory_layers == demo.memory_layers for c in (mem8, mem16, mem64))
    assert moe.model.moe_layers == demo.memory_layers and moe.model.memory_layers == ()
    assert (big.model.dim, big.model.n_layers) == (demo.big_dim, demo.big_layers)
    # value_lr scales as (slots / largest) ** exponent
    memory_optim = demo.optim_for("memory")  # the preset's shared optim with memory's tuned rates
    assert mem64.optim.value_lr == pytest.approx(memory_optim.value_lr)
    assert mem8.optim.value_lr == pytest.approx(memory_optim.value_lr * (64 / 4096) ** 0.5)
    assert dense.optim == demo.optim_for("dense")


def test_duplicate_memory_sizes_do_not_share_a_run_directory(tmp_path):
    try:
        demo = demo_config(True, ["memory_sizes=[16,16,32]"])
    except ConfigError:
        return  # rejected up front: fine
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    out_dirs = [r.config.train.out_dir for r in build_runs(demo, data, str(tmp_path), 500)]
    assert len(set(out_dirs)) == len(out_dirs)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("workers=0", "workers"),
        ("memory_sizes=[]", "memory_sizes"),
        ("big_dim=66", "big_dim"),
        ("memory.knn=0", "memory.knn"),
        ("bogus=1", "bogus"),
    ],
)
def test_demo_config_errors(override, key):
    with pytest.raises(ConfigError) as info:
        demo_config(True, [override])
    assert str(info.value).startswith(key)


def test_preset_from_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("memory_sizes: [8, 16]\nworkers: 1\ntrain:\n  steps: 7\n")
    demo = demo_config(False, ["train.batch_size=3"], preset=str(path))
    assert demo.memory_sizes == (8, 16) and demo.workers == 1
    assert (demo.train.steps, demo.train.batch_size) == (7, 3)
    assert demo == load_config(DemoConfig, path, ["train.batch_size=3"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_run_demo_end_to_end(tmp_path):
    out_dir = tmp_path / "demo"
    results = run_demo(quick=True, out_dir=out_dir, overrides=[*TOY, "seeds=2"])

    # results.json: the returned dict, with the documented schema
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    runs = saved["runs"]
    assert [r["kind"] for r in runs] == KINDS
    assert [r["name"] for r in runs] == [
        "dense",
        "memory-4x4",
        "memory-8x8",
        "memory-16x16",
        "memory-32x32",
        "moe",
        "dense-big",
    ]
    fields = {
        "name",
        "kind",
        "memory_slots",
        "params",
        "memory_params",
        "active_params",
        "flops_per_token",
        "tokens_per_s",
        "qa_em",
        "answer_nll",
        "heldout_ppl",
        "checkpoint",
        "seeds",
        "qa_em_recall",
        "qa_em_extraction",
        "qa_em_recall_spread",
        "qa_em_extraction_spread",
        "answer_nll_extraction",
        "lr",
        "per_seed",
    }
    for run in runs:
        assert fields <= run.keys(), run["name"]
        assert 0.0 <= run["qa_em"] <= 1.0
        assert math.isfinite(run["answer_nll"]) and run["answer_nll"] > 0
        # the row is the mean over its two seeds, each trained into its own directory
        assert run["seeds"] == 2 and [s["seed"] for s in run["per_seed"]] == [0, 1]
        for key in ("qa_em_recall", "qa_em_extraction", "answer_nll_extraction"):
            values = [s[key] for s in run["per_seed"]]
            assert run[key] == pytest.approx(sum(values) / 2)
            assert run[f"{key}_spread"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        assert run["qa_em"] == run["qa_em_recall"]  # the first QA set, as before
        seed_dirs = [out_dir / "runs" / run["checkpoint"].split("/")[1] / f"seed{k}" for k in (0, 1)]
        states = [read_state(next((d / "checkpoints").iterdir())) for d in seed_dirs]
        assert [s["config"]["train"]["seed"] for s in states] == [0, 1]
        assert (run["value_lr"] is not None) == (run["kind"] == "memory")
        assert (run["expert_lr"] is not None) == (run["kind"] == "moe")
        assert run["tokens_per_s"] > 0 and run["active_params"] <= run["params"]
        assert (run["memory_params"] > 0) == (run["kind"] == "memory")
        state = read_state(out_dir / run["checkpoint"])  # relative to the output directory
        assert state["step"] == 4
        assert state["config"]["train"]["threads"] == 1
    assert [r["memory_slots"] for r in runs[1:5]] == [16, 64, 256, 1024]
    assert saved["config"]["facts"]["n_people"] == 30 and saved["config"]["memory_sizes"] == [
        4,
        8,
        16,
        32,
    ]
    assert saved["quick"] is True and saved["seconds"] > 0 and saved["seeds"] == 2
    # recall reads the seen people's questions, extraction the test people's: never the same people
    seen = {json.loads(line)["person"] for line in (out_dir / "data" / "qa_seen.jsonl").read_text().splitlines()}
    test = {json.loads(line)["person"] for line in (out_dir / "data" / "qa_test.jsonl").read_text().splitlines()}
    assert seen and test and not seen & test

    # the matching, from the reported counts
    dense, memory, moe, big = runs[0], runs[1:5], runs[5], runs[6]
    for run in memory:
        assert abs(run["flops_per_token"] / dense["flops_per_token"] - 1) <= 0.10, run["name"]
    largest = memory[-1]
    assert abs(moe["params"] / largest["params"] - 1) <= 0.10
    assert abs(moe["flops_per_token"] / largest["flops_per_token"] - 1) <= 0.10
    assert big["flops_per_token"] >= 4 * dense["flops_per_token"]
    # ... which are those of the suite built on the demo's own tokenizer
    demo = demo_config(True, [*TOY, "seeds=2"])
    vocab = Tokenizer.load(out_dir / "data" / "tokenizer.json").vocab_size
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    suite = build_runs(demo, data, str(out_dir), vocab)
    assert [count_parameters(r.config.model).total for r in suite] == [r["params"] for r in runs]
    assert [count_flops(r.config.model, demo.seq_len).total for r in suite] == [
        r["flops_per_token"] for r in runs
    ]

    # figure.png: a real PNG with something drawn on it
    figure = out_dir / "figure.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(figure)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.01

    # report.md: a table row per run and the command that reproduces it
    report = (out_dir / "report.md").read_text()
    for run in runs:
        assert sum(line.startswith(f"| {run['name']} |") for line in report.splitlines()) == 1, run[
            "name"
        ]
    assert f"memlayers demo --quick --out {shlex.quote(str(out_dir))} " + shlex.join([*TOY, "seeds=2"]) in report
    assert "![figure](figure.png)" in report
    for line in summary_lines(saved):
        assert line in report
    assert not any(p.name.startswith(".") for p in out_dir.iterdir())  # no temporary files left

    # a finished run reads back as its summary; another config does not
    dense_dir = out_dir / "runs" / "dense" / "seed1"
    config = from_dict(RunConfig, read_state(next((dense_dir / "checkpoints").iterdir()))["config"])
    back = finished_summary(config)
    assert {k: back[k] for k in ("qa_em_recall", "qa_em_extraction", "answer_nll_extraction")} == {
        k: runs[0]["per_seed"][1][k] for k in ("qa_em_recall", "qa_em_extraction", "answer_nll_extraction")}
    assert (back["params"], back["flops_per_token"], back["step"]) == (runs[0]["params"], runs[0]["flops_per_token"], 4)
    assert finished_summary(dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=0.5))) is None
    moved = tmp_path / "moved"
    shutil.copytree(dense_dir, moved)  # the same run in another directory still counts as finished
    elsewhere = finished_summary(dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(moved))))
    assert elsewhere["qa_em_extraction"] == back["qa_em_extraction"] and elsewhere["checkpoint"].startswith(str(moved))
    # saved by an older memlayers, before a field with a default existed: still the same run;
    # a saved config no memlayers accepts now (an unknown key): not
    state_path = next((moved / "checkpoints").iterdir()) / "state.json"
    state = json.loads(state_path.read_text())
    default = to_dict(RunConfig())["train"]
    older = next(key for key, value in state["config"]["train"].items() if key != "out_dir" and value == default[key])
    del state["config"]["train"][older]
    write_state(state_path.parent, state, 4)  # sealed with a fresh checksum, as written
    assert finished_summary(dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(moved))))
    state["config"]["train"]["no_such_field"] = 1
    write_state(state_path.parent, state, 4)
    assert finished_summary(dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(moved)))) is None

    # run again with a third seed, one run's final evaluation lost: the other 13 runs are read
    # back (not retrained), the interrupted one is moved aside and trained again, seed 2 is new
    metrics = dense_dir / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))
    kept = {p: p.stat().st_mtime_ns for p in out_dir.glob("runs/*/seed[01]/metrics.jsonl") if p != metrics}
    again = run_demo(quick=True, out_dir=out_dir, overrides=[*TOY, "seeds=3"])
    assert len(kept) == 13 and {p: p.stat().st_mtime_ns for p in kept} == kept
    assert any((dense_dir / "replaced").iterdir())
    for before, after in zip(runs, again["runs"], strict=True):
        assert after["seeds"] == 3 and [s["seed"] for s in after["per_seed"]] == [0, 1, 2]
        for k in ("qa_em_recall", "qa_em_extraction", "answer_nll_extraction"):
            assert [s[k] for s in after["per_seed"][:2]] == pytest.approx([s[k] for s in before["per_seed"]])


def test_parallel_memory_needs_a_wider_flops_tolerance_and_keeps_the_matching(tmp_path):
    """memory_mode=parallel keeps each memory block's FFN: at the demo's width that costs 1.14x
    the dense FLOPs, refused at the default tolerance and accepted when asked for."""
    with pytest.raises(ConfigError, match="flops_tolerance"):
        demo = demo_config(False, ["model.memory_mode=parallel"])
        build_runs(demo, DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts), str(tmp_path), 2048)
    demo = demo_config(False, ["model.memory_mode=parallel", "flops_tolerance=0.15"])
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    runs = build_runs(demo, data, str(tmp_path), 2048)
    memory = [r for r in runs if r.kind == "memory"]
    assert all(r.config.model.memory_mode == "parallel" for r in memory)
    largest, moe = memory[-1], next(r for r in runs if r.kind == "moe")
    assert abs(flops(moe, demo.seq_len) / flops(largest, demo.seq_len) - 1) <= 0.10  # MoE matched to it
