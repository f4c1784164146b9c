"""parallelize(model, mesh, config): memory parallelism for the value tables, FSDP2 for the rest.

Applied from outside the model code, after the model is built (identically,
from the same seed, on every rank):

- the ranks form a 2-D mesh ``("dp", "mp")``: ``mp`` ranks share one copy of
  each value table, sharded along its columns (:mod:`memory_parallel`); the
  ``dp`` groups are its data-parallel replicas;
- every other parameter is sharded with FSDP2's ``fully_shard`` over the same
  mesh (hybrid: sharded within an ``mp`` group, replicated across ``dp``), so
  its gradient is averaged over all ranks; the value tables are left out of
  FSDP (``ignored_params``) and reduced by :func:`sync_value_grads`;
- on GPUs, parameters compute in bfloat16 and gradients reduce in float32.

The blocks (:func:`model_blocks`) are memlayers' own ``model.layers`` or, for a
transformers model retrofitted with memory (behind ``CausalLMAdapter``), its
decoder layers. One FSDP unit per block holds that block's frozen base weights
and its trainable memory projections and gate together: FSDP2 (in every torch
this project supports, >= 2.6) all-gathers frozen and trainable parameters
alike, reduce-scatters only the gradients that exist, and asks a common dtype
of the trainable ones only, so frozen parameters need no units of their own
(the retrofit tests check this against one process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from memlayers.config import ConfigError, check
from memlayers.distributed.memory_parallel import reduce_value_grads, shard_values


@dataclass
class ParallelConfig:
    """How a run is spread over the ranks torchrun starts."""

    memory_parallel: int = 1
    """Ranks that share one column-sharded copy of each value table; must divide the world size."""
    mixed_precision: bool = True
    """On GPUs: bfloat16 parameters in compute, float32 gradient reduction."""
    timeout_s: float = 300.0
    """A collective that waits longer than this (a dead or hung rank) raises on the others."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (less memory,
    about one more forward of compute); also in one-process runs."""

    def __post_init__(self) -> None:
        check(self.memory_parallel >= 1, "memory_parallel", f"must be >= 1, got {self.memory_parallel}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")


def build_mesh(config: ParallelConfig, device: torch.device) -> DeviceMesh:
    """The ``("dp", "mp")`` mesh over all ranks of the job."""
    world = dist.get_world_size()
    if world % config.memory_parallel:
        raise ConfigError("parallel.memory_parallel", f"must divide the number of ranks {world}, got {config.memory_parallel}")
    shape = (world // config.memory_parallel, config.memory_parallel)
    return init_device_mesh(device.type, shape, mesh_dim_names=("dp", "mp"))


def model_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks of a model: memlayers' ``model.layers``, or the decoder layers of
    a transformers model (``base_model.layers``), also behind an adapter's ``wrapped_model``;
    None when it has neither."""
    for candidate in (model, getattr(model, "wrapped_model", None)):
        for owner in (candidate, getattr(candidate, "base_model", None)):
            blocks = getattr(owner, "layers", None)
            if isinstance(blocks, nn.ModuleList):
                return blocks
    return None


def parallelize(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig, from_rank0: bool = False) -> list[nn.Parameter]:
    """Shard ``model`` in place over ``mesh``: one FSDP unit per block (:func:`model_blocks`),
    one for the rest; returns its value tables (for :func:`sync_value_grads`). ``from_rank0``:
    the model is on the meta device on every rank but 0 and gets its weights afterwards
    (:func:`~memlayers.distributed.rank0_init.load_from_rank0`), so nothing is sent now."""
    tables = shard_values(model, mesh["mp"], scatter=not from_rank0)
    if mesh.device_type == "cuda" and config.mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    ignored = set(tables)
    for block in model_blocks(model) or []:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    model.value_tables = tables
    model.value_replicas = mesh["dp"].get_group()
    return tables


def sync_value_grads(model: nn.Module) -> None:
    """After backward: make the value tables' gradients those of the mean loss over all ranks."""
    reduce_value_grads(model.value_tables, model.value_replicas, dist.get_world_size())
