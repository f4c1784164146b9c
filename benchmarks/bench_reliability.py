"""The reliability suite as figures: python benchmarks/bench_reliability.py [--quick] [--out FILE].

Kills runs (one process, 2 and 4 torchrun ranks) at every phase of a step and of a
checkpoint write, hangs a rank, damages every checkpoint file, feeds bad input; prints a
markdown table (faults injected, runs resumed bit-exactly, bad inputs tried, crashes,
tracebacks shown, checkpoints lost) and writes JSON.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from memlayers.bench.reliability import render_reliability, run_reliability
from memlayers.bench.timing import environment, source_commit

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="a sample of each group (minutes)")
parser.add_argument("--out", default="benchmarks/results/reliability.json")
args = parser.parse_args()
commit = source_commit(Path(__file__).resolve().parents[1])
start = time.perf_counter()
with tempfile.TemporaryDirectory() as work:
    results = run_reliability(Path(work), quick=args.quick)
results = {**environment(torch.device("cpu")), "commit": commit, "seconds": round(time.perf_counter() - start, 1), **results}
print(render_reliability(results))
Path(args.out).write_text(json.dumps(results, indent=2))
print(f"wrote {args.out}")
