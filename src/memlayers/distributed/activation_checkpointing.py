"""Activation checkpointing: keep only each block's input, recompute the rest in backward.

Applied from outside the model, like the other parallelisms (before FSDP, as
torchtitan does): every block (:func:`~memlayers.distributed.parallelize.model_blocks`:
memlayers' ``model.layers`` or a transformers model's decoder layers) runs under
``torch.utils.checkpoint`` (non-reentrant) while gradients are enabled, so its
activations are freed after the forward and recomputed block by block in the
backward. Peak activation memory drops from all blocks' to about one block's
plus the blocks' inputs, for about one more forward of compute.

The block's forward is wrapped in place (not the module), so parameter names,
checkpoints and FSDP's hooks are unchanged. A memory layer's usage counts are
paused during the recomputation, so that each read is counted once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memlayers.distributed.parallelize import model_blocks
from memlayers.memory.usage import usage_paused


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward, recomputation) contexts of a checkpointed block."""
    return contextlib.nullcontext(), usage_paused()


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and generation: nothing to save
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block of ``model`` (:func:`model_blocks`: ``model.layers``, or a
    transformers model's decoder layers); returns how many blocks were wrapped. Applying it
    twice is refused."""
    blocks = model_blocks(model)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .layers of blocks (nor decoder layers) to checkpoint")
    for block in blocks:
        if getattr(block, "activation_checkpointing", False):
            raise ValueError("activation checkpointing is already applied to this model")
        block.forward = functools.partial(_checkpointed, block.forward)
        block.activation_checkpointing = True
    return len(blocks)
