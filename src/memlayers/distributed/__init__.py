"""Beyond one machine: memory parallelism for the value tables, FSDP2 for the rest, launched by torchrun."""

from memlayers.distributed.comm import (
    PeerLostError,
    barrier,
    init_distributed,
    launched_by_torchrun,
    shutdown,
    sum_over,
)
from memlayers.distributed.memory_parallel import (
    MemoryParallelReader,
    reduce_value_grads,
    shard_values,
)
from memlayers.distributed.parallelize import (
    ParallelConfig,
    build_mesh,
    parallelize,
    sync_value_grads,
)

__all__ = [
    "MemoryParallelReader",
    "PeerLostError",
    "barrier",
    "launched_by_torchrun",
    "sum_over",
    "ParallelConfig",
    "build_mesh",
    "init_distributed",
    "parallelize",
    "reduce_value_grads",
    "shard_values",
    "shutdown",
    "sync_value_grads",
]
