"""Equal tuning: the same number of trials per kind, on the validation split alone."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from memlayers.config import ConfigError
from memlayers.demo import demo_config
from memlayers.demo.suite import TUNED, TuneConfig
from memlayers.demo.tune import (
    first_stage,
    first_stage_runs,
    second_stage,
    second_stage_runs,
    select,
)
from memlayers.train.config import DataConfig


def _distinct(settings):
    return len({tuple(sorted(s.items())) for s in settings}) == len(settings)


@pytest.mark.parametrize(("lr_trials", "refine_trials"), [(1, 0), (4, 3), (6, 3), (6, 5)])
def test_every_kind_gets_the_same_lrs_then_the_same_number_of_refinements(lr_trials, refine_trials):
    tune = TuneConfig(lr_trials=lr_trials, refine_trials=refine_trials, lr_range=(1e-3, 3e-2), ratio_range=(1.0, 10.0))
    shared = [s["lr"] for s in first_stage("dense", tune)]
    assert len(shared) == lr_trials and shared[0] == 1e-3 and (lr_trials == 1 or shared[-1] == 3e-2)
    for kind, names in TUNED.items():
        first = first_stage(kind, tune)
        assert [s["lr"] for s in first] == shared  # stage 1: one lr search for every kind
        assert all(tuple(s) == names for s in first)
        if len(names) == 2:
            assert all(s[names[1]] == pytest.approx(s["lr"] * 10**0.5, rel=1e-2) for s in first)
        for best in (first[0], first[-1], first[len(first) // 2]):
            second = second_stage(kind, tune, best)
            assert len(first) + len(second) == tune.trials == lr_trials + refine_trials
            assert _distinct(first + second)  # no trial repeated
            assert all(tuple(s) == names and 1e-3 <= s["lr"] <= 3e-2 for s in second)
            if len(names) == 2:  # the second rate searched at the best lr
                assert all(s["lr"] == best["lr"] and 0.99 <= s[names[1]] / s["lr"] <= 10.01 for s in second)
            else:  # lrs between stage-1 neighbours, the nearest to the best
                gaps = [abs(math.log(s["lr"] / best["lr"])) for s in second]
                step = math.log(30) / max(lr_trials - 1, 1)
                assert all(gap < (refine_trials - 0.5) * step * 1.01 for gap in gaps)  # at worst from an edge
                assert not set(s["lr"] for s in second) & set(shared)


def test_refinements_of_a_one_rate_kind_are_the_midpoints_next_to_its_best():
    tune = TuneConfig(lr_trials=4, refine_trials=2, lr_range=(1e-3, 8e-3))  # stage 1: 1, 2, 4, 8 (e-3)
    assert [s["lr"] for s in first_stage("dense_big", tune)] == [1e-3, 2e-3, 4e-3, 8e-3]
    assert second_stage("dense_big", tune, {"lr": 4e-3}) == [{"lr": 2.83e-3}, {"lr": 5.66e-3}]
    assert second_stage("dense_big", tune, {"lr": 1e-3}) == [{"lr": 1.41e-3}, {"lr": 2.83e-3}]
    two = TuneConfig(lr_trials=4, refine_trials=2, ratio_range=(1.0, 16.0))  # ratios 1, 4, 16; 4 is stage 1's
    assert second_stage("moe", two, {"lr": 2e-3, "expert_lr": 8e-3}) == [
        {"lr": 2e-3, "expert_lr": 2e-3}, {"lr": 2e-3, "expert_lr": 3.2e-2}]


@pytest.mark.parametrize(("kwargs", "key"), [({"lr_trials": 0}, "lr_trials"), ({"refine_trials": -1}, "refine_trials"),
                                             ({"lr_trials": 3, "refine_trials": 3}, "refine_trials"),
                                             ({"lr_range": (3e-2, 1e-3)}, "lr_range"),
                                             ({"ratio_range": (0.0, 1.0)}, "ratio_range"),
                                             ({"ratio_range": (2.0, 2.0)}, "ratio_range"), ({"seeds": 0}, "seeds")])
def test_tune_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**kwargs)
    assert info.value.key == key


def _data(tmp_path: Path) -> DataConfig:
    return DataConfig(qa={"recall": str(tmp_path / "qa_seen.jsonl"), "extraction": str(tmp_path / "qa_test.jsonl")})


def test_tuning_runs_score_the_validation_split_only(tmp_path):
    demo = demo_config(True, ["peer=true", "tune.lr_trials=3", "tune.refine_trials=2", "lrs.memory.value_lr=0.5"])
    first = first_stage_runs(demo, _data(tmp_path), tmp_path, 700)
    best = {run.kind: setting for run, setting in first[::3]}  # each kind's first lr
    trials = first + second_stage_runs(first, best, demo.tune, tmp_path)
    kinds = [run.kind for run, _ in trials]
    assert {kind: kinds.count(kind) for kind in kinds} == dict.fromkeys(TUNED, 5)
    for run, setting in trials:
        assert run.config.data.qa == {"validation": str(tmp_path / "qa_validation.jsonl")}
        assert {name: getattr(run.config.optim, name) for name in setting} == setting  # preset lrs replaced
    memory = [run for run, _ in trials if run.kind == "memory"]
    assert {run.config.model.memory.n_keys for run in memory} == {max(demo.memory_sizes)}  # the largest
    assert len({run.config.train.out_dir for run, _ in trials}) == len(trials)


def test_select_reads_validation_scores_only(tmp_path):
    demo = demo_config(True, ["tune.lr_trials=4"])
    trials = [t for t in first_stage_runs(demo, _data(tmp_path), tmp_path, 700) if t[0].kind in ("dense", "moe")]
    summaries = []
    for index in range(len(trials)):
        validation = [0.2, 0.5, 0.5, 0.1][index % 4]  # trials 1 and 2 tie on EM; 2 has the lower NLL
        summaries.append({"qa_em_validation": validation, "answer_nll_validation": 1.0 - 0.1 * (index % 4),
                          "qa_em_extraction": 1.0 - validation, "qa_em": 1.0 - validation})  # test scores disagree
    chosen = select(trials, summaries)
    settings = {kind: [s for r, s in trials if r.kind == kind] for kind in ("dense", "moe")}
    assert chosen == {"dense": settings["dense"][2], "moe": settings["moe"][2]}
    with pytest.raises(KeyError):  # a summary without validation scores cannot be selected from
        select(trials[:1], [{"qa_em_extraction": 1.0}])


def test_demo_lrs_apply_per_kind_and_are_checked(tmp_path):
    demo = demo_config(True, ["peer=true", "lrs.dense.lr=0.02", "lrs.moe.expert_lr=0.05", "lrs.memory.value_lr=0.04"])
    from memlayers.demo import build_runs

    runs = {run.name: run.config.optim for run in build_runs(demo, _data(tmp_path), str(tmp_path), 700)}
    preset = demo_config(True, ["peer=true"]).lrs  # the overrides change one rate each, the preset's others stay
    assert runs["dense"].lr == 0.02 and runs["moe"].expert_lr == 0.05
    assert runs["moe"].lr == preset.get("moe", {}).get("lr", demo.optim.lr)
    assert runs["memory-256x256"].value_lr == 0.04 and runs["peer"].value_lr == demo.optim.value_lr
    assert runs["dense-big"] == dataclasses.replace(demo.optim, **preset.get("dense_big", {}))
    for override, key in (("lrs.big.lr=1", "lrs.big"), ("lrs.dense.value_lr=1", "lrs.dense.value_lr"),
                          ("lrs.moe.lr=0", "lrs.moe.lr")):
        with pytest.raises(ConfigError) as info:
            demo_config(True, [override])
        assert str(info.value).startswith(key), override
    assert dataclasses.replace(demo, lrs={}).optim_for("dense") == demo.optim


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_toy_tuning_writes_its_choice_and_resumes_after_an_interruption(tmp_path):
    import json
    import sys

    import yaml

    from memlayers.demo.tune import run_tuning

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_demo import TOY

    demo = demo_config(True, [*TOY, "tune.lr_trials=2", "tune.refine_trials=1", "tune.seeds=2", "memory_sizes=[4,8]"])
    lrs = run_tuning(demo, tmp_path)
    assert set(lrs) == {"dense", "memory", "moe", "dense_big"}
    assert yaml.safe_load((tmp_path / "tuned.yaml").read_text()) == {"lrs": lrs}
    record = json.loads((tmp_path / "tuning.json").read_text())
    assert record["selected_on"] == "validation" and record["seeds"] == 2 and len(record["trials"]) == 4 * 3
    assert [t["stage"] for t in record["trials"]] == [1] * 8 + [2] * 4
    assert all(set(t) >= {"kind", "lr", "qa_em_validation"} for t in record["trials"])
    for t in record["trials"]:  # a setting's score is the mean over its seeds
        assert len(t["qa_em_validation_per_seed"]) == 2
        assert t["qa_em_validation"] == pytest.approx(sum(t["qa_em_validation_per_seed"]) / 2)
    for kind, chosen in lrs.items():
        mine = [t for t in record["trials"] if t["kind"] == kind]
        best = max(mine, key=lambda t: (t["qa_em_validation"], -t["answer_nll_validation"]))
        assert chosen == {name: best[name] for name in TUNED[kind]}
        for seed in (0, 1):
            stage2 = yaml.safe_load((tmp_path / "tune" / kind / "trial2" / f"seed{seed}" / "config.yaml").read_text())
            assert {name: stage2["optim"][name] for name in TUNED[kind]} == {name: mine[2][name] for name in TUNED[kind]}
            assert stage2["train"]["seed"] == seed
    # interrupt one trial (its final evaluation is lost): a rerun trains it alone, the rest are read back
    metrics = tmp_path / "tune" / "dense" / "trial2" / "seed1" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))
    kept = (tmp_path / "tune" / "moe" / "trial2" / "seed1" / "metrics.jsonl").stat().st_mtime_ns
    assert run_tuning(demo, tmp_path) == lrs
    assert (tmp_path / "tune" / "moe" / "trial2" / "seed1" / "metrics.jsonl").stat().st_mtime_ns == kept
    assert any((tmp_path / "tune" / "dense" / "trial2" / "seed1" / "replaced").iterdir())  # the interrupted try, kept aside
    assert json.loads((tmp_path / "tuning.json").read_text())["trials"] == record["trials"]
