"""Transformer: the decoder LM (Llama-style) with configurable FFN blocks.

A plain ``nn.Module``: no I/O, no distributed code. When memory layers share
their values (the default), the model owns the one :class:`MemoryPool` as
``memory_pool`` and hands it to each memory layer; otherwise each memory
layer owns its pool.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.memory.layer import MemoryLayer
from memlayers.memory.pool import MemoryPool
from memlayers.model.attention import KVCache, padding_mask, rope_tables
from memlayers.model.block import Block
from memlayers.model.config import ModelConfig
from memlayers.model.ffn import FeedForward, MoE


class LMOutput(NamedTuple):
    """Logits ``(B, T, vocab)``, the training loss (None without targets) and the MoE auxiliary loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor | None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``(B, T, vocab)`` against aligned ``targets``
    ``(B, T)`` (``-100`` = ignore), computed in float32 or better."""
    flat = logits.flatten(0, 1)  # (B*T, vocab)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return F.cross_entropy(flat, targets.flatten(), ignore_index=-100)


class Transformer(nn.Module):
    """Decoder-only LM: embeddings, blocks, final RMSNorm, output head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        shared = config.memory_layers and config.memory.shared_values
        self.memory_pool = MemoryPool(config.dim, config.memory) if shared else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i, self.memory_pool) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary tables, which no checkpoint holds (a model built on the meta
        device and loaded by assignment gets them this way)."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.register_buffer("rope_cos", cos.to(device) if device else cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin.to(device) if device else sin, persistent=False)  # (max_seq_len, head_dim)

    def memory_layers(self) -> list[MemoryLayer]:
        """The memory (and PEER) layers, in depth order."""
        return [m for m in self.modules() if isinstance(m, MemoryLayer)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and linears, residual outputs scaled
        by 1/sqrt(2 n_layers) (GPT-2); memory layers use the paper's own init, or
        this residual scale for W_2 with ``memory.output_init: model``."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for block in self.layers:
            attention = block.attention
            for linear in (attention.wq, attention.wk, attention.wv):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(attention.wo.weight, std=residual_std)
            ffn = block.ffn
            if isinstance(ffn, FeedForward):
                nn.init.normal_(ffn.w1.weight, std=std)
                nn.init.normal_(ffn.w3.weight, std=std)
                nn.init.normal_(ffn.w2.weight, std=residual_std)
            elif isinstance(ffn, MoE):
                ffn.reset_parameters(std, residual_std)
            else:  # a memory layer in place of the FFN
                ffn.reset_parameters(residual_std)
            if block.memory is not None:
                block.memory.reset_parameters(residual_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.memory_pool is not None:
            self.memory_pool.reset_parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """Next-token logits for ``tokens`` ``(B, T)``.

        With ``targets`` ``(B, T)`` (``-100`` = ignore) the loss is the mean
        cross-entropy plus ``moe.aux_loss_weight`` times the MoE balancing loss.
        With a ``cache`` (:class:`KVCache`), ``tokens`` continue the cached
        positions, and the cache takes in theirs: prefill, then one token a call.
        ``attention_mask`` ``(B, cached + T)`` (1: token, 0: padding) batches
        prompts of different lengths, padded on the left: each row then
        computes what it would alone (the padding positions' outputs are
        meaningless).
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len={self.config.max_seq_len}")
        mask = None
        if attention_mask is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, head_dim)
        else:
            if tuple(attention_mask.shape) != (B, start + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, start + T)} "
                    "(batch, cached + new positions)"
                )
            mask, positions = padding_mask(attention_mask.bool(), start)  # (B, 1, T, S), (B, T)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, head_dim)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for block in self.layers:
            h = block(h, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        logits = self.output(self.norm(h))  # (B, T, vocab)
        moe_losses = [b.ffn.aux_loss for b in self.layers if isinstance(b.ffn, MoE)]
        aux_loss = torch.stack(moe_losses).sum() if moe_losses else None
        loss = None
        if targets is not None:
            loss = next_token_loss(logits, targets)
            if aux_loss is not None:
                loss = loss + self.config.moe.aux_loss_weight * aux_loss
        return LMOutput(logits, loss, aux_loss)
