"""Run the demo: one fact world and tokenizer, then every model of the suite.

Runs go to worker processes (``workers`` at a time, one CPU thread each:
tiny models run best single-threaded, and two at once use both cores of a
laptop-class machine). One progress bar counts the steps of all runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memlayers.config import load_config, to_dict
from memlayers.data.facts import generate_world, write_world
from memlayers.data.text import read_documents
from memlayers.data.tokenizer import Tokenizer
from memlayers.demo.report import write_report
from memlayers.demo.suite import DemoConfig, DemoRun, build_runs
from memlayers.model.accounting import count_flops
from memlayers.procs import run_all
from memlayers.train.config import DataConfig, RunConfig


def demo_config(quick: bool, overrides: list[str] = (), preset: str | None = None) -> DemoConfig:
    """The demo preset (``demo`` or ``demo_quick``, or ``preset``) with dotted overrides."""
    return load_config(DemoConfig, preset or ("demo_quick" if quick else "demo"), list(overrides))


def prepare_world(demo: DemoConfig, out_dir: Path) -> tuple[DataConfig, Tokenizer]:
    """Write the fact world and train the shared tokenizer under ``out_dir/data``."""
    data_dir = out_dir / "data"
    files = write_world(generate_world(demo.facts), data_dir)
    tokenizer = Tokenizer.train(read_documents(files["train"]), demo.vocab_size)
    tokenizer_path = data_dir / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    data = DataConfig(
        train=str(files["train"]),
        heldout=str(files["heldout"]),
        qa=str(files["qa"]),
        tokenizer=str(tokenizer_path),
        vocab_size=demo.vocab_size,
        seq_len=demo.seq_len,
        facts=demo.facts,
    )
    return data, tokenizer


def _train_one(config: RunConfig, send: Callable[[int], None]) -> dict[str, Any]:
    """Worker: train one run, sending 1 for each step (the parent's progress bar counts them)."""
    from memlayers.train.trainer import Trainer

    return Trainer(config).fit(progress=False, on_step=lambda step: send(1))


def train_suite(runs: list[DemoRun], workers: int) -> list[dict[str, Any]]:
    """Train every run (``workers`` at a time, each in its own process) and return their summaries in order.

    A run that fails stops the others and is named in the error; SIGINT or
    SIGTERM stop them all (``memlayers.procs.run_all``).
    """
    total = sum(run.config.train.steps for run in runs)
    # the costliest runs first, so that no worker is left with a long run at the end
    order = sorted(range(len(runs)), key=lambda i: -count_flops(runs[i].config.model).total * runs[i].config.train.steps)
    jobs = [(runs[i].name, (runs[i].config,)) for i in order]
    steps = {run.name: 0 for run in runs}
    with tqdm(total=total, unit="step", desc="demo", dynamic_ncols=True) as bar:

        def on_step(name: str, n: int) -> None:
            steps[name] += n
            bar.update(n)
            done = sum(steps[run.name] == run.config.train.steps for run in runs)
            bar.set_postfix_str(f"{done}/{len(runs)} runs trained")

        summaries = run_all(_train_one, jobs, workers, on_step)
    by_run = dict(zip(order, summaries, strict=True))
    return [by_run[i] for i in range(len(runs))]


def run_demo(quick: bool = False, out_dir: str | Path = "demo_out", overrides: list[str] = (),
             preset: str | None = None) -> dict[str, Any]:
    """Generate the world, train the suite, write results.json, figure.png and report.md."""
    start = time.perf_counter()
    demo = demo_config(quick, overrides, preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_world(demo, out_dir)
    runs = build_runs(demo, data, str(out_dir), tokenizer.vocab_size)
    summaries = train_suite(runs, demo.workers)
    results = {
        "runs": [
            {
                "name": run.name,
                "kind": run.kind,
                "memory_slots": run.memory_slots,
                "params": summary["params"],
                "memory_params": summary["memory_params"],
                "active_params": summary["active_params"],
                "flops_per_token": summary["flops_per_token"],
                "tokens_per_s": summary["tokens_per_s"],
                "qa_em": summary["qa_em"],
                "answer_nll": summary["answer_nll"],
                "heldout_ppl": summary.get("heldout_ppl"),
                "checkpoint": os.path.relpath(summary["checkpoint"], out_dir),
            }
            for run, summary in zip(runs, summaries, strict=True)
        ],
        "config": to_dict(demo),
        "quick": quick,
        "seconds": time.perf_counter() - start,
    }
    write_report(results, out_dir, quick=quick, overrides=list(overrides))
    return results
