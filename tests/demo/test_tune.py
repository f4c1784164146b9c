"""Equal tuning: the same number of trials per kind, on the validation split alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from memlayers.config import ConfigError
from memlayers.demo import demo_config
from memlayers.demo.suite import TUNED, TuneConfig
from memlayers.demo.tune import grid, select, tuning_runs
from memlayers.train.config import DataConfig


@pytest.mark.parametrize("trials", [1, 4, 9, 16])
def test_every_kind_gets_the_same_number_of_distinct_trials_over_its_own_rates(trials):
    tune = TuneConfig(trials=trials, lr_range=(1e-3, 3e-2), ratio_range=(1.0, 10.0))
    for kind, names in TUNED.items():
        settings = grid(kind, tune)
        assert len(settings) == trials
        assert all(tuple(s) == names for s in settings)
        assert len({tuple(s.values()) for s in settings}) == trials  # no trial repeated
        assert all(1e-3 <= s["lr"] <= 3e-2 for s in settings)
        if len(names) == 2:
            assert all(0.99 <= s[names[1]] / s["lr"] <= 10.01 for s in settings)
    assert grid("dense", TuneConfig(trials=4, lr_range=(1e-3, 8e-3)))[-1] == {"lr": 8e-3}


@pytest.mark.parametrize(("kwargs", "key"), [({"trials": 8}, "trials"), ({"trials": 0}, "trials"),
                                             ({"lr_range": (3e-2, 1e-3)}, "lr_range"),
                                             ({"ratio_range": (0.0, 1.0)}, "ratio_range")])
def test_tune_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**kwargs)
    assert info.value.key == key


def _data(tmp_path: Path) -> DataConfig:
    return DataConfig(qa={"recall": str(tmp_path / "qa_seen.jsonl"), "extraction": str(tmp_path / "qa_test.jsonl")})


def test_tuning_runs_score_the_validation_split_only(tmp_path):
    demo = demo_config(True, ["peer=true", "tune.trials=4", "lrs.memory.value_lr=0.5"])
    trials = tuning_runs(demo, _data(tmp_path), tmp_path, 700)
    kinds = [run.kind for run, _ in trials]
    assert {kind: kinds.count(kind) for kind in kinds} == dict.fromkeys(TUNED, 4)
    for run, setting in trials:
        assert run.config.data.qa == {"validation": str(tmp_path / "qa_validation.jsonl")}
        assert {name: getattr(run.config.optim, name) for name in setting} == setting  # preset lrs replaced
    memory = [run for run, _ in trials if run.kind == "memory"]
    assert {run.config.model.memory.n_keys for run in memory} == {max(demo.memory_sizes)}  # the largest
    assert len({run.config.train.out_dir for run, _ in trials}) == len(trials)


def test_select_reads_validation_scores_only(tmp_path):
    demo = demo_config(True, ["tune.trials=4"])
    trials = [t for t in tuning_runs(demo, _data(tmp_path), tmp_path, 700) if t[0].kind in ("dense", "moe")]
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
    assert runs["dense"].lr == 0.02 and runs["moe"].expert_lr == 0.05 and runs["moe"].lr == demo.optim.lr
    assert runs["memory-256x256"].value_lr == 0.04 and runs["peer"].value_lr == demo.optim.value_lr
    assert runs["dense-big"] == demo.optim
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

    demo = demo_config(True, [*TOY, "tune.trials=1", "memory_sizes=[4,8]"])
    lrs = run_tuning(demo, tmp_path)
    assert set(lrs) == {"dense", "memory", "moe", "dense_big"}
    assert yaml.safe_load((tmp_path / "tuned.yaml").read_text()) == {"lrs": lrs}
    record = json.loads((tmp_path / "tuning.json").read_text())
    assert record["selected_on"] == "validation" and len(record["trials"]) == 4
    assert all(set(t) >= {"kind", "lr", "qa_em_validation"} for t in record["trials"])
    # interrupt one trial (its final evaluation is lost): a rerun trains it alone, the rest are read back
    metrics = tmp_path / "tune" / "dense" / "trial0" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:-1]))
    kept = (tmp_path / "tune" / "moe" / "trial0" / "metrics.jsonl").stat().st_mtime_ns
    assert run_tuning(demo, tmp_path) == lrs
    assert (tmp_path / "tune" / "moe" / "trial0" / "metrics.jsonl").stat().st_mtime_ns == kept
    assert any((tmp_path / "tune" / "dense" / "trial0" / "replaced").iterdir())  # the interrupted try, kept aside
    assert json.loads((tmp_path / "tuning.json").read_text())["trials"] == record["trials"]
