"""Benchmark 'memory' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_memory.py [--quick] [--device D]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "memory", "--out", "benchmarks/results/memory.json", *sys.argv[1:]]))
