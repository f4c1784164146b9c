"""The claims run: its runs, its learning curves and the claims table from given results."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from memlayers.config import ConfigError, load_config
from memlayers.demo import build_runs, demo_config
from memlayers.demo.claims import (
    ClaimsConfig,
    claim_runs,
    learning_curves,
    run_claims,
    spread_layers,
)
from memlayers.demo.claims_table import claim_rows, markdown
from memlayers.train.config import DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_demo import TOY  # noqa: E402


def test_spread_layers_follows_the_papers_placement():
    assert spread_layers(3, 24) == (4, 12, 20)
    assert spread_layers(1, 8) == (4,)
    assert spread_layers(4, 8) == (1, 3, 5, 7)
    for count in range(1, 9):
        layers = spread_layers(count, 8)
        assert len(layers) == count and all(0 <= i < 8 for i in layers)


def test_claims_config_errors():
    for kwargs, key in (({"seeds": 0}, "seeds"), ({"layer_counts": (9,)}, "layer_counts"), ({"deep_layers": 0}, "deep_layers")):
        with pytest.raises(ConfigError) as info:
            ClaimsConfig(**kwargs)
        assert info.value.key == key


def test_claim_runs(tmp_path):
    claims = load_config(ClaimsConfig, "demo_claims")
    demo = demo_config(False)
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    parts = claim_runs(claims, demo, build_runs(demo, data, str(tmp_path), 1000), tmp_path)
    suite, layers, every = parts["suite"], parts["layers"], parts["all_ffn"]
    curves = [run.name for run in suite if run.config.train.eval_every]
    assert curves == ["dense", "memory-256x256"] and suite[0].config.train.eval_every == demo.train.steps // 5
    assert [len(run.config.model.memory_layers) for run in layers] == [0, 1, 2, 3, 4, 6]
    for run in layers:
        assert run.config.model.n_layers == 8 and run.config.train.eval_every == 0
    for run in layers[1:]:
        assert run.config.model.memory.n_keys == 256 and run.config.model.memory.shared_values  # one memory
    assert every[0].config.model.memory_layers == tuple(range(demo.model.n_layers))
    dirs = [run.config.train.out_dir for part in parts.values() for run in part]
    assert len(set(dirs)) == len(dirs)


def _row(name, kind, slots, recall, extraction, spread=0.01, flops=1e6, **extra):
    return {"name": name, "kind": kind, "memory_slots": slots, "flops_per_token": flops, "seeds": 3,
            "qa_em_recall": recall, "qa_em_recall_spread": spread,
            "qa_em_extraction": extraction, "qa_em_extraction_spread": spread, **extra}


def _curve(means, spread=0.01):
    return {"mean": means, "spread": [spread] * len(means)}


RESULTS = {
    "suite": [
        _row("dense", "dense", 0, 0.30, 0.10),
        _row("memory-32x32", "memory", 1024, 0.35, 0.12),
        _row("memory-64x64", "memory", 4096, 0.50, 0.15),
        _row("memory-128x128", "memory", 16384, 0.49, 0.19),  # a dip within the spread
        _row("memory-256x256", "memory", 65536, 0.70, 0.18),
        _row("moe", "moe", 0, 0.69, 0.30, flops=1.05e6),
        _row("dense-big", "dense_big", 0, 0.80, 0.17, spread=0.05, flops=4.2e6),
    ],
    "curves": {
        "dense": {"seeds": 3, "tokens": [1e5, 2e5, 3e5], "qa_em_recall": _curve([0.1, 0.2, 0.3]),
                  "qa_em_extraction": _curve([0.05, 0.08, 0.10])},
        "memory-256x256": {"seeds": 3, "tokens": [1e5, 2e5, 3e5], "qa_em_recall": _curve([0.2, 0.4, 0.7]),
                           "qa_em_extraction": _curve([0.02, 0.05, 0.18])},
    },
    "curve_runs": {"dense": "dense", "memory": "memory-256x256"},
    "layers": [_row(f"{k}-memory-layers", "memory", 65536, recall, 0.1, memory_layer_count=k)
               for k, recall in ((1, 0.5), (2, 0.6), (3, 0.7), (6, 0.4))],
    "all_ffn": _row("memory-in-every-block", "memory", 65536, 0.2, 0.18),
}


def test_the_claims_table_from_given_results():
    rows = {row["claim"]: row for row in claim_rows(RESULTS)}
    verdicts = {claim: row["verdict"] for claim, row in rows.items()}
    assert verdicts["recall EM rises with memory size (4 sizes)"] == "holds"  # 128² dips within the spread
    assert verdicts["extraction EM rises with memory size (4 sizes)"] == "holds"
    assert rows["recall: largest memory vs dense at equal FLOPs"]["ours"] == "70.0% ± 1.0% vs 30.0% ± 1.0% (2.33x)"
    assert verdicts["recall: largest memory vs dense at equal FLOPs"] == "holds"  # 0.70 - 0.60 > 0.03
    assert verdicts["extraction: largest memory vs dense at equal FLOPs"] == "inconclusive"  # 0.18 vs 0.20 +- 0.03
    assert verdicts["recall: largest memory vs moe (1.1x dense FLOPs, tuned equally)"] == "inconclusive"
    assert verdicts["extraction: largest memory vs moe (1.1x dense FLOPs, tuned equally)"] == "does not hold"
    assert verdicts["recall: largest memory vs dense-big (4.2x dense FLOPs, tuned equally)"] == "does not hold"
    assert verdicts["extraction: largest memory vs dense-big (4.2x dense FLOPs, tuned equally)"] == "inconclusive"
    speed = rows["recall: memory learns faster than dense"]
    assert speed["verdict"] == "holds" and "ahead beyond the spread at 3/3 evaluations, behind at 0" in speed["ours"]
    assert "reaches dense's final 30.0% after 0.20M of 0.30M tokens" in speed["ours"]
    extraction_speed = rows["extraction: memory learns faster than dense"]
    assert extraction_speed["verdict"] == "does not hold"  # behind at 2 of 3 points
    assert verdicts["recall: number of memory layers (best: 3)"] == "holds"  # 3 best, 6 worse
    assert verdicts["extraction: number of memory layers (best: 1)"] == "inconclusive"  # all equal
    assert verdicts["recall: memory-256x256 vs every FFN replaced by memory"] == "holds"
    assert verdicts["extraction: memory-256x256 vs every FFN replaced by memory"] == "inconclusive"
    table = markdown(claim_rows(RESULTS)).splitlines()
    assert len(table) == 2 + len(rows) and table[2].endswith("| **holds** |")


def test_learning_curves_are_read_from_every_seeds_metrics(tmp_path):
    demo = demo_config(True, ["train.batch_size=4", "train.steps=30"])
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    run = build_runs(demo, data, str(tmp_path), 500)[0]
    train = dataclasses.replace(run.config.train, eval_every=10)
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, train=train))
    for seed, ems in ((0, (0.1, 0.2, 0.4)), (1, (0.3, 0.2, 0.6))):
        directory = tmp_path / "runs" / "dense" / f"seed{seed}"
        directory.mkdir(parents=True)
        records = [{"step": 5, "loss": 3.0}] + [
            {"step": step, "qa_em_recall": em, "qa_em_extraction": em / 2} for step, em in zip((10, 20, 30), ems, strict=True)]
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = learning_curves([run], 2)["dense"]
    assert curve["steps"] == [10, 20, 30] and curve["tokens"] == [10 * 4 * demo.seq_len, 20 * 4 * demo.seq_len, 30 * 4 * demo.seq_len]
    assert curve["qa_em_recall"]["mean"] == pytest.approx([0.2, 0.2, 0.5])
    assert curve["qa_em_recall"]["spread"] == pytest.approx([0.1414, 0.0, 0.1414], abs=1e-4)
    assert curve["qa_em_extraction"]["mean"] == pytest.approx([0.1, 0.1, 0.25])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_toy_claims_run_writes_its_table_and_figures(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text("preset: demo_quick\nseeds: 1\ncurve_points: 2\ndeep_layers: 3\nlayer_counts: [2]\nall_ffn: false\n")
    results = run_claims(path, tmp_path / "out", overrides=[*TOY, "memory_sizes=[4,8]"])
    out = tmp_path / "out"
    saved = json.loads((out / "claims.json").read_text())
    assert saved["claims"] == results["claims"] == claim_rows(saved)
    assert [r["memory_layer_count"] for r in saved["layers"]] == [2] and saved["deep_dense"]["kind"] == "dense"
    assert saved["all_ffn"] is None  # not asked for (its runs are checked in test_claim_runs)
    assert set(saved["curves"]) == {"dense", "memory-8x8"}
    assert saved["curves"]["dense"]["steps"] == [2, 4]  # every 4 // 2 steps; the last is the final evaluation
    for figure in ("figure.png", "learning.png", "layers.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "claims.md").read_text()
    assert markdown(saved["claims"]) in report and "![learning speed](learning.png)" in report
