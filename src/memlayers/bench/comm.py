"""Communication of memory parallelism: bytes each rank receives per read, measured against
the analytic count (run under torchrun: ``torchrun --nproc-per-node M benchmarks/bench_comm.py``).

For a group of ``M`` ranks with ``B`` tokens each, ``K = heads * knn`` lookups
per token and value width ``d``, one read (forward and backward) lands in each
rank's receive buffers:

    batch sizes           M * 8
    lookup ids, weights   M * B * K * (4 + 4)      all-gather (int32 ids, fp32 weights)
    output rows           B * d * 4                 all-to-all (forward)
    output gradients      B * d * 4                 all-to-all (backward)
    partial weight grads  M * B * K * 4             all-to-all (backward)

so per token ``12 M K + 8 d`` bytes: the lookups grow with the group, the
rows do not. Each rank holds ``N * d / M`` of the table.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from memlayers.distributed.comm import RECEIVED_BYTES
from memlayers.distributed.memory_parallel import shard_values
from memlayers.memory import MemoryConfig, MemoryLayer


@dataclass
class CommShape:
    """The memory layer and the tokens per rank."""

    n_keys: int = 512
    dim: int = 256
    heads: int = 4
    knn: int = 32
    k_dim: int = 128
    tokens: int = 2048


def analytic_bytes(shape: CommShape, group_size: int) -> int:
    """Bytes one rank receives for one read, forward and backward (module docstring)."""
    M, B, K, d = group_size, shape.tokens, shape.heads * shape.knn, shape.dim
    return M * 8 + M * B * K * 8 + B * d * 4 + B * d * 4 + M * B * K * 4


def bench_comm(shape: CommShape, table_grad: str = "rows", repeat: int = 3) -> dict:
    """Measure one memory-parallel read over the whole job (every rank one group); call on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    M = dist.get_world_size()
    torch.manual_seed(0)
    layer = MemoryLayer(shape.dim, MemoryConfig(shape.n_keys, shape.heads, shape.knn, shape.k_dim), table_grad=table_grad)
    tables = shard_values(layer, init_device_mesh("cpu" if not torch.cuda.is_available() else "cuda", (M,)))
    device = tables[0].device
    layer.to(device)
    x = torch.randn(shape.tokens, shape.dim, device=device)
    received, seconds = [], []
    for _ in range(repeat):
        before = RECEIVED_BYTES["total"]
        start = time.perf_counter()
        layer(x).square().mean().backward()
        seconds.append(time.perf_counter() - start)
        received.append(RECEIVED_BYTES["total"] - before)
        tables[0].row_grad = None
        layer.zero_grad(set_to_none=True)
    expected = analytic_bytes(shape, M)
    return {
        "shape": asdict(shape),
        "ranks": M,
        "received_bytes_per_read": received[-1],
        "analytic_bytes_per_read": expected,
        "measured_over_analytic": received[-1] / expected,
        "bytes_per_token": received[-1] / shape.tokens,
        "table_bytes_per_rank": tables[0].to_local().numel() * tables[0].element_size(),
        "table_bytes_unsharded": tables[0].numel() * tables[0].element_size(),
        "read_seconds": min(seconds),
    }
