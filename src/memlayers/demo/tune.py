"""Equal tuning: the same search budget over every model kind's own learning rates.

``memlayers demo --tune`` trains, for each kind of the suite (dense, the
largest memory, MoE, PEER when enabled, the big dense model), ``trials``
settings of its learning rates and keeps the one with the best exact match
on the **validation** split (ties: lower answer NLL). Tuning runs are given
no other QA set, so the test split cannot leak into a choice. The selected
values go to ``tuned.yaml`` (an ``lrs:`` block for the demo preset) and every
trial to ``tuning.json``.

Kinds with one learning rate (``lr``) get ``trials`` values log-spaced over
``lr_range``; kinds with two (``lr`` and ``value_lr`` or ``expert_lr``) get
a ``sqrt(trials)`` x ``sqrt(trials)`` grid: ``lr`` over the same range and the
second as ``lr`` times a ratio log-spaced over ``ratio_range``. Every kind
thus trains exactly ``trials`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from memlayers.config import to_dict
from memlayers.demo.runner import prepare_world, train_suite
from memlayers.demo.suite import (
    TUNED,
    DemoConfig,
    DemoRun,
    TuneConfig,
    build_runs,
    largest_of_each_kind,
)
from memlayers.train.config import DataConfig
from memlayers.train.metrics import read_metrics
from memlayers.train.run_dir import move_aside


def _logspace(low: float, high: float, n: int) -> list[float]:
    """``n`` values from ``low`` to ``high``, evenly spaced in log (``[low]`` for n = 1), rounded to 3 digits."""
    if n == 1:
        return [low]
    return [float(f"{low * (high / low) ** (i / (n - 1)):.3g}") for i in range(n)]


def grid(kind: str, tune: TuneConfig) -> list[dict[str, float]]:
    """The ``tune.trials`` learning-rate settings tried for model ``kind`` (keys of ``TUNED[kind]``)."""
    names = TUNED[kind]
    if len(names) == 1:
        return [{"lr": lr} for lr in _logspace(*tune.lr_range, tune.trials)]
    side = math.isqrt(tune.trials)
    return [
        {"lr": lr, names[1]: float(f"{lr * ratio:.3g}")}
        for lr in _logspace(*tune.lr_range, side)
        for ratio in _logspace(*tune.ratio_range, side)
    ]


def tuning_runs(demo: DemoConfig, data: DataConfig, out_dir: Path, vocab_size: int) -> list[tuple[DemoRun, dict[str, float]]]:
    """``(run, setting)`` for every trial: one run per kind (the largest memory for ``memory``),
    its optim replaced by the setting, scored on the validation split alone."""
    validation = str(Path(data.qa["extraction"]).with_name("qa_validation.jsonl"))
    tuned_data = dataclasses.replace(data, qa={"validation": validation})
    suite = build_runs(dataclasses.replace(demo, lrs={}), tuned_data, str(out_dir / "tune"), vocab_size)
    trials = []
    for kind, run in largest_of_each_kind(suite).items():
        for index, setting in enumerate(grid(kind, demo.tune)):
            optim = dataclasses.replace(run.config.optim, **setting)
            train = dataclasses.replace(run.config.train, out_dir=f"{out_dir}/tune/{kind}/trial{index}")
            config = dataclasses.replace(run.config, optim=optim, train=train)
            trials.append((dataclasses.replace(run, name=f"{kind} trial {index}", config=config), setting))
    return trials


def select(trials: list[tuple[DemoRun, dict[str, float]]], summaries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind, the setting with the highest ``qa_em_validation`` (ties: lowest
    ``answer_nll_validation``, then the earlier trial); no other score is read."""
    best: dict[str, tuple[tuple[float, float], dict[str, float]]] = {}
    for (run, setting), summary in zip(trials, summaries, strict=True):
        score = (summary["qa_em_validation"], -summary["answer_nll_validation"])
        if run.kind not in best or score > best[run.kind][0]:
            best[run.kind] = (score, setting)
    return {kind: setting for kind, (_, setting) in best.items()}


def finished(run: DemoRun) -> dict[str, Any] | None:
    """The final validation scores of a trial that an earlier ``--tune`` into the same directory
    completed (its metrics.jsonl has them at the last step), else None."""
    path = Path(run.config.train.out_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    final = [r for r in read_metrics(path.parent)
             if r.get("step") == run.config.train.steps and "qa_em_validation" in r and "answer_nll_validation" in r]
    return final[-1] if final else None


def run_tuning(demo: DemoConfig, out_dir: str | Path) -> dict[str, dict[str, float]]:
    """Train every trial on the demo's world, write tuning.json and tuned.yaml into
    ``out_dir``, return the selected ``lrs``. Run again into the same ``out_dir`` after an
    interruption, it trains only the trials that did not finish."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_world(demo, out_dir)
    trials = tuning_runs(demo, data, out_dir, tokenizer.vocab_size)
    summaries: list[dict[str, Any] | None] = [finished(run) for run, _ in trials]
    todo = [run for (run, _), summary in zip(trials, summaries, strict=True) if summary is None]
    for run in todo:  # an interrupted trial starts again; what it wrote is kept under replaced/
        if Path(run.config.train.out_dir).is_dir():
            move_aside(Path(run.config.train.out_dir))
    fresh = iter(train_suite(todo, demo.workers))
    summaries = [summary if summary is not None else next(fresh) for summary in summaries]
    chosen = select(trials, summaries)
    record = {
        "config": to_dict(demo),
        "selected_on": "validation",
        "trials": [
            {"kind": run.kind, **setting,
             **{k: s[k] for k in ("qa_em_validation", "answer_nll_validation") if k in s}}
            for (run, setting), s in zip(trials, summaries, strict=True)
        ],
        "lrs": chosen,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "tuning.json").write_text(json.dumps(record, indent=2))
    header = (f"# learning rates selected by `memlayers demo --tune` on the validation split "
              f"({demo.tune.trials} trials per kind); paste into the demo preset\n")
    (out_dir / "tuned.yaml").write_text(header + yaml.safe_dump({"lrs": chosen}, sort_keys=False))
    return chosen
