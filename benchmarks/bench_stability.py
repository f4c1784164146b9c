"""Is the suite stable? python benchmarks/bench_stability.py [--runs 10] [--load] [--out FILE] [pytest args]

Runs the distributed and reliability tests (or the pytest arguments given after the options)
N times in a row from this checkout, idle or under full CPU load (``--load``: a busy-loop
process on every core for the whole time), prints one line per run and a summary, and writes
JSON: the commit, the machine, and per run its seconds, exit code and pytest's counts. A
failed run's log is kept next to the JSON. Freeze the code under test (run it from a clone)
if you keep editing while it runs: every run imports the checkout afresh.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from memlayers.bench.timing import source_commit

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/distributed", "tests/reliability"]
COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped)")


def _spin() -> None:
    """Keep one core busy until terminated."""
    while True:
        pass


def counts(log: str) -> dict[str, int]:
    """pytest's summary counts (passed, failed, error, skipped) from the last lines of its output."""
    tail = "\n".join(log.strip().splitlines()[-3:])
    found = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNTS.findall(tail)}
    return {kind: found.get(kind, 0) for kind in ("passed", "failed", "error", "skipped")}


def run_once(pytest_args: list[str]) -> tuple[int, float, str]:
    """One pytest run from the repository root: exit code, seconds, output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def main() -> None:
    """Parse the options, run the suite N times (under load if asked), print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default 10)")
    parser.add_argument("--load", action="store_true", help="a busy-loop process on every core while it runs")
    parser.add_argument("--workers", default="2", help="pytest-xdist workers (-n; default 2)")
    parser.add_argument("--out", default="benchmarks/results/stability.json")
    args, pytest_args = parser.parse_known_args()
    pytest_args = ["-n", args.workers, *(pytest_args or SUITE)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = source_commit(ROOT)
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)] if args.load else []
    for spinner in spinners:
        spinner.start()
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": f"{os.cpu_count()} cores, {platform.platform()}",
        "load": "a busy loop on every core" if args.load else "idle", "pytest": pytest_args,
        "runs": [], "passed_runs": 0, "failed_runs": 0,
    }
    try:
        for index in tqdm(range(args.runs), desc="stability", unit="run", dynamic_ncols=True):
            rc, seconds, log = run_once(pytest_args)
            run = {"run": index + 1, "rc": rc, "seconds": round(seconds, 1), **counts(log)}
            if rc != 0:
                run["log"] = str(out.with_name(f"{out.stem}_run{index + 1}.log"))
                Path(run["log"]).write_text(log)
            result["runs"].append(run)
            result["passed_runs" if rc == 0 else "failed_runs"] += 1
            out.write_text(json.dumps(result, indent=2))  # after every run: an interrupted series keeps its record
            tqdm.write(f"run {index + 1}: {'passed' if rc == 0 else 'FAILED'} in {seconds:.0f} s "
                       f"({run['passed']} passed, {run['failed']} failed, {run['error']} errors)")
    finally:
        for spinner in spinners:
            spinner.terminate()
    passed = result["passed_runs"]
    print(f"{passed}/{len(result['runs'])} runs passed ({result['load']}, commit {commit}); wrote {out}")
    sys.exit(0 if result["failed_runs"] == 0 else 1)


if __name__ == "__main__":
    main()
