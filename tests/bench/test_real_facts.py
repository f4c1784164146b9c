"""The real-facts comparison: airports through `memlayers train`, at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memlayers.bench.real_facts import render, run_real_facts
from memlayers.config import load_config
from memlayers.data.airports import AirportFactsConfig
from memlayers.train.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from test_demo import TOY  # noqa: E402

pytest.importorskip("airportsdata")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dense_and_memory_train_on_the_airports_through_the_command_line(tmp_path):
    toy = [o for o in TOY if not o.startswith("facts.")]
    results = run_real_facts(tmp_path, quick=True, seeds=1, kinds=("dense", "memory"),
                             facts=AirportFactsConfig(n_airports=24, docs_per_airport=2), overrides=toy)
    assert [r["name"] for r in results["runs"]] == ["dense", "memory-32x32"]
    for row in results["runs"]:
        assert row["seeds"] == 1 and len(row["per_seed"]) == 1 and row["qa_em_extraction_spread"] == 0.0
        assert 0 <= row["qa_em_extraction"] <= 1 and row["answer_nll_extraction"] > 0
        assert row["tokens_per_s"] > 0 and row["params"] > 0
        for seed in (0,):  # each run was a YAML trained by `memlayers train`, reading the airport files
            config = load_config(RunConfig, tmp_path / "runs" / row["checkpoint"].split("/")[1] / f"seed{seed}.yaml")
            assert config.train.seed == seed
            assert config.data.qa == {"recall": str(tmp_path / "data" / "qa_seen.jsonl"),
                                      "validation": str(tmp_path / "data" / "qa_validation.jsonl"),
                                      "extraction": str(tmp_path / "data" / "qa_test.jsonl")}
            assert config.data.train == str(tmp_path / "data" / "train.jsonl")
    memory = results["runs"][1]
    assert memory["memory_params"] > 0 and memory["value_lr"] is not None
    saved = json.loads((tmp_path / "real_facts.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    assert (tmp_path / "real_facts.md").read_text() == render(results) + "\n"
    assert json.loads((tmp_path / "data" / "tokenizer.json").read_text())["model"]  # one tokenizer for all runs

    # run again with a second seed, through the benchmark script (its runs start in spawned
    # processes, which import the script again): the finished runs are read back, only seed 1 trains
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed0/metrics.jsonl")}
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_real_facts.py"
    subprocess.run([sys.executable, str(script), "--quick", "--seeds", "2", "--airports", "24", "--docs", "2",
                    "--kinds", "dense,memory", "--out", str(tmp_path), *toy], check=True, capture_output=True)
    again = json.loads((tmp_path / "real_facts.json").read_text())
    assert len(kept) == 2 and {p: p.stat().st_mtime_ns for p in kept} == kept
    for before, after in zip(results["runs"], again["runs"], strict=True):
        assert after["seeds"] == 2 and after["per_seed"][0]["qa_em_validation"] == before["per_seed"][0]["qa_em_validation"]
