"""The demo's outputs: results.json, figure.png (matplotlib) and report.md."""

from __future__ import annotations

import itertools
import json
import math
import shlex
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from memlayers.data.text import write_text_atomic  # noqa: E402
from memlayers.demo.stats import compare, ratio, row_estimate  # noqa: E402

ABLATIONS = Path(__file__).with_name("ablations.md")


SETS = (("qa_em_extraction", "extraction: unseen questions (test split)"),
        ("qa_em_recall", "recall: questions seen in training"))
"""The two scores every figure and table leads with, extraction first."""


def _errorbar(ax, x, rows: list[dict[str, Any]], key: str, **style) -> None:
    ax.errorbar(x, [r[key] for r in rows], yerr=[r.get(f"{key}_spread", 0.0) for r in rows], capsize=3, **style)


def _band(ax, row: dict[str, Any], key: str, **style) -> None:
    """A baseline as a horizontal line with its mean +- spread shaded."""
    mean, spread = row[key], row.get(f"{key}_spread", 0.0)
    line = ax.axhline(mean, **style)
    if spread:
        ax.axhspan(mean - spread, mean + spread, color=line.get_color(), alpha=0.12)


def plot(results: dict[str, Any], path: Path) -> None:
    """Extraction and recall exact match against memory size (error bars: spread over seeds);
    dense, dense-big and MoE (and PEER) marked."""
    runs = results["runs"]
    memory = sorted((r for r in runs if r["kind"] == "memory"), key=lambda r: r["memory_slots"])
    by_kind = {r["kind"]: r for r in runs if r["kind"] != "memory"}
    slots = [r["memory_slots"] for r in memory]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True, sharey=True)
    for ax, (key, label) in zip(axes, SETS, strict=True):
        _errorbar(ax, slots, memory, key, fmt="o-", color="tab:blue", label="memory (Memory+)")
        if "dense" in by_kind:
            _band(ax, by_kind["dense"], key, color="gray", linestyle=":", label="dense (same FLOPs)")
        if "dense_big" in by_kind:
            big = by_kind["dense_big"]
            flops = big["flops_per_token"] / by_kind["dense"]["flops_per_token"] if "dense" in by_kind else float("nan")
            _band(ax, big, key, color="black", linestyle="--", label=f"dense, {flops:.1f}x FLOPs")
        for kind, marker, color, name in (("moe", "*", "tab:orange", "MoE"), ("peer", "D", "tab:green", "PEER")):
            if kind in by_kind:
                _errorbar(ax, [slots[-1]], [by_kind[kind]], key, fmt=marker, markersize=11 if kind == "moe" else 7,
                          color=color, label=f"{name} (matched to largest memory)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(slots, [f"{int(s ** 0.5)}²" for s in slots])
        ax.set_xlabel("memory slots")
        ax.set_title(label, fontsize=10)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("factual QA exact match")
    axes[1].legend(fontsize=8, loc="best")
    seeds = results.get("seeds", 1)
    fig.suptitle(f"Memory layers store facts: same data, same training tokens ({seeds} seed{'s' if seeds > 1 else ''}"
                 f"{', bars: spread' if seeds > 1 else ''})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _em(row: dict[str, Any], key: str) -> str:
    return row_estimate(row, key).percent()


def _versus(memory: dict[str, Any], other: dict[str, Any], key: str) -> str:
    a, b = row_estimate(memory, key), row_estimate(other, key)
    times = ratio(a, b)
    times_text = f"{times:.2f}x" if math.isfinite(times) else "no ratio: 0%"
    return f"{a.percent()} vs {b.percent()} ({times_text}; {compare(a, b)})"


def learning_rate_line(cfg: dict[str, Any]) -> str:
    """Where the learning rates came from: a tuned ``lrs`` block, or the untuned shared ``optim``."""
    tuned = sorted(cfg.get("lrs") or {})
    if tuned:
        return (f"- Learning rates as listed: tuned for {', '.join(tuned)} (the preset's `lrs`, selected by "
                "`memlayers demo --tune` on the validation split, the same number of trials for every kind); "
                "any other kind uses the shared `optim` values.")
    return ("- Learning rates as listed: the shared `optim` values for every kind, **not tuned** "
            "(`memlayers demo --tune` selects them on the validation split and writes the preset's `lrs`).")


def summary_lines(results: dict[str, Any]) -> list[str]:
    """What the run shows, in numbers: extraction and recall of the largest memory against
    each baseline (ratio of means; holds only beyond the spread over seeds), and against size."""
    runs = results["runs"]
    dense = next((r for r in runs if r["kind"] == "dense"), None)
    memory = sorted((r for r in runs if r["kind"] == "memory"), key=lambda r: r["memory_slots"])
    if dense is None or not memory:
        return []
    largest = memory[-1]
    lines = []
    for key, what in (("qa_em_extraction", "Extraction (unseen questions)"), ("qa_em_recall", "Recall (seen questions)")):
        others = [f"{r['name']} {_versus(largest, r, key)}" for r in runs if r["kind"] in ("moe", "peer", "dense_big")]
        rising = all(a[key] <= b[key] for a, b in itertools.pairwise(memory))
        lines += [
            f"- {what}: {largest['name']} {_versus(largest, dense, key)} against dense at the same FLOPs; "
            f"against {', '.join(others) or 'no other baseline'}.",
            f"  By memory size ({'rising' if rising else 'not monotonic'}): "
            + ", ".join(f"{r['name']} {_em(r, key)}" for r in memory) + ".",
        ]
    flops = max(abs(r["flops_per_token"] / dense["flops_per_token"] - 1) for r in memory)
    seeds = results.get("seeds", 1)
    lines.append(f"- Mean ± spread over {seeds} seed{'s' if seeds > 1 else ''}; memory FLOPs/token within {flops:.1%} "
                 "of dense. A difference holds only when it exceeds both spreads"
                 + (" (with one seed there is no spread: no verdict; use --seeds 3)." if seeds < 2 else "."))
    return lines


def learning_rates(row: dict[str, Any]) -> str:
    """A row's learning rates, e.g. ``lr 0.003, value_lr 0.01``."""
    extra = [f"{name} {row[name]:.2g}" for name in ("value_lr", "expert_lr") if row.get(name) is not None]
    return ", ".join([f"lr {row['lr']:.2g}", *extra])


def write_report(results: dict[str, Any], out_dir: Path, quick: bool = False, overrides: list[str] = ()) -> None:
    """Write results.json, figure.png and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    plot(results, out_dir / "figure.png")
    dense = next((r for r in results["runs"] if r["kind"] == "dense"), None)
    lines = [
        "# memlayers demo: factual QA against memory size",
        "",
        "![figure](figure.png)",
        "",
        "| run | slots | params | active params | FLOPs/token | vs dense | learning rates | extraction EM | "
        "recall EM | answer NLL (extraction) | held-out ppl | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        rel = r["flops_per_token"] / dense["flops_per_token"] if dense else float("nan")
        ppl = f"{r['heldout_ppl']:.2f}" if r.get("heldout_ppl") is not None else "-"
        nll = f"{r['answer_nll_extraction']:.3f}" if "answer_nll_extraction" in r else "-"
        lines.append(
            f"| {r['name']} | {r['memory_slots'] or '-'} | {_fmt(r['params'])} | {_fmt(r['active_params'])} | "
            f"{_fmt(r['flops_per_token'])} | {rel:.2f}x | {learning_rates(r)} | {_em(r, 'qa_em_extraction')} | "
            f"{_em(r, 'qa_em_recall')} | {nll} | {ppl} | {r['tokens_per_s']:,.0f} |"
        )
    cfg = results["config"]
    facts = cfg["facts"]
    lines += ["", "## What it shows", "", *summary_lines(results), ""]
    lines += [
        "## What is measured",
        "",
        f"- Fact world: {facts['n_people']} people x 5 attributes, seed {facts['seed']}; training text = "
        f"{facts['bios_per_person']} paraphrased biograph{'y' if facts['bios_per_person'] == 1 else 'ies'} per person "
        f"(sentences in a fresh order each) + the question/answer documents of {facts['seen_fraction']:.0%} of the people.",
        "- **Recall**: exact match on the questions of those seen people (trained on). **Extraction**: on the "
        "questions of the test people, whose facts appear only in their biographies; a disjoint validation split "
        "of unseen people is used for tuning only, never for what is reported.",
        learning_rate_line(cfg) + f" {results.get('seeds', 1)} training seed(s) per run, one fact world.",
        f"- Every run: {cfg['train']['steps']} steps of {cfg['train']['batch_size']} x {cfg['seq_len']} tokens, "
        f"AdamW, {cfg['train']['schedule']} schedule; documents re-packed in a fresh order every epoch (`data.repack`).",
        "- QA exact match: greedy answer after the question, normalised (case, punctuation, articles); "
        "answer NLL: mean nats per gold answer token given the question.",
        f"- Wall time {results['seconds'] / 60:.1f} min with {cfg['workers']} runs at a time, one CPU thread each "
        "(tokens/s are measured under that sharing).",
        "",
        "Reproduce:",
        "",
        "```bash",
        f"memlayers demo{' --quick' if quick else ''} --out {shlex.quote(str(out_dir))}"
        + "".join(f" {shlex.quote(o)}" for o in overrides),
        "```",
    ]
    if ABLATIONS.is_file():
        lines += ["", ABLATIONS.read_text().strip()]
    write_text_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
