"""Ablation files: variants built from the demo suite with their overrides."""


import json

import pytest
import yaml

from memlayers.cli import main
from memlayers.config import ConfigError, load_config
from memlayers.demo import build_runs, demo_config
from memlayers.demo.ablations import (
    AblationConfig,
    Variant,
    build_variants,
    load_ablations,
    markdown_table,
)
from memlayers.train.config import DataConfig


def _suite(tmp_path, demo=None):
    demo = demo or demo_config(False)
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    return build_runs(demo, data, str(tmp_path), demo.vocab_size)


def test_shipped_ablations_build(tmp_path):
    ablation = load_config(AblationConfig, "demo_ablations")
    runs = build_variants(ablation, _suite(tmp_path), tmp_path)
    assert [r.name for r in runs] == [v.name for v in ablation.variants]
    by_name = {r.name: r for r in runs}
    assert by_name["value lr 3e-2"].config.optim.value_lr == pytest.approx(3e-2)
    assert by_name["no qk-norm"].config.model.memory.qk_norm is False
    assert by_name["2 shared memory layers (1, 3)"].config.model.memory_layers == (1, 3)
    assert by_name["dense, fixed packing"].config.data.repack is False
    assert by_name["dense, fixed packing"].memory_slots == 0 and by_name["no qk-norm"].memory_slots == 256**2
    out_dirs = {r.config.train.out_dir for r in runs}
    assert len(out_dirs) == len(runs) and all(str(tmp_path) in d for d in out_dirs)


def test_shipped_design_ablations_build_with_three_seeds(tmp_path):
    ablation, demo = load_ablations("demo_design")
    assert demo.seeds == 3
    runs = build_variants(ablation, _suite(tmp_path, demo), tmp_path)
    designs = [(r.config.model.memory_layers, r.config.model.memory_mode, r.config.model.memory.output_init)
               for r in runs if r.memory_slots]
    assert designs == [((2,), "replace", "paper"), ((2,), "replace", "model"), ((2,), "parallel", "paper"),
                       ((2,), "parallel", "model"), ((1, 3), "replace", "paper"), ((1, 3), "replace", "model")]
    assert all(r.config.model.memory.n_keys == 256 for r in runs if r.memory_slots)


def test_unknown_run_and_bad_override_are_config_errors(tmp_path):
    suite = _suite(tmp_path)
    with pytest.raises(ConfigError, match="unknown run 'memory-7'"):
        build_variants(AblationConfig(variants=[Variant("x", "memory-7")]), suite, tmp_path)
    with pytest.raises(ConfigError) as error:
        build_variants(AblationConfig(variants=[Variant("x", "dense", ("model.memory.knn=0",))]), suite, tmp_path)
    assert error.value.key == "model.memory.knn"
    with pytest.raises(ConfigError, match="unique"):
        AblationConfig(variants=[Variant("a", "dense"), Variant("a", "dense")])


def test_markdown_table_has_a_row_per_variant_with_spreads_over_seeds():
    rows = [
        {"name": "a", "run": "dense", "overrides": [], "note": "", "seeds": 1, "qa_em_recall": 0.25,
         "qa_em_extraction": 0.125, "qa_em_validation": 0.375, "answer_nll_extraction": 1.5, "heldout_ppl": None,
         "tokens_per_s": 1000.0},
        {"name": "b", "run": "memory-64x64", "overrides": ["optim.value_lr=3e-2"], "note": "n", "seeds": 3,
         "qa_em_recall": 0.5, "qa_em_recall_spread": 0.05, "answer_nll_extraction": 0.7, "heldout_ppl": 3.25,
         "tokens_per_s": 900.0},
    ]
    table = markdown_table(rows, "Ablations")
    assert "| variant | from | changes | validation EM | extraction EM | recall EM |" in table
    assert "| a | dense | - | 37.5% | 12.5% | 25.0% | 1.500 | - | 1,000 |  |" in table
    assert "| b | memory-64x64 | `optim.value_lr=3e-2` | - | - | 50.0% ± 5.0% | 0.700 | 3.25 | 900 | n |" in table


def _ablation_file(tmp_path):
    path = tmp_path / "ablations.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "demo_quick",
        "demo_overrides": ["train.steps=7", "train.batch_size=3"],
        "variants": [{"name": "a", "run": "dense"}, {"name": "b", "run": "dense", "overrides": ["train.batch_size=5"]}],
    }))
    return path


def test_command_line_overrides_reach_every_variant_after_the_files_own(tmp_path):
    ablation, demo = load_ablations(_ablation_file(tmp_path), ["train.steps=10", "workers=1"])
    assert (demo.train.steps, demo.train.batch_size, demo.workers) == (10, 3, 1)
    assert demo == demo_config(True, ["train.steps=7", "train.batch_size=3", "train.steps=10", "workers=1"])
    runs = build_variants(ablation, _suite(tmp_path, demo), tmp_path)
    assert [r.config.train.steps for r in runs] == [10, 10]
    assert [r.config.train.batch_size for r in runs] == [3, 5]  # a variant's own overrides come last


def test_an_override_the_demo_does_not_have_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_ablations(_ablation_file(tmp_path), ["data.repack=false"])
    assert error.value.key.startswith("data")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["bogus=1"], "memlayers: config error: bogus"),
        (["--quick"], "memlayers: config error: --quick and --preset do not apply to --ablations"),
        (["--preset", "demo"], "memlayers: config error: --quick and --preset do not apply to --ablations"),
    ],
)
def test_demo_ablations_refuses_what_it_would_ignore(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["demo", "--ablations", str(_ablation_file(tmp_path)), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before any work


@pytest.mark.slow
def test_ablations_train_every_variant_per_seed_and_score_the_validation_split(tmp_path):
    from memlayers.demo.ablations import run_ablations

    out = tmp_path / "out"
    rows = run_ablations(_ablation_file(tmp_path), out, workers=1,
                         overrides=["seeds=2", "train.steps=3", "train.eval_qa=4"])
    assert [(r["name"], r["seeds"]) for r in rows] == [("a", 2), ("b", 2)]
    for row in rows:
        for key in ("qa_em_validation", "qa_em_extraction", "qa_em_recall"):
            assert 0 <= row[key] <= 1 and f"{key}_spread" in row
    configs = [yaml.safe_load((out / "runs" / "b" / f"seed{k}" / "config.yaml").read_text()) for k in (0, 1)]
    assert [c["train"]["seed"] for c in configs] == [0, 1]
    assert configs[0]["data"]["qa"]["validation"].endswith("qa_validation.jsonl")
    assert configs[0]["data"]["qa"]["extraction"].endswith("qa_test.jsonl")
    losses = [[r["loss"] for r in map(json.loads, (out / "runs" / "b" / f"seed{k}" / "metrics.jsonl").open()) if "loss" in r]
              for k in (0, 1)]
    assert losses[0] != losses[1]  # the seeds are different runs
    assert "2 seeds each" in (out / "ablations.md").read_text()
