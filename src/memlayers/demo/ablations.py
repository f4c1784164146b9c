"""Ablations: named variants of the demo's runs, trained side by side on one world.

An ablation file (``configs/demo_ablations.yaml``) names a demo preset, dotted
overrides of it, and a list of variants; each variant starts from one run of
the demo suite (``dense``, ``memory-256x256``, ...) and changes it with
RunConfig overrides (``optim.value_lr=3e-2``, ``model.memory.knn=8``, ...).
``memlayers demo --ablations FILE`` trains them all (``seeds`` times each,
the demo config's, e.g. ``--seeds 3``) and writes ``ablations.json`` and
``ablations.md`` (a table for the demo's report).

Every variant is also scored on the validation split: a design choice made
from an ablation reads that column, never the test split's extraction EM.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlayers.config import apply_overrides, check, from_dict, load_config, to_dict
from memlayers.demo.runner import (
    demo_config,
    per_run,
    prepare_world,
    train_suite,
    validation_qa,
    with_seeds,
)
from memlayers.demo.stats import aggregate, row_estimate
from memlayers.demo.suite import DemoConfig, DemoRun, build_runs
from memlayers.train.config import RunConfig


@dataclass
class Variant:
    """One row of the ablation table."""

    name: str
    run: str
    """The demo run it starts from (dense, memory-NxN, moe, dense-big)."""
    overrides: tuple[str, ...] = ()
    """Dotted RunConfig overrides, e.g. optim.value_lr=3e-2."""
    note: str = ""


@dataclass
class AblationConfig:
    """A set of variants on one demo world."""

    preset: str = "demo"
    demo_overrides: tuple[str, ...] = ()
    variants: list[Variant] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(len(self.variants) >= 1, "variants", "must list at least one variant")
        names = [v.name for v in self.variants]
        check(len(set(names)) == len(names), "variants", f"variant names must be unique, got {names}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def build_variants(ablation: AblationConfig, suite: list[DemoRun], out_dir: Path) -> list[DemoRun]:
    """DemoRuns for the variants: the named suite run with its overrides applied."""
    by_name = {run.name: run for run in suite}
    runs = []
    for variant in ablation.variants:
        check(variant.run in by_name, "variants", f"{variant.name}: unknown run {variant.run!r}; choose from {sorted(by_name)}")
        base = by_name[variant.run]
        data = apply_overrides(to_dict(base.config), [*variant.overrides, f"train.out_dir={out_dir / 'runs' / _slug(variant.name)}"])
        config = from_dict(RunConfig, data)
        slots = config.model.memory.n_slots if config.model.memory_layers else 0
        runs.append(DemoRun(variant.name, base.kind, slots, config))
    return runs


def _percent(row: dict[str, Any], key: str) -> str:
    """``mean ± spread`` of a fraction in ``row`` (its mean alone for one seed), or ``-``."""
    return "-" if row.get(key) is None else row_estimate(row, key).percent()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    """The ablation results as a markdown section."""
    lines = [
        f"## {title}",
        "",
        "| variant | from | changes | validation EM | extraction EM | recall EM | answer NLL (extraction) "
        "| held-out ppl | tokens/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        changes = ", ".join(f"`{o}`" for o in r["overrides"]) or "-"
        ppl = f"{r['heldout_ppl']:.2f}" if r.get("heldout_ppl") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['run']} | {changes} | {_percent(r, 'qa_em_validation')} | "
            f"{_percent(r, 'qa_em_extraction')} | {_percent(r, 'qa_em_recall')} | "
            f"{_number(r.get('answer_nll_extraction'))} | {ppl} | "
            f"{r['tokens_per_s']:,.0f} | {r['note']} |"
        )
    return "\n".join(lines)


def load_ablations(path: str | Path, overrides: list[str] = ()) -> tuple[AblationConfig, DemoConfig]:
    """An ablation file and its demo config: the file's preset with its ``demo_overrides``, then ``overrides``.

    ``overrides`` (the command line's) reach every variant; a key the demo
    config does not have is a ConfigError, never ignored.
    """
    ablation = load_config(AblationConfig, path)
    return ablation, demo_config(False, [*ablation.demo_overrides, *overrides], preset=ablation.preset)


def run_ablations(path: str | Path, out_dir: str | Path, workers: int | None = None,
                  overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Train every variant of an ablation file (with the demo ``overrides``); write ablations.json and ablations.md."""
    start = time.perf_counter()
    ablation, demo = load_ablations(path, overrides)
    out_dir = Path(out_dir)
    data, tokenizer = prepare_world(demo, out_dir)
    data = dataclasses.replace(data, qa={**data.qa, "validation": validation_qa(data)})
    runs = build_variants(ablation, build_runs(demo, data, str(out_dir), tokenizer.vocab_size), out_dir)
    summaries = train_suite(with_seeds(runs, demo.seeds), workers or demo.workers)
    rows = []
    for v, per_seed in zip(ablation.variants, per_run(summaries, demo.seeds), strict=True):
        rows.append({
            "name": v.name,
            "run": v.run,
            "overrides": list(v.overrides),
            "note": v.note,
            **{k: per_seed[0].get(k) for k in ("params", "flops_per_token")},
            **aggregate(per_seed),
        })
    minutes = (time.perf_counter() - start) / 60
    world = ", ".join([*ablation.demo_overrides, *overrides]) or "the demo preset"
    title = f"Ablations ({world}; {demo.seeds} seed{'s' if demo.seeds > 1 else ''} each; {minutes:.0f} min)"
    saved = {"config": to_dict(ablation), "overrides": list(overrides), "rows": rows}
    (out_dir / "ablations.json").write_text(json.dumps(saved, indent=2))
    (out_dir / "ablations.md").write_text(markdown_table(rows, title) + "\n")
    return rows
