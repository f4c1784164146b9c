"""Bytes per memory-parallel read, measured against the analytic count (src/memlayers/bench/comm.py).

    torchrun --nproc-per-node 2 benchmarks/bench_comm.py [--tokens T] [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from memlayers.bench.comm import CommShape, bench_comm
from memlayers.distributed import init_distributed, shutdown

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=CommShape.tokens)
parser.add_argument("--n-keys", type=int, default=CommShape.n_keys)
parser.add_argument("--out", default="benchmarks/results/comm.json")
args = parser.parse_args()
init_distributed()
result = bench_comm(CommShape(n_keys=args.n_keys, tokens=args.tokens))
if dist.get_rank() == 0:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
shutdown()
sys.exit(0)
