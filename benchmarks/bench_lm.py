"""Benchmark 'lm' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_lm.py [--quick] [--device D]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "lm", "--out", "benchmarks/results/lm.json", *sys.argv[1:]]))
