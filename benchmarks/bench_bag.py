"""Benchmark 'bag' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_bag.py [--quick] [--device D]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "bag", "--out", "benchmarks/results/bag.json", *sys.argv[1:]]))
