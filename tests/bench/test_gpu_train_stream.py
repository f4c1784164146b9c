"""benchmarks/gpu_train_stream.py (issue 14's GPU check), its CPU smoke run: the corpus is tokenised into shards by
the CLI, trained on from them, and the run's speed and memory are set beside the planner's for the same model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train_stream.py"


@pytest.mark.slow
def test_quick_run_trains_from_shards_and_plans_the_same_model(tmp_path):
    out = tmp_path / "train_stream.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "CPU" in report["environment"]["device"]
    # 6 steps logged every 2: steps 4 and 6 are kept, the first logged one (warm-up) is not
    assert [r["step"] for r in report["logged"]] == [4, 6]
    assert all(math.isfinite(r["loss"]) for r in report["logged"])
    measured = report["measured"]
    assert measured["tokens_per_s_per_device"] > 0 and measured["peak_memory_mib"] > 0
    assert "mfu" not in measured  # a CPU has no peak FLOP/s in the planner's table: left out, not guessed
    # the planner saw the model that trained: the shards' vocabulary and the same overrides
    assert report["plan"]["micro_batch"] == 4 and report["plan"]["seq_len"] == 64
    assert "model.dim=64" in report["overrides"] and report["vocab_size"] <= 1024
    assert report["rows"][0]["step s"] == pytest.approx(4 * 64 / measured["tokens_per_s_per_device"])
