"""The demo's comparison on real facts, brought through the command line as a user would.

The airports of :mod:`memlayers.data.airports` are written as ``.jsonl`` text
and QA files with one tokenizer; every model of the demo's suite (the demo
preset's model, memory, learning rates and token budget) is then written as
a run YAML and trained with ``memlayers train RUN.yaml`` in its own process,
once per seed, scoring recall (the seen airports' questions), extraction
(the test airports') and the validation airports' questions (what a design
choice may read; never the test split). Rows are means and spreads over seeds
(:mod:`memlayers.demo.stats`); the table and ``real_facts.json`` go to the
output directory. Run again into the same directory, it reads back the runs
that finished there with the same config and files and trains the rest.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from memlayers.config import to_dict
from memlayers.data.airports import AirportFactsConfig, write_airport_facts
from memlayers.data.text import read_documents
from memlayers.data.tokenizer import Tokenizer
from memlayers.demo.report import learning_rates
from memlayers.demo.runner import demo_config, result_rows, train_suite, with_seeds
from memlayers.demo.stats import row_estimate
from memlayers.demo.suite import DemoConfig, DemoRun, build_runs, largest_of_each_kind
from memlayers.procs import run_all
from memlayers.train.config import DataConfig
from memlayers.train.metrics import read_metrics


def train_from_cli(config_path: str, send: Callable[[Any], None]) -> dict[str, Any]:
    """Worker: ``memlayers train CONFIG`` in a fresh process. Returns what it printed (the summary
    table and the checkpoint) with the exact final scores of its metrics.jsonl."""
    run = subprocess.run([sys.executable, "-m", "memlayers.cli", "train", config_path, "--overwrite"],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"memlayers train {config_path} exited {run.returncode}: {run.stderr.strip()[-400:]}")
    printed = dict(line.split(None, 1) for line in run.stdout.splitlines() if len(line.split(None, 1)) == 2)
    summary: dict[str, Any] = {key: float(value) for key, value in printed.items() if key != "checkpoint"}
    config = yaml.safe_load(Path(config_path).read_text())
    summary.update(read_metrics(config["train"]["out_dir"])[-1])  # the final evaluation, unrounded
    send(1)
    return {**summary, "checkpoint": printed["checkpoint"].strip()}


def train_with_cli(runs: list[DemoRun], workers: int) -> list[dict[str, Any]]:
    """Write each run's config as ``OUT_DIR.yaml`` and train it with ``memlayers train`` in its own
    process, ``workers`` at a time, with a progress bar of runs; their summaries in order."""
    jobs = []
    for run in runs:
        path = Path(run.config.train.out_dir + ".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(to_dict(run.config), sort_keys=False))
        jobs.append((f"{run.name} (seed {run.config.train.seed})", (str(path),)))
    with tqdm(total=len(jobs), unit="run", desc="real facts", dynamic_ncols=True) as bar:
        return run_all(train_from_cli, jobs, workers, on_message=lambda name, n: bar.update(n))


def real_fact_runs(out_dir: Path, demo: DemoConfig, kinds: tuple[str, ...], facts: AirportFactsConfig) -> list[DemoRun]:
    """Write the airport files and tokenizer under ``out_dir/data``; the ``demo`` suite's runs of
    ``kinds`` (the largest memory for ``memory``) reading them."""
    files = write_airport_facts(facts, out_dir / "data")
    tokenizer = Tokenizer.train(read_documents(files["train"]), demo.vocab_size)
    tokenizer.save(out_dir / "data" / "tokenizer.json")
    data = DataConfig(train=str(files["train"]), tokenizer=str(out_dir / "data" / "tokenizer.json"),
                      qa={"recall": str(files["qa_seen"]), "validation": str(files["qa_validation"]),
                          "extraction": str(files["qa_test"])},
                      vocab_size=demo.vocab_size, seq_len=demo.seq_len)
    chosen = largest_of_each_kind(build_runs(demo, data, str(out_dir), tokenizer.vocab_size))
    return [chosen[kind] for kind in kinds if kind in chosen]


def run_real_facts(out_dir: str | Path, quick: bool = False, seeds: int = 3,
                   kinds: tuple[str, ...] = ("dense", "memory", "moe", "dense_big"),
                   facts: AirportFactsConfig | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Train ``kinds`` on the airports with ``seeds`` seeds each through ``memlayers train``;
    write ``real_facts.json`` and ``real_facts.md`` into ``out_dir`` and return the results."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    facts = facts or AirportFactsConfig()
    demo = demo_config(quick, list(overrides))
    runs = real_fact_runs(out_dir, demo, kinds, facts)
    summaries = train_suite(with_seeds(runs, seeds), demo.workers, train=train_with_cli)
    results = {
        "runs": result_rows(runs, summaries, seeds, out_dir),
        "facts": dataclasses.asdict(facts),
        "demo_preset": "demo_quick" if quick else "demo",
        "overrides": list(overrides),
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
    }
    (out_dir / "real_facts.json").write_text(json.dumps(results, indent=2))
    (out_dir / "real_facts.md").write_text(render(results) + "\n")
    return results


def render(results: dict[str, Any]) -> str:
    """The results as a markdown table: extraction and recall EM (mean ± spread) per run."""
    facts = results["facts"]
    lines = [
        f"Airports of `airportsdata`: {facts['n_airports']} airports x 5 facts, {facts['docs_per_airport']} "
        f"descriptions each, QA of {facts['seen_fraction']:.0%} in training; the `{results['demo_preset']}` "
        f"preset's models, learning rates and tokens, trained with `memlayers train`; {results['seeds']} seeds.",
        "",
        "| run | params | FLOPs/token | learning rates | extraction EM | recall EM | validation EM "
        "| answer NLL (extraction) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e3:.0f}K | {learning_rates(r)} | "
            f"{row_estimate(r, 'qa_em_extraction').percent()} | {row_estimate(r, 'qa_em_recall').percent()} | "
            f"{row_estimate(r, 'qa_em_validation').percent()} | {r['answer_nll_extraction']:.3f} |")
    return "\n".join(lines)
