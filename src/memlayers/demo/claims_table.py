"""The paper's claims as measured rows: finding, ours (mean +- spread over seeds), verdict.

Everything here is computed from a claims run's results (``claims.json``,
see :mod:`memlayers.demo.claims`), so the table can be checked against given
numbers. Verdicts follow :func:`memlayers.demo.stats.compare`: a claim holds
only when the difference exceeds the spreads, fails when it goes the other
way by as much, and is inconclusive otherwise.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from memlayers.demo.stats import Estimate, Verdict, compare, ratio, row_estimate  # noqa: E402

SCORES = (("qa_em_extraction", "extraction"), ("qa_em_recall", "recall"))
"""Every claim is checked on both scores, extraction first."""


def _pct(est: Estimate) -> str:
    return est.percent()


def _scaled(est: Estimate, factor: float) -> Estimate:
    return Estimate(est.mean * factor, est.spread * factor, est.n)


def _by_kind(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    dense = next(r for r in rows if r["kind"] == "dense")
    memory = sorted((r for r in rows if r["kind"] == "memory"), key=lambda r: r["memory_slots"])
    return dense, memory, {r["kind"]: r for r in rows if r["kind"] not in ("dense", "memory")}


def _rising(memory: list[dict[str, Any]], key: str) -> Verdict:
    """Holds when the largest beats the smallest beyond the spreads and no step down is beyond them."""
    steps = [compare(row_estimate(b, key), row_estimate(a, key)) for a, b in itertools.pairwise(memory)]
    overall = compare(row_estimate(memory[-1], key), row_estimate(memory[0], key))
    if overall == "holds" and "does not hold" not in steps:
        return "holds"
    if overall == "does not hold":
        return "does not hold"
    return "inconclusive"


def _row(claim: str, paper: str, ours: str, verdict: Verdict) -> dict[str, str]:
    return {"claim": claim, "paper": paper, "ours": ours, "verdict": verdict}


def size_and_baseline_claims(suite: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Rows of the comparison suite: EM against memory size, and the largest memory against
    dense at equal FLOPs (> 2x), an equally tuned MoE, and dense with >= 4x the FLOPs."""
    dense, memory, others = _by_kind(suite)
    largest = memory[-1]
    rows = []
    for key, score in SCORES:
        sizes = ", ".join(f"{int(r['memory_slots'] ** 0.5)}²: {_pct(row_estimate(r, key))}" for r in memory)
        rows.append(_row(f"{score} EM rises with memory size ({len(memory)} sizes)",
                         "rises steadily with memory size", sizes, _rising(memory, key)))
    for key, score in SCORES:
        mem, base = row_estimate(largest, key), row_estimate(dense, key)
        times = ratio(mem, base)
        rows.append(_row(f"{score}: largest memory vs dense at equal FLOPs",
                         "more than 2x on factual QA",
                         f"{_pct(mem)} vs {_pct(base)} ({times:.2f}x)" if math.isfinite(times) else f"{_pct(mem)} vs 0%",
                         compare(mem, _scaled(base, 2.0))))
    for kind, paper in (("moe", "memory beats MoE with matched parameters and FLOPs"),
                        ("peer", "memory beats PEER at matched size"),
                        ("dense_big", "memory matches or beats dense with >= 4x the FLOPs")):
        if kind not in others:
            continue
        other = others[kind]
        for key, score in SCORES:
            mem, base = row_estimate(largest, key), row_estimate(other, key)
            flops = other["flops_per_token"] / dense["flops_per_token"]
            rows.append(_row(f"{score}: largest memory vs {other['name']} ({flops:.1f}x dense FLOPs, tuned equally)",
                             paper, f"{_pct(mem)} vs {_pct(base)}", compare(mem, base)))
    return rows


def learning_speed_claims(curves: dict[str, dict[str, Any]], dense: str, memory: str) -> list[dict[str, str]]:
    """Memory learns faster: EM against training tokens, and the tokens memory needs to reach dense's final EM.

    ``curves[run]`` holds ``seeds``, ``tokens`` and, per score, ``mean`` and ``spread`` lists
    aligned with them (see :func:`memlayers.demo.claims.learning_curves`).
    """
    rows = []
    for key, score in SCORES:
        d, m = curves[dense][key], curves[memory][key]
        tokens = curves[dense]["tokens"]
        verdicts = [compare(Estimate(mm, ms, curves[memory]["seeds"]), Estimate(dm, ds, curves[dense]["seeds"]))
                    for mm, ms, dm, ds in zip(m["mean"], m["spread"], d["mean"], d["spread"], strict=True)]
        target = d["mean"][-1]
        reached = next((t for t, v in zip(curves[memory]["tokens"], m["mean"], strict=True) if v >= target), None)
        ahead = sum(v == "holds" for v in verdicts)
        behind = sum(v == "does not hold" for v in verdicts)
        verdict: Verdict = "holds" if ahead * 2 >= len(verdicts) and not behind else (
            "does not hold" if behind * 2 >= len(verdicts) else "inconclusive")
        when = (f"reaches dense's final {target:.1%} after {reached / 1e6:.2f}M of {tokens[-1] / 1e6:.2f}M tokens"
                if reached is not None else f"never reaches dense's final {target:.1%}")
        rows.append(_row(f"{score}: memory learns faster than dense", "ahead at every point of training",
                         f"ahead beyond the spread at {ahead}/{len(verdicts)} evaluations, behind at {behind}; {when}",
                         verdict))
    return rows


