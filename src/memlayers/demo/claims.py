"""``memlayers demo --claims``: every claim of the paper checked at this scale, over seeds.

A claims run trains, each with ``seeds`` seeds, on one fact world:

    suite       the demo's comparison (dense, memory at every size, MoE,
                PEER when enabled, dense with >= 4x FLOPs); dense and the
                largest memory are also evaluated every ``steps / curve_points``
                steps (the learning-speed curves);
    layers      a deeper model (``deep_layers`` blocks) with 1, 2, 3, ...
                memory layers (``layer_counts``) sharing one memory of the
                largest size, spread evenly over the blocks, and its dense twin;
    all_ffn     the demo's model with every FFN replaced by memory.

It writes ``claims.json`` (every row and curve), ``claims.md`` (the table of
:mod:`memlayers.demo.claims_table`, with the demo's table and the three
figures) and ``figure.png``, ``learning.png``, ``layers.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memlayers.config import check, load_config, to_dict
from memlayers.demo.claims_table import claim_rows, markdown, plot_layers, plot_learning
from memlayers.demo.report import plot, summary_lines
from memlayers.demo.runner import demo_config, prepare_world, result_rows, train_suite, with_seeds
from memlayers.demo.stats import estimate
from memlayers.demo.suite import DemoConfig, DemoRun, build_runs
from memlayers.train.metrics import read_metrics


@dataclass
class ClaimsConfig:
    """What a claims run trains (presets: configs/demo_claims.yaml, demo_claims_quick.yaml)."""

    preset: str = "demo"
    """The demo preset of the comparison suite (its world, model, lrs and budget)."""
    demo_overrides: tuple[str, ...] = ()
    seeds: int = 3
    curve_points: int = 5
    """Evaluations of dense and the largest memory during training (the last is the final one)."""
    deep_layers: int = 8
    """Blocks of the model of the layer-count runs."""
    layer_counts: tuple[int, ...] = (1, 2, 3, 4, 6)
    """Memory layers (one shared memory of the largest size) of each layer-count run; () skips them."""
    all_ffn: bool = True
    """Also train the demo's model with every FFN replaced by memory."""

    def __post_init__(self) -> None:
        check(1 <= self.seeds <= 100, "seeds", f"must be in [1, 100], got {self.seeds}")
        check(self.curve_points >= 0, "curve_points", f"must be >= 0, got {self.curve_points}")
        check(self.deep_layers >= 1, "deep_layers", f"must be >= 1, got {self.deep_layers}")
        for count in self.layer_counts:
            check(1 <= count <= self.deep_layers, "layer_counts",
                  f"each count must be in [1, deep_layers={self.deep_layers}], got {count}")


def spread_layers(count: int, n_layers: int) -> tuple[int, ...]:
    """``count`` block indices spread evenly over ``n_layers`` blocks, centred in their spans
    (the paper's 3 of 24: 4, 12, 20)."""
    return tuple(sorted({int(n_layers / (2 * count) + i * n_layers / count) for i in range(count)}))


