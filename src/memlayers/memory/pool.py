"""MemoryPool: the value table(s) that memory layers read.

A model owns one pool and hands it to every memory layer (the paper's shared
memory), so the table exists once and every layer's read adds to its gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memlayers.kernels.quantized import QuantizedTable, check_layout
from memlayers.memory.config import MemoryConfig


class MemoryPool(nn.Module):
    """Value rows of a memory: ``values`` is ``(n_slots, value_dim)``.

    For the PEER variant each slot is a one-neuron expert with an input vector
    (a row of ``up``, ``(n_slots, dim)``) and an output vector (a row of ``values``).
    """

    def __init__(self, dim: int, config: MemoryConfig):
        super().__init__()
        self.n_slots = config.n_slots
        self.value_dim = config.resolved_value_dim(dim)
        float_dtype = torch.float32 if config.quantized else getattr(torch, config.value_dtype)
        if config.quantized:  # filled by loading a quantized checkpoint, or by quantize_()
            bits = 8 if config.value_dtype == "int8" else 4
            try:
                check_layout(self.value_dim, bits, config.value_group_size)
            except ValueError as error:
                raise ValueError(f"memory.value_group_size: {error}") from None
            self.values = QuantizedTable(self.n_slots, self.value_dim, bits, config.value_group_size)
        else:
            self.values = nn.Parameter(torch.empty(self.n_slots, self.value_dim, dtype=float_dtype))
        self.up = nn.Parameter(torch.empty(self.n_slots, dim, dtype=float_dtype)) if config.variant == "peer" else None
        self.reset_parameters()

    @property
    def quantized(self) -> bool:
        """True when the values are a :class:`~memlayers.kernels.quantized.QuantizedTable`."""
        return isinstance(self.values, QuantizedTable)

    @torch.no_grad()
    def quantize_(self, bits: int, group_size: int = 32) -> None:
        """Replace the float value table by its ``bits``-bit quantization (in place, for inference)."""
        if self.quantized:
            raise ValueError("the value table is quantized already")
        table = QuantizedTable.quantize(self.values, bits, group_size)
        del self.values
        self.values = table

    def reset_parameters(self) -> None:
        """Values normal(0, value_dim^-1/2); PEER input vectors normal(0, dim^-1/2)."""
        if not self.quantized:
            nn.init.normal_(self.values, std=1.0 / math.sqrt(self.value_dim))
        if self.up is not None:
            nn.init.normal_(self.up, std=1.0 / math.sqrt(self.up.shape[1]))

    def extra_repr(self) -> str:
        return f"n_slots={self.n_slots}, value_dim={self.value_dim}, peer={self.up is not None}, quantized={self.quantized}"
