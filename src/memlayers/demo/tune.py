"""Equal tuning: the same search budget over every model kind's own learning rates.

``memlayers demo --tune`` trains, for each kind of the suite (dense, the
largest memory, MoE, PEER when enabled, the big dense model), the same number
of settings of its learning rates and keeps the one with the best exact match
on the **validation** split (ties: lower answer NLL). Tuning runs are given
no other QA set, so the test split cannot leak into a choice. The selected
values go to ``tuned.yaml`` (an ``lrs:`` block for the demo preset) and every
trial to ``tuning.json``.

The search has two stages, so that a kind with two learning rates gets as
fine a search over ``lr`` as a kind with one (a square grid would give it
only the square root of the trials per rate):

1. every kind trains the same ``lr_trials`` values of ``lr``, log-spaced over
   ``lr_range``; a second rate (``value_lr``, ``expert_lr``) is held at ``lr``
   times the geometric middle of ``ratio_range``;
2. at its best stage-1 ``lr``, a two-rate kind trains ``refine_trials`` other
   ratios from ``ratio_range``, and a one-rate kind trains the ``refine_trials``
   ``lr`` values halfway (in log) between stage-1 neighbours nearest its best.

Every kind thus trains exactly ``lr_trials + refine_trials`` settings, each
with ``seeds`` seeds, and a setting is judged by its mean: with one seed the
selection picks whichever trial was lucky, often a learning rate at the edge
of divergence (docs/evidence/log.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from memlayers.config import to_dict
from memlayers.demo.runner import per_run, prepare_world, train_suite, validation_qa, with_seeds
from memlayers.demo.stats import aggregate
from memlayers.demo.suite import (
    TUNED,
    DemoConfig,
    DemoRun,
    TuneConfig,
    build_runs,
    largest_of_each_kind,
)
from memlayers.train.config import DataConfig

Setting = dict[str, float]
"""Learning rates of one trial, by optim key (``lr`` and maybe ``value_lr`` or ``expert_lr``)."""


def _round(value: float) -> float:
    """``value`` to 3 significant digits (settings that read well in YAML)."""
    return float(f"{value:.3g}")


def _logspace(low: float, high: float, n: int) -> list[float]:
    """``n`` values from ``low`` to ``high``, evenly spaced in log (``[low]`` for n = 1), rounded to 3 digits."""
    if n == 1:
        return [low]
    return [_round(low * (high / low) ** (i / (n - 1))) for i in range(n)]


def _middle(low: float, high: float) -> float:
    """The geometric middle of ``[low, high]``."""
    return math.sqrt(low * high)


def first_stage(kind: str, tune: TuneConfig) -> list[Setting]:
    """Stage 1 for model ``kind``: the shared ``lr`` values, a second rate at the middle ratio."""
    names = TUNED[kind]
    lrs = _logspace(*tune.lr_range, tune.lr_trials)
    if len(names) == 1:
        return [{"lr": lr} for lr in lrs]
    ratio = _middle(*tune.ratio_range)
    return [{"lr": lr, names[1]: _round(lr * ratio)} for lr in lrs]


def second_stage(kind: str, tune: TuneConfig, best: Setting) -> list[Setting]:
    """Stage 2 for model ``kind`` around its best stage-1 setting ``best``: other ratios of
    the second rate at the same ``lr``, or (one rate) the nearest ``lr`` midpoints."""
    names, n = TUNED[kind], tune.refine_trials
    if len(names) == 2:
        ratios = _logspace(*tune.ratio_range, n + 1)
        middle = _middle(*tune.ratio_range)
        ratios.remove(min(ratios, key=lambda r: abs(math.log(r / middle))))  # stage 1 tried it
        return [{"lr": best["lr"], names[1]: _round(best["lr"] * r)} for r in ratios]
    lrs = _logspace(*tune.lr_range, tune.lr_trials)
    midpoints = [_round(_middle(a, b)) for a, b in itertools.pairwise(lrs)]
    nearest = sorted(midpoints, key=lambda m: abs(math.log(m / best["lr"])))[:n]  # ties: the lower
    return [{"lr": lr} for lr in sorted(nearest)]


def tuning_bases(demo: DemoConfig, data: DataConfig, out_dir: Path, vocab_size: int) -> dict[str, DemoRun]:
    """The run each kind's trials start from (the largest memory for ``memory``), with the
    preset's ``lrs`` left out and the validation split as its only QA set."""
    tuned_data = dataclasses.replace(data, qa={"validation": validation_qa(data)})
    return largest_of_each_kind(build_runs(dataclasses.replace(demo, lrs={}), tuned_data, str(out_dir / "tune"), vocab_size))


