"""Means, spreads and verdicts over seeds."""

from __future__ import annotations

import math
import statistics

import pytest

from memlayers.demo.stats import Estimate, aggregate, compare, estimate, ratio, row_estimate


def test_estimate_is_mean_and_sample_deviation():
    values = [0.2, 0.5, 0.35]
    est = estimate(values)
    assert est.mean == pytest.approx(0.35) and est.spread == pytest.approx(statistics.stdev(values)) and est.n == 3
    assert estimate([0.4]) == Estimate(0.4, 0.0, 1)
    with pytest.raises(ValueError, match="no values"):
        estimate([])
    with pytest.raises(ValueError, match="non-finite"):
        estimate([0.1, math.nan])


def test_aggregate_averages_the_scores_every_seed_reports():
    per_seed = [
        {"qa_em_recall": 0.5, "qa_em_extraction": 0.1, "heldout_ppl": 4.0, "checkpoint": "a"},
        {"qa_em_recall": 0.7, "qa_em_extraction": 0.3, "checkpoint": "b"},
    ]
    row = aggregate(per_seed)
    assert row["seeds"] == 2
    assert row["qa_em_recall"] == pytest.approx(0.6) and row["qa_em_extraction"] == pytest.approx(0.2)
    assert row["qa_em_recall_spread"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert "heldout_ppl" not in row and "checkpoint" not in row  # one seed lacks it; not a score
    assert row_estimate(row, "qa_em_extraction") == Estimate(row["qa_em_extraction"], row["qa_em_extraction_spread"], 2)


@pytest.mark.parametrize(
    ("better", "worse", "margin", "verdict"),
    [
        (Estimate(0.6, 0.05, 3), Estimate(0.3, 0.05, 3), 0.0, "holds"),
        (Estimate(0.6, 0.2, 3), Estimate(0.3, 0.15, 3), 0.0, "inconclusive"),  # gap 0.3 < 0.35
        (Estimate(0.2, 0.01, 3), Estimate(0.3, 0.01, 3), 0.0, "does not hold"),
        (Estimate(0.6, 0.05, 3), Estimate(0.3, 0.05, 3), 0.25, "inconclusive"),  # beyond a margin
        (Estimate(0.9, 0.0, 1), Estimate(0.1, 0.0, 1), 0.0, "inconclusive"),  # one seed: no spread to beat
        (Estimate(0.9, 0.01, 3), Estimate(0.1, 0.0, 1), 0.0, "inconclusive"),
        (Estimate(0.31, 0.0, 2), Estimate(0.30, 0.0, 2), 0.0, "holds"),  # two equal seeds: spread 0
    ],
)
def test_compare(better, worse, margin, verdict):
    assert compare(better, worse, margin) == verdict


def test_ratio():
    assert ratio(Estimate(0.6, 0, 1), Estimate(0.3, 0, 1)) == pytest.approx(2.0)
    assert ratio(Estimate(0.6, 0, 1), Estimate(0.0, 0, 1)) == math.inf
    assert math.isnan(ratio(Estimate(0.0, 0, 1), Estimate(0.0, 0, 1)))
