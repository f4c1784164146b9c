"""Run the demo: one fact world and tokenizer, then every model of the suite.

Runs go to a pool of worker processes (``workers``, one CPU thread each:
tiny models run best single-threaded, and two at once use both cores of a
laptop-class machine). One progress bar counts the steps of all runs.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from concurrent.futures import Future, ProcessPoolExecutor
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


def _train_one(config: RunConfig, progress: Any) -> dict[str, Any]:
    """Worker: train one run, reporting each step on the ``progress`` queue."""
    from memlayers.train.trainer import Trainer

    trainer = Trainer(config)
    return trainer.fit(progress=False, on_step=lambda step: progress.put(1))


def train_suite(runs: list[DemoRun], workers: int) -> list[dict[str, Any]]:
    """Train every run (``workers`` at a time) and return their summaries in order."""
    total = sum(run.config.train.steps for run in runs)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        progress = manager.Queue()
        # the costliest runs first, so that no worker is left with a long run at the end
        cost = {id(run): count_flops(run.config.model).total * run.config.train.steps for run in runs}
        submitted = {id(run): pool.submit(_train_one, run.config, progress) for run in sorted(runs, key=lambda r: -cost[id(r)])}
        futures: list[Future] = [submitted[id(run)] for run in runs]
        with tqdm(total=total, unit="step", desc="demo", dynamic_ncols=True) as bar:
            while not all(f.done() for f in futures) or not progress.empty():
                try:
                    bar.update(progress.get(timeout=0.5))
                except queue.Empty:
                    pass
                done = [run.name for run, f in zip(runs, futures, strict=True) if f.done()]
                bar.set_postfix_str(f"{len(done)}/{len(runs)} runs done")
        return [f.result() for f in futures]


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
