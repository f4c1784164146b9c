"""Benchmark 'inference' of `memlayers bench` (see src/memlayers/bench/): python benchmarks/bench_inference.py [--quick]."""

import sys

from memlayers.cli import main

sys.exit(main(["bench", "inference", "--device", "cpu", "--out", "benchmarks/results/inference.json", *sys.argv[1:]]))
