"""Run the demo: one fact world and tokenizer, then every model of the suite, once per seed.

Runs go to worker processes (``workers`` at a time, one CPU thread each:
tiny models run best single-threaded, and two at once use both cores of a
laptop-class machine). One progress bar counts the steps of all runs. Every
run reports recall (questions of the seen people, trained on) and extraction
(the test people's questions, never trained on); each row of results.json
is the mean and spread over the seeds (``memlayers.demo.stats``).

A command run again into the same output directory (after an interruption,
or to add seeds or runs) reads back every run that finished there with the
same config and the same data and tokenizer files, and trains the rest; an
unfinished or different run is moved aside to ``replaced/``, never deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memlayers.config import ConfigError, from_dict, load_config, to_dict
from memlayers.data.facts import generate_world, write_world
from memlayers.data.text import read_documents
from memlayers.data.tokenizer import Tokenizer
from memlayers.demo.report import write_report
from memlayers.demo.stats import SCORES, aggregate
from memlayers.demo.suite import DemoConfig, DemoRun, build_runs
from memlayers.model.accounting import count_flops, size_fields
from memlayers.procs import run_all
from memlayers.train.checkpoint import CheckpointError, read_state, resolve_checkpoint
from memlayers.train.config import DataConfig, RunConfig
from memlayers.train.metrics import read_metrics
from memlayers.train.run_dir import file_fingerprint


def demo_config(quick: bool, overrides: list[str] = (), preset: str | None = None) -> DemoConfig:
    """The demo preset (``demo`` or ``demo_quick``, or ``preset``) with dotted overrides."""
    return load_config(DemoConfig, preset or ("demo_quick" if quick else "demo"), list(overrides))


def prepare_world(demo: DemoConfig, out_dir: Path) -> tuple[DataConfig, Tokenizer]:
    """Write the fact world and train the shared tokenizer under ``out_dir/data``.

    The DataConfig scores recall (``qa_seen``) and extraction (``qa_test``);
    tuning replaces them with the validation split (``memlayers.demo.tune``).
    """
    data_dir = out_dir / "data"
    files = write_world(generate_world(demo.facts), data_dir)
    tokenizer = Tokenizer.train(read_documents(files["train"]), demo.vocab_size)
    tokenizer_path = data_dir / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    data = DataConfig(
        train=str(files["train"]),
        heldout=str(files["heldout"]),
        qa={"recall": str(files["qa_seen"]), "extraction": str(files["qa_test"])},
        tokenizer=str(tokenizer_path),
        vocab_size=demo.vocab_size,
        seq_len=demo.seq_len,
        facts=demo.facts,
    )
    return data, tokenizer


def validation_qa(data: DataConfig) -> str:
    """The validation split's QA file (unseen people, disjoint from the test split) of a
    world written by :func:`prepare_world`: what tuning and design choices may read."""
    return str(Path(data.qa["extraction"]).with_name("qa_validation.jsonl"))


def _data_files(data: DataConfig) -> dict[str, str | None]:
    """The files a run of ``data`` reads, by the names its checkpoints fingerprint them under."""
    return {"train": data.train, "heldout": data.heldout, **{f"qa.{name}": path for name, path in data.qa.items()},
            "tokenizer": data.tokenizer}


def _placeless(config: dict[str, Any]) -> dict[str, Any] | None:
    """A run config as JSON sees it, with the defaults of fields added since it was saved filled
    in (a newer memlayers still recognises its runs) and without ``train.out_dir`` (the same
    run moved elsewhere still matches); None when it is no valid config now."""
    try:
        config = json.loads(json.dumps(to_dict(from_dict(RunConfig, config))))
    except ConfigError:
        return None
    config.get("train", {}).pop("out_dir", None)
    return config


def finished_summary(config: RunConfig) -> dict[str, Any] | None:
    """The summary of a run that an earlier command completed in ``config.train.out_dir`` with
    exactly ``config`` and the same data and tokenizer files (its final checkpoint and final
    evaluation are there), read back instead of retrained; None for anything else."""
    run_dir = Path(config.train.out_dir)
    try:
        checkpoint = resolve_checkpoint(run_dir)
        state = read_state(checkpoint)
    except CheckpointError:
        return None
    if state.get("step") != config.train.steps or not isinstance(state.get("config"), dict):
        return None
    if _placeless(state["config"]) != _placeless(to_dict(config)):
        return None
    files, saved = _data_files(config.data), state.get("fingerprints") or {}
    if set(saved) != set(files) or any(path is not None and not Path(path).is_file() for path in files.values()):
        return None
    if any(file_fingerprint(files[name]) != digest for name, digest in saved.items()):
        return None
    try:
        last = [r for r in read_metrics(run_dir) if r.get("step") == config.train.steps]
    except (OSError, ValueError):  # no metrics.jsonl, or a line cut short
        return None
    final = [r for r in last if "loss" not in r]  # the final evaluation follows the last step's log line
    logged = [r for r in last if "tokens_per_s" in r]
    if not final or not logged:
        return None  # stopped between the final checkpoint and the final evaluation
    return {**final[-1], "step": config.train.steps, "checkpoint": str(checkpoint),
            "tokens_per_s": logged[-1]["tokens_per_s"], **size_fields(config.model, config.data.seq_len)}


def _train_one(config: RunConfig, send: Callable[[int], None]) -> dict[str, Any]:
    """Worker: train one run afresh (an unfinished one there moves aside), sending 1 for each
    step (the parent's progress bar counts them)."""
    from memlayers.train.trainer import Trainer

    return Trainer(config, overwrite=True).fit(progress=False, on_step=lambda step: send(1))


def with_seeds(runs: list[DemoRun], seeds: int) -> list[DemoRun]:
    """Each run once per seed: ``train.seed`` + 0..seeds-1, written to ``<out_dir>/seed<k>``."""
    seeded = []
    for run in runs:
        for k in range(seeds):
            train = dataclasses.replace(run.config.train, seed=run.config.train.seed + k,
                                        out_dir=f"{run.config.train.out_dir}/seed{k}")
            seeded.append(dataclasses.replace(run, config=dataclasses.replace(run.config, train=train)))
    return seeded


def per_run(summaries: list[dict[str, Any]], seeds: int) -> list[list[dict[str, Any]]]:
    """Run-major summaries (as :func:`with_seeds` orders the runs) grouped into each run's seeds."""
    return [summaries[start : start + seeds] for start in range(0, len(summaries), seeds)]


def train_suite(runs: list[DemoRun], workers: int,
                train: Callable[[list[DemoRun], int], list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Train every run (``workers`` at a time, each in its own process) and return their summaries in order.

    A run that finished in its directory with the same config and files is read back
    (:func:`finished_summary`), not retrained; ``train(runs, workers)`` trains the others
    (default: in-process workers with one progress bar; the real-facts bench passes one that
    calls ``memlayers train``). A run that fails stops the others and is named in the error;
    SIGINT or SIGTERM stop them all (``memlayers.procs.run_all``).
    """
    done = [finished_summary(run.config) for run in runs]
    if any(done):
        print(f"memlayers: read back {sum(s is not None for s in done)} of {len(runs)} runs that finished "
              "in the output directory with the same config and data", file=sys.stderr)
    missing = [run for run, summary in zip(runs, done, strict=True) if summary is None]
    fresh = iter((train or _train)(missing, workers) if missing else [])
    return [summary if summary is not None else next(fresh) for summary in done]


def _train(runs: list[DemoRun], workers: int) -> list[dict[str, Any]]:
    """Train ``runs``; their summaries in order."""
    total = sum(run.config.train.steps for run in runs)
    # the costliest runs first, so that no worker is left with a long run at the end
    order = sorted(range(len(runs)), key=lambda i: -count_flops(runs[i].config.model).total * runs[i].config.train.steps)
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # the same run with several seeds
        names = [f"{run.name} (seed {run.config.train.seed})" for run in runs]
    jobs = [(names[i], (runs[i].config,)) for i in order]
    steps = dict.fromkeys(names, 0)
    with tqdm(total=total, unit="step", desc="demo", dynamic_ncols=True) as bar:

        def on_step(name: str, n: int) -> None:
            steps[name] += n
            bar.update(n)
            done = sum(steps[name] == run.config.train.steps for name, run in zip(names, runs, strict=True))
            bar.set_postfix_str(f"{done}/{len(runs)} runs trained")

        summaries = run_all(_train_one, jobs, workers, on_step)
    by_run = dict(zip(order, summaries, strict=True))
    return [by_run[i] for i in range(len(runs))]


def result_rows(runs: list[DemoRun], summaries: list[dict[str, Any]], seeds: int, out_dir: Path) -> list[dict[str, Any]]:
    """One results.json row per run: its sizes, the mean and spread of every score over its
    ``seeds`` (the summaries come run-major, as :func:`with_seeds` orders them), its learning
    rates and each seed's scores."""
    rows = []
    for run, per_seed in zip(runs, per_run(summaries, seeds), strict=True):
        first, optim = per_seed[0], run.config.optim
        rows.append({
            "name": run.name,
            "kind": run.kind,
            "memory_slots": run.memory_slots,
            **{key: first[key] for key in ("params", "memory_params", "active_params", "flops_per_token")},
            "heldout_ppl": None,
            **aggregate(per_seed),
            "lr": optim.lr,
            "value_lr": optim.value_lr if run.kind in ("memory", "peer") else None,
            "expert_lr": (optim.expert_lr or optim.lr) if run.kind == "moe" else None,
            "checkpoint": os.path.relpath(first["checkpoint"], out_dir),
            "per_seed": [
                {"seed": run.config.train.seed + k, **{key: s[key] for key in SCORES if key in s}}
                for k, s in enumerate(per_seed)
            ],
        })
    return rows


def run_demo(quick: bool = False, out_dir: str | Path = "demo_out", overrides: list[str] = (),
             preset: str | None = None) -> dict[str, Any]:
    """Generate the world, train the suite (``seeds`` times each), write results.json, figure.png and report.md."""
    start = time.perf_counter()
    demo = demo_config(quick, overrides, preset)
    seeds = demo.seeds
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_world(demo, out_dir)
    runs = build_runs(demo, data, str(out_dir), tokenizer.vocab_size)
    summaries = train_suite(with_seeds(runs, seeds), demo.workers)
    results = {
        "runs": result_rows(runs, summaries, seeds, out_dir),
        "config": to_dict(demo),
        "quick": quick,
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
    }
    write_report(results, out_dir, quick=quick, overrides=list(overrides))
    return results