def trial(base: DemoRun, setting: Setting, out_dir: Path, index: int) -> tuple[DemoRun, Setting]:
    """Trial ``index`` of ``base``'s kind: its optim takes ``setting``, it trains into
    ``out_dir/tune/<kind>/trial<index>``."""
    optim = dataclasses.replace(base.config.optim, **setting)
    train = dataclasses.replace(base.config.train, out_dir=f"{out_dir}/tune/{base.kind}/trial{index}")
    config = dataclasses.replace(base.config, optim=optim, train=train)
    return dataclasses.replace(base, name=f"{base.kind} trial {index}", config=config), setting


def first_stage_runs(demo: DemoConfig, data: DataConfig, out_dir: Path, vocab_size: int) -> list[tuple[DemoRun, Setting]]:
    """``(run, setting)`` for every stage-1 trial of every kind."""
    bases = tuning_bases(demo, data, out_dir, vocab_size)
    return [trial(base, setting, out_dir, i)
            for kind, base in bases.items() for i, setting in enumerate(first_stage(kind, demo.tune))]


def second_stage_runs(first: list[tuple[DemoRun, Setting]], best: dict[str, Setting], tune: TuneConfig,
                      out_dir: Path) -> list[tuple[DemoRun, Setting]]:
    """``(run, setting)`` for every stage-2 trial, around each kind's ``best`` stage-1 setting."""
    bases = {run.kind: run for run, _ in first}
    return [trial(base, setting, out_dir, tune.lr_trials + j)
            for kind, base in bases.items() for j, setting in enumerate(second_stage(kind, tune, best[kind]))]


def select(trials: list[tuple[DemoRun, Setting]], summaries: list[dict[str, Any]]) -> dict[str, Setting]:
    """Per kind, the setting with the highest ``qa_em_validation`` (its mean over the tuning
    seeds; ties: lowest ``answer_nll_validation``, then the earlier trial); no other score is read."""
    best: dict[str, tuple[tuple[float, float], Setting]] = {}
    for (run, setting), summary in zip(trials, summaries, strict=True):
        score = (summary["qa_em_validation"], -summary["answer_nll_validation"])
        if run.kind not in best or score > best[run.kind][0]:
            best[run.kind] = (score, setting)
    return {kind: setting for kind, (_, setting) in best.items()}


def train_trials(trials: list[tuple[DemoRun, Setting]], seeds: int, workers: int) -> list[dict[str, Any]]:
    """Each trial trained with ``seeds`` seeds (into ``trial<i>/seed<k>``); per trial, the mean
    and spread of its validation scores over them (:func:`memlayers.demo.stats.aggregate`)."""
    summaries = train_suite(with_seeds([run for run, _ in trials], seeds), workers)
    scores = []
    for per_seed in per_run(summaries, seeds):
        row = aggregate(per_seed)
        row["per_seed"] = [s["qa_em_validation"] for s in per_seed]
        scores.append(row)
    return scores


def run_tuning(demo: DemoConfig, out_dir: str | Path) -> dict[str, Setting]:
    """Train both stages on the demo's world, write tuning.json and tuned.yaml into ``out_dir``,
    return the selected ``lrs``. Run again into the same ``out_dir`` after an interruption,
    it trains only the trials that did not finish."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_world(demo, out_dir)
    first = first_stage_runs(demo, data, out_dir, tokenizer.vocab_size)
    seeds = demo.tune.seeds
    first_scores = train_trials(first, seeds, demo.workers)
    second = second_stage_runs(first, select(first, first_scores), demo.tune, out_dir)
    trials, summaries = first + second, first_scores + train_trials(second, seeds, demo.workers)
    chosen = select(trials, summaries)
    record = {
        "config": to_dict(demo),
        "selected_on": "validation",
        "seeds": seeds,
        "trials": [
            {"kind": run.kind, "stage": 1 if index < len(first) else 2, **setting,
             **{k: s[k] for k in ("qa_em_validation", "qa_em_validation_spread", "answer_nll_validation") if k in s},
             "qa_em_validation_per_seed": s["per_seed"]}
            for index, ((run, setting), s) in enumerate(zip(trials, summaries, strict=True))
        ],
        "lrs": chosen,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "tuning.json").write_text(json.dumps(record, indent=2))
    header = (f"# learning rates selected by `memlayers demo --tune` on the validation split "
              f"({demo.tune.trials} trials per kind in two stages, {seeds} seed(s) each); paste into the demo preset\n")
    (out_dir / "tuned.yaml").write_text(header + yaml.safe_dump({"lrs": chosen}, sort_keys=False))
    return chosen
