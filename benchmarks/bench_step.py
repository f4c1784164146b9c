"""Benchmark 'step' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_step.py [--quick] [--device D]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "step", "--out", "benchmarks/results/step.json", *sys.argv[1:]]))
