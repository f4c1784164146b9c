"""Means and spreads over seeds, and when a difference counts.

A run of the demo is trained once per seed; its row reports the mean of each
score and its spread (the sample standard deviation over seeds; 0 for one
seed). A comparison *holds* only when the difference of the means exceeds
the sum of the two spreads (the mean +- spread intervals do not touch), *does
not hold* when it goes the other way by as much, and is *inconclusive*
otherwise, and always with one seed (no spread to beat): a reviewer's rule of
thumb, stricter than a single-seed ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["holds", "does not hold", "inconclusive"]

SCORES = ("qa_em", "answer_nll", "qa_em_recall", "answer_nll_recall", "qa_em_extraction", "answer_nll_extraction",
          "qa_em_validation", "answer_nll_validation", "heldout_ppl", "tokens_per_s")
"""The per-seed scores a demo row averages (those a run reports)."""


@dataclass(frozen=True)
class Estimate:
    """The mean of a score over seeds and its spread (sample standard deviation; 0 for one seed)."""

    mean: float
    spread: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3g} +- {self.spread:.2g}"

    def percent(self) -> str:
        """``mean +- spread`` of a fraction, in percent."""
        return f"{self.mean:.1%} ± {self.spread:.1%}" if self.n > 1 else f"{self.mean:.1%}"


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and sample standard deviation of ``values`` (at least one, all finite)."""
    if not values:
        raise ValueError("no values to average")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite score among {list(values)}")
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return Estimate(statistics.fmean(values), spread, len(values))


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the summaries of a run's seeds: every score of :data:`SCORES` that all
    seeds report becomes its mean (same key) and spread (``<key>_spread``)."""
    row: dict[str, Any] = {"seeds": len(per_seed)}
    for key in SCORES:
        values = [s.get(key) for s in per_seed]
        if values and all(v is not None for v in values):
            est = estimate([float(v) for v in values])
            row[key], row[f"{key}_spread"] = est.mean, est.spread
    return row


def row_estimate(row: dict[str, Any], key: str) -> Estimate:
    """The :class:`Estimate` of ``key`` stored in an aggregated row."""
    return Estimate(row[key], row.get(f"{key}_spread", 0.0), row.get("seeds", 1))


def compare(better: Estimate, worse: Estimate, margin: float = 0.0) -> Verdict:
    """Whether ``better`` exceeds ``worse`` by more than ``margin`` beyond both spreads.

    ``holds`` when ``better.mean - worse.mean - margin`` exceeds the sum of the
    spreads, ``does not hold`` when it falls short of ``-(sum of spreads)``, and
    ``inconclusive`` in between, and whenever either side has fewer than two
    seeds: one seed has no spread, so no difference can be told from noise.
    """
    if min(better.n, worse.n) < 2:
        return "inconclusive"
    gap = better.mean - worse.mean - margin
    noise = better.spread + worse.spread
    if gap > noise:
        return "holds"
    if gap < -noise:
        return "does not hold"
    return "inconclusive"


def ratio(a: Estimate, b: Estimate) -> float:
    """``a.mean / b.mean`` (inf when b is 0 and a is not, nan when both are)."""
    if b.mean == 0:
        return math.nan if a.mean == 0 else math.inf
    return a.mean / b.mean