def claim_runs(claims: ClaimsConfig, demo: DemoConfig, suite: list[DemoRun], out_dir: Path) -> dict[str, list[DemoRun]]:
    """The runs of each part (see the module docstring), built from the suite's dense and largest memory."""
    dense = next(run for run in suite if run.kind == "dense")
    largest = [run for run in suite if run.kind == "memory"][-1]
    if claims.curve_points:
        every = max(1, demo.train.steps // claims.curve_points)
        for index, run in enumerate(suite):
            if run is dense or run is largest:
                train = dataclasses.replace(run.config.train, eval_every=every)
                suite[index] = dataclasses.replace(run, config=dataclasses.replace(run.config, train=train))

    def variant(run: DemoRun, name: str, **model_changes: Any) -> DemoRun:
        model = dataclasses.replace(run.config.model, **model_changes)
        train = dataclasses.replace(run.config.train, out_dir=str(out_dir / "runs" / name), eval_every=0)
        return DemoRun(name, run.kind, run.memory_slots, dataclasses.replace(run.config, model=model, train=train))

    parts: dict[str, list[DemoRun]] = {"suite": suite, "layers": [], "all_ffn": []}
    if claims.layer_counts:
        deep = claims.deep_layers
        parts["layers"].append(variant(dense, f"dense-{deep}-blocks", n_layers=deep))
        for count in claims.layer_counts:
            parts["layers"].append(variant(largest, f"{count}-memory-layers", n_layers=deep,
                                           memory_layers=spread_layers(count, deep)))
    if claims.all_ffn:
        every_block = tuple(range(largest.config.model.n_layers))
        parts["all_ffn"].append(variant(largest, "memory-in-every-block", memory_layers=every_block))
    return parts


def learning_curves(runs: list[DemoRun], seeds: int) -> dict[str, dict[str, Any]]:
    """For each run evaluated during training: ``seeds``, ``tokens`` and, per QA score, the
    ``mean`` and ``spread`` over seeds at each evaluation (read from every seed's metrics.jsonl)."""
    curves = {}
    for run in runs:
        if not run.config.train.eval_every:
            continue
        per_seed = [
            {r["step"]: r for r in read_metrics(f"{run.config.train.out_dir}/seed{k}") if "qa_em_recall" in r}
            for k in range(seeds)
        ]
        steps = sorted(set.intersection(*(set(records) for records in per_seed)))
        train = run.config.train
        curve: dict[str, Any] = {"seeds": seeds, "steps": steps,
                                 "tokens": [s * train.batch_size * train.grad_accum * run.config.data.seq_len for s in steps]}
        for key in ("qa_em_recall", "qa_em_extraction"):
            estimates = [estimate([records[s][key] for records in per_seed]) for s in steps]
            curve[key] = {"mean": [e.mean for e in estimates], "spread": [e.spread for e in estimates]}
        curves[run.name] = curve
    return curves


def run_claims(path: str | Path, out_dir: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Train every part of a claims file (``overrides`` reach its demo preset); write the outputs."""
    start = time.perf_counter()
    claims = load_config(ClaimsConfig, path)
    check(not any(o.split("=", 1)[0].strip() == "seeds" for o in overrides), "seeds",
          f"a claims run trains {claims.seeds} seeds, as its preset {path} says; change seeds there, not in the demo's")
    demo = demo_config(False, [*claims.demo_overrides, *overrides], preset=claims.preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_world(demo, out_dir)
    parts = claim_runs(claims, demo, build_runs(demo, data, str(out_dir), tokenizer.vocab_size), out_dir)
    every_run = [run for runs in parts.values() for run in runs]
    summaries = train_suite(with_seeds(every_run, claims.seeds), demo.workers)
    rows = result_rows(every_run, summaries, claims.seeds, out_dir)
    by_part, offset = {}, 0
    for part, runs in parts.items():
        by_part[part] = rows[offset : offset + len(runs)]
        offset += len(runs)
    for run, row in zip(parts["layers"], by_part["layers"], strict=True):
        row["memory_layer_count"] = len(run.config.model.memory_layers)
    suite = parts["suite"]
    results = {
        "suite": by_part["suite"],
        "layers": [r for r in by_part["layers"] if r["kind"] == "memory"],
        "deep_dense": next((r for r in by_part["layers"] if r["kind"] == "dense"), None),
        "all_ffn": by_part["all_ffn"][0] if by_part["all_ffn"] else None,
        "curves": learning_curves(suite, claims.seeds),
        "curve_runs": {"dense": suite[0].name, "memory": [r for r in suite if r.kind == "memory"][-1].name},
        "config": {"claims": to_dict(claims), "demo": to_dict(demo)},
        "overrides": list(overrides),
        "seeds": claims.seeds,
        "seconds": time.perf_counter() - start,
    }
    results["claims"] = claim_rows(results)
    write_claims(results, out_dir, path)
    return results


def write_claims(results: dict[str, Any], out_dir: Path, path: str | Path) -> None:
    """claims.json, the figures and claims.md into ``out_dir``."""
    (out_dir / "claims.json").write_text(json.dumps(results, indent=2))
    plot({"runs": results["suite"], "seeds": results["seeds"]}, out_dir / "figure.png")
    figures = ["![QA against memory size](figure.png)"]
    if results["curves"]:
        plot_learning(results["curves"], out_dir / "learning.png")
        figures.append("![learning speed](learning.png)")
    if results["layers"]:
        plot_layers(results["layers"], results["deep_dense"], out_dir / "layers.png")
        figures.append("![memory layer count](layers.png)")
    demo = results["config"]["demo"]
    lines = [
        "# The paper's claims, measured",
        "",
        f"Each row: the paper's finding, ours as mean ± spread (sample standard deviation) over "
        f"{results['seeds']} training seeds, and whether it holds beyond the spread. Extraction: questions of "
        "people whose facts appear only in their biographies (test split); recall: questions trained on. "
        "Learning rates per model kind from the preset's `lrs` (selected by `memlayers demo --tune` on the "
        "validation split); nothing here was chosen on the test split.",
        "",
        markdown(results["claims"]),
        "",
        *figures,
        "",
        "## The comparison suite",
        "",
        *summary_lines({"runs": results["suite"], "seeds": results["seeds"]}),
        "",
        f"World: {demo['facts']['n_people']} people, {demo['facts']['bios_per_person']} biographies each, "
        f"{demo['facts']['seen_fraction']:.0%} with QA in training; every run {demo['train']['steps']} steps of "
        f"{demo['train']['batch_size']} x {demo['seq_len']} tokens. Wall time {results['seconds'] / 60:.0f} min "
        f"({demo['workers']} runs at a time, one CPU thread each).",
        "",
        "Reproduce:",
        "",
        "```bash",
        f"memlayers demo --claims {path} --out {out_dir}" + "".join(f" {o}" for o in results["overrides"]),
        "```",
    ]
    (out_dir / "claims.md").write_text("\n".join(lines) + "\n")
