"""Causal self-attention with rotary position embeddings and grouped-query heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.model.config import ModelConfig


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, each ``(max_seq_len, head_dim)``.

    Uses the half-split convention (dimension i pairs with i + head_dim/2).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, T, hd)`` by position; cos/sin are ``(T, hd)`` or ``(B, 1, T, hd)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, heads, T, hd)
    return (x * cos + rotated * sin).to(x.dtype)


def padding_mask(keep: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and positions for a padded batch.

    ``keep`` ``(B, S)`` marks real tokens (True) and padding (False) over all
    ``S`` positions so far; the queries are the last ``S - start``. Returns the
    boolean mask ``(B, 1, T, S)``: causal, padding keys hidden, and each query
    sees itself (so a padding query has a key and never yields NaN); and the
    rotary positions ``(B, T)``: each row counts its real tokens, so a
    left-padded prompt is placed as it would be alone.
    """
    S = keep.shape[1]
    positions = (keep.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]  # (B, T)
    keys = torch.arange(S, device=keep.device)  # (S,)
    queries = torch.arange(start, S, device=keep.device)[:, None]  # (T, 1)
    mask = ((keys <= queries) & keep[:, None, :]) | (keys == queries)  # (B, T, S)
    return mask[:, None], positions


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding.

    :class:`Transformer` fills it and advances ``length`` by the tokens of each
    call. A layer's buffers ``(B, kv_heads, max_len, head_dim)`` are made at
    its first call, in the dtype its keys have (bf16 under autocast).
    A model that keeps its own cache (a transformers model behind an adapter)
    stores it as ``external`` and advances ``length`` the same way.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.external: object | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, KV, T, hd)`` after the cached positions; return all so far."""
        if layer not in self.keys:
            B, heads, _, hd = k.shape
            self.keys[layer] = k.new_zeros(B, heads, self.max_len, hd)
            self.values[layer] = v.new_zeros(B, heads, self.max_len, hd)
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, KV, end, hd)


class Attention(nn.Module):
    """Multi-head causal attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend causally over ``x`` ``(B, T, dim)``; cos/sin ``(T, head_dim)`` at its
        positions, or ``(B, 1, T, head_dim)`` when rows have positions of their own.

        With a ``cache``, ``x`` follows the ``cache.length`` cached positions and
        attends to them too; its keys and values are added to the cache. A
        boolean ``mask`` ``(B, 1, T, past + T)`` (True: may attend) replaces the
        causal rule, e.g. to hide padding (see :func:`padding_mask`).
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None
        if cache is not None and cache.length > 0:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, KV, past + T, hd)
            if mask is None:  # query i (position past + i) sees keys 0 .. past + i
                mask = torch.arange(past + T, device=x.device) <= (past + torch.arange(T, device=x.device))[:, None]
                causal = False
        elif cache is not None:
            cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)
