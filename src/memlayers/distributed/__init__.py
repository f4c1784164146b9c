"""Beyond one machine: memory parallelism for the value tables, FSDP2 for the rest, launched by torchrun."""

from memlayers.distributed.comm import init_distributed, shutdown
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
    "ParallelConfig",
    "build_mesh",
    "init_distributed",
    "parallelize",
    "reduce_value_grads",
    "shard_values",
    "shutdown",
    "sync_value_grads",
]
