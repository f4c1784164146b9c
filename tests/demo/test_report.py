"""The demo's summary lines and figure, from given results (no training)."""

from __future__ import annotations

import matplotlib.image

from memlayers.demo.report import learning_rate_line, plot, summary_lines


def _run(name: str, kind: str, slots: int, recall: float, extraction: float, spread: float = 0.0) -> dict:
    return {"name": name, "kind": kind, "memory_slots": slots, "flops_per_token": 1e6, "seeds": 3,
            "qa_em_recall": recall, "qa_em_recall_spread": spread,
            "qa_em_extraction": extraction, "qa_em_extraction_spread": spread}


def _results(dense_extraction: float, spread: float = 0.01) -> dict:
    return {"seeds": 3, "runs": [
        _run("dense", "dense", 0, 0.30, dense_extraction, spread),
        _run("memory-32x32", "memory", 1024, 0.40, 0.10, spread),
        _run("memory-64x64", "memory", 4096, 0.60, 0.20, spread),
        _run("moe", "moe", 0, 0.55, 0.19, spread),
    ]}


def test_summary_leads_with_extraction_and_gives_ratios_and_verdicts():
    lines = summary_lines(_results(0.05))
    assert lines[0] == ("- Extraction (unseen questions): memory-64x64 20.0% ± 1.0% vs 5.0% ± 1.0% (4.00x; holds) "
                        "against dense at the same FLOPs; against moe 20.0% ± 1.0% vs 19.0% ± 1.0% (1.05x; inconclusive).")
    assert lines[1] == "  By memory size (rising): memory-32x32 10.0% ± 1.0%, memory-64x64 20.0% ± 1.0%."
    assert lines[2].startswith("- Recall (seen questions): memory-64x64 60.0% ± 1.0% vs 30.0% ± 1.0% (2.00x; holds)")
    assert lines[-1].startswith("- Mean ± spread over 3 seeds")


def test_summary_says_when_a_difference_is_within_the_spread_or_dense_scores_zero():
    assert "(4.00x; inconclusive)" in summary_lines(_results(0.05, spread=0.1))[0]
    assert "vs 0.0% ± 1.0% (no ratio: 0%; holds)" in summary_lines(_results(0.0))[0]


def test_one_seed_gives_no_verdict_however_large_the_gap():
    results = _results(0.05, spread=0.0)
    results["seeds"] = 1
    for run in results["runs"]:
        run["seeds"] = 1
    lines = summary_lines(results)
    assert "(4.00x; inconclusive)" in lines[0] and "holds" not in lines[0]
    assert lines[-1].endswith("(with one seed there is no spread: no verdict; use --seeds 3).")


def test_the_report_says_whether_the_learning_rates_were_tuned():
    assert "**not tuned**" in learning_rate_line({"lrs": {}})
    tuned = learning_rate_line({"lrs": {"memory": {"lr": 1e-3}, "dense": {"lr": 2e-3}}})
    assert "tuned for dense, memory" in tuned and "not tuned" not in tuned


def test_figure_has_both_panels_drawn(tmp_path):
    path = tmp_path / "figure.png"
    plot(_results(0.05), path)
    image = matplotlib.image.imread(path)
    assert image.shape[1] > 2 * image.shape[0] * 0.9  # two panels side by side
    left, right = image[:, : image.shape[1] // 2, :3], image[:, image.shape[1] // 2 :, :3]
    assert left.std() > 0.01 and right.std() > 0.01
