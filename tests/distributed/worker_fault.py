"""torchrun worker for the fault tests: rank 1 dies or hangs, rank 0 reads the memory.

    torchrun --nproc-per-node 2 worker_fault.py die|hang TIMEOUT_S
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from memlayers.distributed import init_distributed, shard_values
from memlayers.distributed.comm import gather_sizes
from memlayers.memory import MemoryConfig, MemoryLayer


def main() -> None:
    mode, timeout_s = sys.argv[1], float(sys.argv[2])
    init_distributed(timeout_s=timeout_s)
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = MemoryLayer(8, MemoryConfig(n_keys=4, heads=1, knn=2, k_dim=4))
    from torch.distributed.device_mesh import init_device_mesh

    shard_values(layer, init_device_mesh("cpu", (dist.get_world_size(),)))
    gather_sizes(1, dist.group.WORLD, torch.device("cpu"))  # both ranks are up
    if rank == 1:
        if mode == "die":
            os._exit(3)  # no goodbye: the process is simply gone
        time.sleep(3600)  # hang
    layer(torch.randn(2, 8))  # needs rank 1 for its collectives
    print("rank 0 finished without its peer", flush=True)


if __name__ == "__main__":
    main()
