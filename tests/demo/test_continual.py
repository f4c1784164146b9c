"""The continual-learning demo: new people disjoint from the old, lr chosen on validation only, its outputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from memlayers.config import ConfigError, load_config
from memlayers.data.facts import FactWorldConfig, generate_world
from memlayers.demo.continual import ContinualConfig, new_fact_groups, run_continual
from memlayers.demo.continual_report import forgetting, markdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_demo import TOY  # noqa: E402


def test_presets_load_and_bad_settings_are_refused():
    for preset in ("demo_continual", "demo_continual_quick"):
        assert load_config(ContinualConfig, preset).seeds >= 3
    with pytest.raises(ConfigError, match="memory_methods"):
        ContinualConfig(memory_methods=("sparse", "adapters"))
    with pytest.raises(ConfigError, match="dense_methods"):
        ContinualConfig(dense_methods=("sparse",))
    with pytest.raises(ConfigError, match="lr_grid"):
        ContinualConfig(lr_grid={"sparse": [1.0]})


def test_new_people_are_new_and_their_groups_disjoint():
    world_a = generate_world(FactWorldConfig(n_people=60, seed=0, heldout_people=5))
    config = ContinualConfig(new_people=7, rounds=3, validation_people=4)
    groups = new_fact_groups(world_a, config, seed=0)
    assert list(groups) == ["validation", "round1", "round2", "round3"]
    old = {p.name for p in world_a.people}
    people = [{q["person"] for q in group.qa} for group in groups.values()]
    assert [len(p) for p in people] == [4, 7, 7, 7] and not any(p & old for p in people)
    assert all(not a & b for i, a in enumerate(people) for b in people[i + 1 :])
    for group in groups.values():
        text = "\n".join(group.documents)
        assert all(q["question"] in text for q in group.qa)  # learned as question/answer pairs ...
        assert not any(q["question"] in text for q in group.paraphrased)  # ... never in the second wording
    assert new_fact_groups(world_a, config, seed=1)["round1"].qa != groups["round1"].qa


@pytest.mark.slow
def test_a_toy_continual_run_chooses_on_validation_and_writes_its_outputs(tmp_path, monkeypatch):
    import memlayers.demo.continual as continual

    path = tmp_path / "continual.yaml"
    path.write_text("preset: demo_quick\nseeds: 1\nnew_people: 3\nrounds: 2\nvalidation_people: 2\nbios_per_person: 1\n"
                    "memory_methods: [sparse, full]\ndense_methods: [full]\n"
                    "lr_grid: {sparse: [10.0, 30.0], full: [1.0e-4, 1.0e-3]}\nepochs: 1\nbatch_size: 2\ntop_t: 4\n"
                    "old_questions: 10\nbackground_batches: 2\n")
    scored: list[list[str]] = []
    real_em = continual._em
    monkeypatch.setattr(continual, "_em", lambda model, tok, pairs: scored.append([q["person"] for q in pairs])
                        or real_em(model, tok, pairs))
    results = run_continual(path, tmp_path / "out", overrides=[*TOY, "memory_sizes=[4,8]", "seq_len=128"])
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert [(r["model"], r["name"]) for r in results["methods"]] == [("dense", "full"), ("memory", "sparse"),
                                                                     ("memory", "full")]
    for row, rounds in zip(results["methods"], results["rounds"], strict=True):
        (run,) = rounds["per_seed"]
        assert [t["lr"] for t in run["lr_trials"]] == results["config"]["continual"]["lr_grid"][row["name"]]
        best = max(run["lr_trials"], key=lambda t: (t["validation_em"], -t["lr"]))
        assert row["lr"] == [best["lr"]] == [run["lr"]]
        assert [r["round"] for r in run["rounds"]] == [1, 2] and len(run["rounds"][1]["earlier_em"]) == 1
        assert 0 <= row["new_em"] <= 1 and row["heldout_ppl_after"] > 1 and row["seeds"] == 1
        assert (row["patch_bytes"] is not None) == (row["name"] == "sparse")
    # the learning rates were chosen on validation people only: the test groups were scored after choosing
    world_a = generate_world(load_config_demo_facts(results))
    groups = new_fact_groups(world_a, ContinualConfig(
        **{k: v for k, v in results["config"]["continual"].items() if k not in ("preset", "demo_overrides")}), 0)
    validation = {q["person"] for q in groups["validation"].qa}
    old = {q["person"] for q in world_a.qa_pairs("seen")[:10]}
    first_trials = scored[:4]  # dense full's two trials come first: the validation group's questions, then A's
    assert [set(s) for s in first_trials] == [validation, old] * 2
    assert all("old_em" in t for rounds in results["rounds"] for t in rounds["per_seed"][0]["lr_trials"])
    assert markdown(results) in (out / "continual.md").read_text()
    assert (out / "continual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def load_config_demo_facts(results) -> FactWorldConfig:
    facts = results["config"]["demo"]["facts"]
    return FactWorldConfig(**facts)


def test_forgetting_is_the_fraction_of_old_em_lost():
    assert forgetting({"old_em_before": 0.5, "old_em_after": 0.4}) == pytest.approx(0.2)
    assert forgetting({"old_em_before": 0.5, "old_em_after": 0.6}) == pytest.approx(-0.2)  # learning can help
    assert math.isnan(forgetting({"old_em_before": 0.0, "old_em_after": 0.0}))
