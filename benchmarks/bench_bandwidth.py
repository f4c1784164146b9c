"""Benchmark 'bandwidth' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_bandwidth.py [--quick] [--device D]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "bandwidth", "--out", "benchmarks/results/bandwidth.json", *sys.argv[1:]]))
