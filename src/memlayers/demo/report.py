"""The demo's outputs: results.json, figure.png (matplotlib) and report.md."""

from __future__ import annotations

import itertools
import json
import os
import shlex
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

ABLATIONS = Path(__file__).with_name("ablations.md")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(results: dict[str, Any], path: Path) -> None:
    """QA exact match and answer NLL against memory size; dense, dense-big and MoE marked."""
    runs = results["runs"]
    memory = sorted((r for r in runs if r["kind"] == "memory"), key=lambda r: r["memory_slots"])
    by_kind = {r["kind"]: r for r in runs if r["kind"] != "memory"}
    slots = [r["memory_slots"] for r in memory]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "qa_em", "factual QA exact match"), (axes[1], "answer_nll", "answer NLL (nats/token)")):
        ax.plot(slots, [r[key] for r in memory], "o-", color="tab:blue", label="memory (Memory+)")
        if "dense" in by_kind:
            ax.axhline(by_kind["dense"][key], color="gray", linestyle=":", label="dense (same FLOPs)")
        if "dense_big" in by_kind:
            big = by_kind["dense_big"]
            ratio = big["flops_per_token"] / by_kind["dense"]["flops_per_token"] if "dense" in by_kind else float("nan")
            ax.axhline(big[key], color="black", linestyle="--", label=f"dense, {ratio:.1f}x FLOPs")
        if "moe" in by_kind:
            ax.plot([slots[-1]], [by_kind["moe"][key]], "*", markersize=13, color="tab:orange",
                    label="MoE (matched to largest memory)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(slots, [f"{int(s ** 0.5)}²" for s in slots])
        ax.set_xlabel("memory slots")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Memory layers store facts: same data, same training tokens")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """What the run shows, in numbers: the EM ratio and whether EM rises with size."""
    runs = results["runs"]
    dense = next((r for r in runs if r["kind"] == "dense"), None)
    memory = sorted((r for r in runs if r["kind"] == "memory"), key=lambda r: r["memory_slots"])
    if dense is None or not memory:
        return []
    largest = memory[-1]
    ratio = f"**{largest['qa_em'] / dense['qa_em']:.2f}x**" if dense["qa_em"] > 0 else "n/a (dense 0%)"
    rising = all(a["qa_em"] <= b["qa_em"] for a, b in itertools.pairwise(memory))
    flops = max(abs(r["flops_per_token"] / dense["flops_per_token"] - 1) for r in memory)
    others = [
        f"{r['name']} {r['qa_em']:.1%} ({r['flops_per_token'] / dense['flops_per_token']:.2f}x FLOPs)"
        for r in runs
        if r["kind"] in ("moe", "dense_big")
    ]
    return [
        f"- Largest memory ({largest['name']}) exact match {largest['qa_em']:.1%} vs dense {dense['qa_em']:.1%}: "
        f"{ratio}.",
        *([f"- Against the other baselines: {', '.join(others)}."] if others else []),
        f"- Exact match {'rises' if rising else 'does not rise monotonically'} with memory size: "
        + ", ".join(f"{r['name']} {r['qa_em']:.1%}" for r in memory) + ".",
        f"- Memory models' FLOPs/token within {flops:.1%} of dense.",
    ]


def write_report(results: dict[str, Any], out_dir: Path, quick: bool = False, overrides: list[str] = ()) -> None:
    """Write results.json, figure.png and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    _write_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    plot(results, out_dir / "figure.png")
    dense = next((r for r in results["runs"] if r["kind"] == "dense"), None)
    lines = [
        "# memlayers demo: factual QA against memory size",
        "",
        "![figure](figure.png)",
        "",
        "| run | slots | params | memory params | active params | FLOPs/token | vs dense | tokens/s | QA EM | answer NLL | held-out ppl |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        rel = r["flops_per_token"] / dense["flops_per_token"] if dense else float("nan")
        ppl = f"{r['heldout_ppl']:.2f}" if r.get("heldout_ppl") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['memory_slots'] or '-'} | {_fmt(r['params'])} | {_fmt(r['memory_params'])} | "
            f"{_fmt(r['active_params'])} | {_fmt(r['flops_per_token'])} | {rel:.2f}x | {r['tokens_per_s']:,.0f} | "
            f"{r['qa_em']:.1%} | {r['answer_nll']:.3f} | {ppl} |"
        )
    cfg = results["config"]
    lines += ["", "## What it shows", "", *summary_lines(results), ""]
    lines += [
        "## Setup",
        "",
        f"- Fact world: {cfg['facts']['n_people']} people x 5 attributes, seed {cfg['facts']['seed']}; "
        f"training text = {cfg['facts']['bios_per_person']} paraphrased biograph"
        f"{'y' if cfg['facts']['bios_per_person'] == 1 else 'ies'} per person"
        f"{' + question/answer documents' if cfg['facts']['qa_in_train'] else ''}.",
        f"- Every run: {cfg['train']['steps']} steps of {cfg['train']['batch_size']} x {cfg['seq_len']} tokens, "
        f"AdamW lr {cfg['optim']['lr']}, value lr {cfg['optim']['value_lr']}, {cfg['train']['schedule']} schedule.",
        "- Documents are packed into rows in a fresh random order every epoch (`data.repack`).",
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
    _write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