def layer_count_claims(layers: list[dict[str, Any]]) -> list[dict[str, str]]:
    """How many memory layers (the same shared memory): the paper finds 3 best and more worse."""
    rows = []
    for key, score in SCORES:
        by_count = {r["memory_layer_count"]: row_estimate(r, key) for r in layers}
        best = max(by_count, key=lambda k: by_count[k].mean)
        ours = ", ".join(f"{k}: {_pct(est)}" for k, est in sorted(by_count.items()))
        if 3 not in by_count:
            verdict: Verdict = "inconclusive"
        elif best == 3:
            verdict = "holds" if compare(by_count[3], by_count[max(by_count)]) == "holds" else "inconclusive"
        else:
            verdict = "does not hold" if compare(by_count[best], by_count[3]) == "holds" else "inconclusive"
        rows.append(_row(f"{score}: number of memory layers (best: {best})", "3 best; more is worse", ours, verdict))
    return rows


def complementary_claims(few: dict[str, Any], every: dict[str, Any]) -> list[dict[str, str]]:
    """Memory complements dense FFNs: replacing every FFN is worse than replacing a few."""
    return [
        _row(f"{score}: {few['name']} vs every FFN replaced by memory", "a few memory layers beat all-memory",
             f"{_pct(row_estimate(few, key))} vs {_pct(row_estimate(every, key))}",
             compare(row_estimate(few, key), row_estimate(every, key)))
        for key, score in SCORES
    ]


def claim_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """Every claim of a claims run's ``results`` (parts that were not run are left out)."""
    suite = results["suite"]
    rows = size_and_baseline_claims(suite)
    if results.get("curves"):
        rows += learning_speed_claims(results["curves"], results["curve_runs"]["dense"], results["curve_runs"]["memory"])
    if results.get("layers"):
        rows += layer_count_claims(results["layers"])
    if results.get("all_ffn"):
        few = _by_kind(suite)[1][-1]
        rows += complementary_claims(few, results["all_ffn"])
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    """The claims table."""
    lines = ["| claim | paper | ours (mean ± spread) | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['paper']} | {r['ours']} | **{r['verdict']}** |" for r in rows]
    return "\n".join(lines)


def _finish(fig, axes, title: str, path) -> None:
    """Title each panel with its score, format EM as percent, save and close."""
    for ax, (_, score) in zip(axes, SCORES, strict=True):
        ax.set_title(score, fontsize=10)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("factual QA exact match")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning(curves: dict[str, dict[str, Any]], path) -> None:
    """EM against training tokens for the curve runs (bands: spread over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True, sharey=True)
    for ax, (key, _) in zip(axes, SCORES, strict=True):
        for (name, curve), color in zip(curves.items(), ("gray", "tab:blue", "tab:orange", "black"), strict=False):
            x = [t / 1e6 for t in curve["tokens"]]
            mean, spread = curve[key]["mean"], curve[key]["spread"]
            ax.plot(x, mean, "o-", color=color, markersize=3, label=name)
            ax.fill_between(x, [m - s for m, s in zip(mean, spread, strict=True)],
                            [m + s for m, s in zip(mean, spread, strict=True)], color=color, alpha=0.15)
        ax.set_xlabel("training tokens (M)")
    _finish(fig, axes, "Learning speed: QA exact match during training", path)


def plot_layers(layers: list[dict[str, Any]], dense: dict[str, Any] | None, path) -> None:
    """EM against the number of memory layers sharing one memory (error bars: spread)."""
    rows = sorted(layers, key=lambda r: r["memory_layer_count"])
    counts = [r["memory_layer_count"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True, sharey=True)
    for ax, (key, _) in zip(axes, SCORES, strict=True):
        ax.errorbar(counts, [r[key] for r in rows], yerr=[r.get(f"{key}_spread", 0.0) for r in rows],
                    fmt="o-", capsize=3, color="tab:blue", label="memory layers (one shared memory)")
        if dense is not None:
            ax.axhline(dense[key], color="gray", linestyle=":", label=f"{dense['name']}")
        ax.set_xticks(counts)
        ax.set_xlabel("memory layers")
    _finish(fig, axes, "How many memory layers (same total memory, deeper model)", path)
