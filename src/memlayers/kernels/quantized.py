"""Quantized value tables for inference: int8 with a scale per row, int4 with a scale per group.

A memory's value table is most of its parameters (a 1024**2 x 1024 table is
4 GiB in float32); at inference it is only read, a few rows per token, so it
can be stored in 8 or 4 bits and dequantized inside the bag that reads it:

- ``int8``: ``value = scale[row] * code``, codes in [-127, 127], scale = max |row| / 127;
- ``int4``: ``value = scale[row, group] * code``, codes in [-8, 7] over groups of
  ``group_size`` columns, scale = max |group| / 7; two codes per byte (low nibble
  first, stored as code + 8).

:class:`QuantizedTable` holds ``codes`` and ``scales`` as buffers, so a model's
state dict (and checkpoint) carries them in place of the float table.
:func:`quantized_bag` reads it: ``reference`` dequantizes the gathered rows with
torch ops, ``cpu`` runs ``csrc/quantized.c`` and ``triton``
:mod:`~memlayers.kernels.triton_quantized` (GPU tables). Tables are read-only: a
bag that would need a gradient is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from memlayers.kernels import cpu, triton_quantized
from memlayers.kernels.lookups import check_ids, fixed_offsets

BITS = (8, 4)
BACKENDS = ("reference", "cpu", "triton")


class QuantizedTable(nn.Module):
    """An ``(n_rows, dim)`` table stored in ``bits`` (8 or 4) bits; build with :meth:`quantize`."""

    def __init__(self, n_rows: int, dim: int, bits: int, group_size: int = 32):
        super().__init__()
        check_layout(dim, bits, group_size)
        self.n_rows, self.dim, self.bits = n_rows, dim, bits
        self.group_size = group_size if bits == 4 else dim
        if bits == 8:
            self.register_buffer("codes", torch.zeros(n_rows, dim, dtype=torch.int8))  # (N, d)
            self.register_buffer("scales", torch.zeros(n_rows))  # (N,)
        else:
            self.register_buffer("codes", torch.zeros(n_rows, dim // 2, dtype=torch.uint8))  # (N, d / 2)
            self.register_buffer("scales", torch.zeros(n_rows, dim // group_size))  # (N, d / g)

    @property
    def shape(self) -> torch.Size:
        """The float table's shape, ``(n_rows, dim)``."""
        return torch.Size((self.n_rows, self.dim))

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))

    @classmethod
    @torch.no_grad()
    def quantize(cls, table: torch.Tensor, bits: int, group_size: int = 32) -> QuantizedTable:
        """Quantize a float ``(n_rows, dim)`` table (symmetric, round to nearest)."""
        n_rows, dim = table.shape
        out = cls(n_rows, dim, bits, group_size).to(table.device)
        x = table.detach().float()
        if bits == 8:
            scales = x.abs().amax(dim=1) / 127  # (N,)
            out.codes.copy_((x / scales.clamp_min(1e-30)[:, None]).round().clamp(-127, 127))
            out.scales.copy_(scales)
        else:
            groups = x.view(n_rows, dim // group_size, group_size)  # (N, d / g, g)
            scales = groups.abs().amax(dim=2) / 7  # (N, d / g)
            codes = (groups / scales.clamp_min(1e-30)[..., None]).round().clamp(-8, 7).to(torch.int16) + 8
            codes = codes.view(n_rows, dim // 2, 2)  # (N, d / 2, 2): column 2b, 2b + 1
            out.codes.copy_(codes[..., 0] | (codes[..., 1] << 4))
            out.scales.copy_(scales)
        return out

    def dequantize(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 rows ``ids`` (any shape, rows appended as the last dim), or the whole table."""
        codes = self.codes if ids is None else self.codes[ids]
        scales = self.scales if ids is None else self.scales[ids]
        if self.bits == 8:
            return codes.float() * scales.unsqueeze(-1)
        pairs = torch.stack([(codes & 15).to(torch.int16) - 8, (codes >> 4).to(torch.int16) - 8], dim=-1)  # (..., d/2, 2)
        values = pairs.flatten(-2).float()  # (..., d)
        return (values.unflatten(-1, (-1, self.group_size)) * scales.unsqueeze(-1)).flatten(-2)

    def extra_repr(self) -> str:
        return f"n_rows={self.n_rows}, dim={self.dim}, bits={self.bits}, group_size={self.group_size}"


def check_layout(dim: int, bits: int, group_size: int) -> None:
    """Refuse a bit width or an int4 group size the table's ``dim`` cannot take (ValueError)."""
    if bits not in BITS:
        raise ValueError(f"quantized tables have 8 or 4 bits, got {bits}")
    if bits == 4 and (group_size < 2 or group_size % 2 or dim % group_size):
        raise ValueError(f"an int4 table's group size must be even and divide its row size {dim}, got {group_size}")


def quantized_bag_reference(indices: torch.Tensor, weights: torch.Tensor, table: QuantizedTable) -> torch.Tensor:
    """``sum_k weights[..., k] * value(indices[..., k])`` with torch ops, float32 ``(..., dim)``."""
    rows = table.dequantize(indices)  # (..., K, d)
    return (weights.float().unsqueeze(-1) * rows).sum(-2)


def _cpu_bag(indices: torch.Tensor, weights: torch.Tensor, table: QuantizedTable) -> torch.Tensor:
    lead, K = indices.shape[:-1], indices.shape[-1]
    ids = indices.reshape(lead.numel(), K).to(torch.int64).contiguous()  # (B, K)
    w = weights.reshape(lead.numel(), K).float().contiguous()  # (B, K)
    offsets = fixed_offsets(ids.shape[0], K, ids.device)  # (B + 1,)
    out = torch.empty(ids.shape[0], table.dim)  # (B, d)
    codes, scales = table.codes.contiguous(), table.scales.float().contiguous()  # a model cast to bf16 casts scales too
    if table.bits == 8:
        cpu.run(cpu.kernel("bag_q8"), out.shape[0], cpu.ptr(codes), cpu.ptr(scales), table.dim, cpu.ptr(ids),
                         cpu.ptr(w), cpu.ptr(offsets), cpu.ptr(out))
    else:
        cpu.run(cpu.kernel("bag_q4"), out.shape[0], cpu.ptr(codes), cpu.ptr(scales), table.dim,
                         table.group_size, cpu.ptr(ids), cpu.ptr(w), cpu.ptr(offsets), cpu.ptr(out))
    return out.reshape(*lead, table.dim)


def _triton_bag(indices: torch.Tensor, weights: torch.Tensor, table: QuantizedTable) -> torch.Tensor:
    lead, K = indices.shape[:-1], indices.shape[-1]
    out = triton_quantized.quantized_bag(table.codes, table.scales, table.dim, table.bits, table.group_size,
                                         indices.reshape(lead.numel(), K), weights.reshape(lead.numel(), K))  # (B, d)
    return out.reshape(*lead, table.dim)


def _auto_backend(device: torch.device) -> str:
    if device.type == "cpu" and cpu.available():
        return "cpu"
    if device.type == "cuda" and triton_quantized.AVAILABLE:
        return "triton"
    return "reference"


def quantized_bag(indices: torch.Tensor, weights: torch.Tensor, table: QuantizedTable,
                  backend: str = "auto") -> torch.Tensor:
    """The weighted bag of :func:`memlayers.kernels.embedding_bag` over a quantized table.

    ``backend``: ``auto`` (``cpu`` for CPU tables when the C kernels are built, ``triton``
    for CUDA tables when Triton is installed, else the reference) or one of :data:`BACKENDS`.
    Returns float32 ``(..., dim)``.
    """
    if indices.shape != weights.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have the same shape")
    if torch.is_grad_enabled() and weights.requires_grad:
        raise ValueError("quantized value tables are for inference: read them under torch.no_grad() "
                         "(train and finetune on the float checkpoint, then quantize it)")
    check_ids(indices, table.n_rows, "quantized bag", "indices")
    if backend == "auto":
        backend = _auto_backend(table.codes.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantized bag backend {backend!r}; choose auto or one of {list(BACKENDS)}")
    if backend == "cpu":
        if table.codes.device.type != "cpu" or not cpu.available():
            raise ValueError("quantized bag backend 'cpu' needs a CPU table and the C kernels; use backend 'auto'")
        return _cpu_bag(indices, weights, table)
    if backend == "triton":
        return _triton_bag(indices, weights, table)
    return quantized_bag_reference(indices, weights, table)
