"""A pre-norm transformer block whose FFN is dense, memory, MoE or PEER."""

from __future__ import annotations

import torch
from torch import nn

from memlayers.memory.layer import MemoryLayer
from memlayers.memory.pool import MemoryPool
from memlayers.model.attention import Attention, KVCache
from memlayers.model.config import ModelConfig
from memlayers.model.ffn import FeedForward, MoE


def build_ffn(config: ModelConfig, layer: int, pool: MemoryPool | None) -> nn.Module:
    """The FFN module of block ``layer`` as the config chooses it (in ``parallel`` memory
    mode a memory block keeps its dense FFN: see :class:`Block`)."""
    kind = config.ffn_kind(layer)
    if kind in ("memory", "peer") and config.memory_mode == "replace":
        return MemoryLayer(config.dim, config.memory, pool=pool)
    if kind == "moe":
        return MoE(config.dim, config.expert_hidden, config.moe)
    return FeedForward(config.dim, config.ffn_hidden)


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``h + ffn(norm(h))``; in ``parallel`` memory mode a memory
    block adds ``memory(norm(h))`` beside its dense ``ffn``."""

    def __init__(self, config: ModelConfig, layer: int, pool: MemoryPool | None = None):
        super().__init__()
        self.layer = layer
        self.kind = config.ffn_kind(layer)
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = build_ffn(config, layer, pool)
        beside = self.kind in ("memory", "peer") and config.memory_mode == "parallel"
        self.memory = MemoryLayer(config.dim, config.memory, pool=pool) if beside else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block to ``x`` ``(B, T, dim)`` (after ``cache``'s positions, when given;
        ``mask`` as in :meth:`Attention.forward`)."""
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer, mask)  # (B, T, dim)
        normed = self.ffn_norm(h)  # (B, T, dim)
        if self.memory is None:
            return h + self.ffn(normed)  # (B, T, dim)
        return h + self.ffn(normed) + self.memory(normed)  # (B, T, dim)
