"""Benchmark 'search' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_search.py [--quick] [--device D]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "search", "--out", "benchmarks/results/search.json", *sys.argv[1:]]))
