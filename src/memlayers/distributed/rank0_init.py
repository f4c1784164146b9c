"""Big models loaded once: rank 0 holds the weights, every other rank builds the model on the meta device.

Loading a large base model on every rank costs the whole model in host memory
once per rank (eight ranks of an 8B model in bfloat16: 128 GB). Instead rank 0
loads it and the others build the same model on the meta device (shapes and
dtypes only); every rank shards it (:func:`~memlayers.distributed.parallelize.parallelize`),
and :func:`load_from_rank0` then fills each rank's shards from rank 0's
weights (``set_model_state_dict(..., broadcast_from_rank0=True)``: one full
tensor at a time travels, each rank keeps its part) and copies rank 0's
buffers, which a state dict may leave out (a transformers model's rotary
frequencies are non-persistent buffers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from memlayers.distributed.comm import collective


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` lives on the meta device (no data)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def any_rank_on_meta(model: nn.Module) -> bool:
    """Whether ``model`` has meta tensors on any rank (a collective: every rank calls it)."""
    flags: list[bool | None] = [None] * dist.get_world_size()
    with collective("comparing the ranks' models"):
        dist.all_gather_object(flags, has_meta(model))
    if flags[0]:
        raise ValueError("rank 0 built the model on the meta device; rank 0 must hold the weights the others receive")
    return any(flags)


def _layout(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, str(t.dtype), tuple(t.shape)) for name, t in model.state_dict().items()]


@torch.no_grad()
def load_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Give every rank's (sharded) ``model`` rank 0's weights and buffers.

    ``full_state``: rank 0's whole state dict, taken before sharding (None on the
    other ranks). Every rank must have built the same model (names, dtypes and
    shapes, checked first); ranks whose model is on the meta device get storage
    on ``device`` here.
    """
    rank = dist.get_rank()
    mine = _layout(model)
    layout = [mine]  # rank 0's, once broadcast
    problems: list[str | None] = [None] * dist.get_world_size()
    with collective("loading the model from rank 0"):
        dist.broadcast_object_list(layout, src=0)
        problem = None
        if mine != layout[0]:
            first = next((a, b) for a, b in zip(mine + [None], layout[0] + [None], strict=False) if a != b)
            problem = (f"rank {rank} built a different model than rank 0 (here {first[0]}, on rank 0 {first[1]}); "
                       "build it alike on every rank (the same config, dtype and memory layers)")
        dist.all_gather_object(problems, problem)  # every rank refuses alike
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise ValueError(problem)
    if has_meta(model):
        model.to_empty(device=device)
    with collective("loading the model from rank 0"):
        set_model_state_dict(model, full_state if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
