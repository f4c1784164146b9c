"""What ``memlayers demo --continual`` writes: results.json, continual.md and continual.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from memlayers.data.text import write_text_atomic  # noqa: E402
from memlayers.demo.stats import estimate  # noqa: E402


def _label(row: dict[str, Any]) -> str:
    return f"{row['model']} {row['name']}"


def forgetting(row: dict[str, Any]) -> float:
    """Fraction of A's EM lost by learning the first round (0: nothing forgotten)."""
    before = row["old_em_before"]
    return (before - row["old_em_after"]) / before if before > 0 else float("nan")


def markdown(results: dict[str, Any]) -> str:
    """The methods table: learning (EM on new facts, and asked another way), forgetting, cost."""
    lines = [
        "| model | method | lr (per seed) | new facts EM | asked another way | A's EM before -> after | "
        "A lost | held-out ppl before -> after | s / fact | patch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["methods"]:
        patch = f"{r['patch_bytes'] / 1e3:,.0f} KB" if r["patch_bytes"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['name']} | {', '.join(f'{lr:g}' for lr in r['lr'])} | "
            f"{r['new_em']:.1%} ± {r['new_em_spread']:.1%} | {r['paraphrased_em']:.1%} ± {r['paraphrased_em_spread']:.1%} | "
            f"{r['old_em_before']:.1%} -> {r['old_em_after']:.1%} ± {r['old_em_after_spread']:.1%} | "
            f"{forgetting(r):.0%} | {r['heldout_ppl_before']:.2f} -> {r['heldout_ppl_after']:.2f} | "
            f"{r['seconds_per_fact']:.3f} | {patch} |")
    return "\n".join(lines)


def retention(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per model and method, A's EM after each round (mean and spread over seeds)."""
    curves = {}
    for entry in results["rounds"]:
        per_round = list(zip(*([r["old_em"] for r in run["rounds"]] for run in entry["per_seed"]), strict=True))
        estimates = [estimate(list(values)) for values in per_round]
        curves[f"{entry['model']} {entry['name']}"] = {"mean": [e.mean for e in estimates],
                                                       "spread": [e.spread for e in estimates]}
    return curves


def tradeoff(results: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """Per model and method, every learning rate of its grid on the validation group: ``lr``,
    ``new_em`` (the group's questions) and ``lost`` (fraction of A's EM lost), means over seeds.
    This is forgetting against learning at matched learning, whichever rate the selection kept."""
    curves = {}
    for entry in results["rounds"]:
        runs = entry["per_seed"]
        if not all("old_em" in t for run in runs for t in run["lr_trials"]):
            continue
        before = estimate([run["old_em_before"] for run in runs]).mean
        points = []
        for index, trial in enumerate(runs[0]["lr_trials"]):
            new = estimate([run["lr_trials"][index]["validation_em"] for run in runs]).mean
            old = estimate([run["lr_trials"][index]["old_em"] for run in runs]).mean
            points.append({"lr": trial["lr"], "new_em": new, "old_em": old,
                           "lost": (before - old) / before if before > 0 else float("nan")})
        curves[f"{entry['model']} {entry['name']}"] = points
    return curves


def tradeoff_markdown(results: dict[str, Any]) -> str:
    """The trade-off table: one row per model and method, one cell per learning rate."""
    lines = ["| model method | learning rate: EM on the validation group's facts / A's EM lost |", "|---|---|"]
    for name, points in tradeoff(results).items():
        cells = ", ".join(f"{p['lr']:g}: {p['new_em']:.0%} / {p['lost']:.0%}" for p in points)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def plot_continual(results: dict[str, Any], path: str | Path) -> Path:
    """Left: forgetting (A's EM lost) against learning (new EM) per method at every learning rate of
    its grid (validation group). Middle: the same at the chosen rate on the first round, error bars
    over seeds. Right: A's EM after each round of new facts."""
    fig, (grid, left, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, points in tradeoff(results).items():
        grid.plot([p["new_em"] for p in points], [p["lost"] for p in points],
                  marker="o" if name.startswith("memory") else "s", label=name)
    grid.set_xlabel("learned: EM on the validation group's facts")
    grid.set_ylabel("forgotten: fraction of A's EM lost")
    grid.set_title("every learning rate of the grid", fontsize=10)
    grid.legend(fontsize=8)
    for r in results["methods"]:
        lost = forgetting(r)
        spread = r["old_em_after_spread"] / r["old_em_before"] if r["old_em_before"] > 0 else 0.0
        left.errorbar(r["new_em"], lost, xerr=r["new_em_spread"], yerr=spread, fmt="o" if r["model"] == "memory" else "s",
                      capsize=3, label=_label(r))
    left.set_xlabel("learned: EM on the new facts")
    left.set_ylabel("forgotten: fraction of A's EM lost")
    left.set_title("the chosen rate, first round", fontsize=10)
    for name, curve in retention(results).items():
        rounds = range(1, len(curve["mean"]) + 1)
        right.errorbar(rounds, curve["mean"], yerr=curve["spread"], marker="o", capsize=3, label=name)
    right.set_xticks(range(1, results["config"]["continual"]["rounds"] + 1))
    right.set_xlabel("rounds of new facts learned")
    right.set_ylabel("EM on A's questions")
    right.yaxis.set_major_formatter(PercentFormatter(1.0))
    right.set_title("continual learning", fontsize=10)
    for ax in (grid, left):
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in (grid, left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_continual(results: dict[str, Any], out_dir: str | Path, preset: str) -> None:
    """results.json, continual.png and continual.md into ``out_dir``."""
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    plot_continual(results, out_dir / "continual.png")
    config = results["config"]["continual"]
    lines = [
        "# Learning new facts, forgetting old ones",
        "",
        f"A dense and a memory model pretrained on fact world A learn {config['new_people']} new people per round "
        f"(their biographies and question/answer pairs, {config['epochs']} epochs). Each method's learning rate "
        f"was chosen on a separate validation group of {config['validation_people']} new people; the table is the "
        f"first round, mean ± spread over {results['seeds']} seeds.",
        "",
        markdown(results),
        "",
        "Every learning rate of each grid on the validation group (the selection keeps the one that learns "
        "most; this shows what each method forgets at a given level of learning):",
        "",
        tradeoff_markdown(results),
        "",
        "![forgetting against learning](continual.png)",
        "",
        "Reproduce:",
        "",
        "```bash",
        f"memlayers demo --continual --preset {preset} --out {out_dir}" + "".join(f" {o}" for o in results["overrides"]),
        "```",
    ]
    write_text_atomic(out_dir / "continual.md", "\n".join(lines) + "\n")
