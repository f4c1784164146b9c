"""Triton bag over quantized value tables: codes are dequantized as the rows are summed.

The GPU counterpart of ``csrc/quantized.c``, over the layouts of
:class:`~memlayers.kernels.quantized.QuantizedTable`:

- ``bits=8``: ``codes (N, d)`` int8 and ``scales (N,)``; value = ``scales[r] * codes[r, c]``;
- ``bits=4``: ``codes (N, d / 2)`` uint8, column ``c`` in byte ``c // 2`` (low nibble
  first, stored as code + 8), and ``scales (N, d / g)``, one per group of ``g``
  columns; value = ``scales[r, c // g] * (nibble - 8)``.

One program per (bag, block of ``BLOCK_D`` columns) walks the bag's ``K`` lookups
``BLOCK_K`` at a time, as :func:`memlayers.kernels.triton_bag.bag` does: a table
row is read in 1 or half a byte per value instead of 4, which is the point of
quantizing a bandwidth-bound read. In the int4 tile two neighbouring columns load
the same byte (one memory transaction) and keep its low or its high nibble.
Scales may be float32 or bfloat16 (casting a model casts them); all arithmetic is
float32. Like the other Triton modules this imports without triton
(:data:`AVAILABLE`) and runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from memlayers.kernels.lookups import check_ids
from memlayers.kernels.triton_bag import (  # triton and tl are None where Triton is not installed
    _BAG_MAX_BLOCK_D,
    AVAILABLE,
    _check_device,
    _num_warps,
    _pow2_block,
    _require_triton,
    supports_device,
    tl,
    triton,
)

__all__ = ["AVAILABLE", "quantized_bag"]


if triton is not None:

    @triton.jit
    def _quantized_bag_kernel(
        codes_ptr,  # (N, d) int8 when BITS == 8; (N, d / 2) uint8 when BITS == 4
        scales_ptr,  # (N,) when BITS == 8; (N, d / GROUP) when BITS == 4; fp32 / bf16
        ids_ptr,  # (B, K) int32 / int64
        weights_ptr,  # (B, K) fp32
        out_ptr,  # (B, d) fp32
        K,
        d,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        col_mask = cols < d
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_mask = ks < K
            rows = tl.load(ids_ptr + b * K + ks, mask=k_mask, other=0).to(tl.int64)  # (BLOCK_K,)
            w = tl.load(weights_ptr + b * K + ks, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
            tile_mask = k_mask[:, None] & col_mask[None, :]
            if BITS == 8:
                codes = tl.load(codes_ptr + rows[:, None] * d + cols[None, :], mask=tile_mask, other=0)
                scale = tl.load(scales_ptr + rows, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
                x = (w * scale)[:, None]  # (BLOCK_K, 1)
            else:
                packed = tl.load(codes_ptr + rows[:, None] * (d // 2) + (cols // 2)[None, :], mask=tile_mask, other=8)
                nibble = tl.where((cols % 2 == 0)[None, :], packed & 15, packed >> 4)  # (BLOCK_K, BLOCK_D)
                codes = nibble.to(tl.int32) - 8
                group = rows[:, None] * (d // GROUP) + (cols // GROUP)[None, :]  # (BLOCK_K, BLOCK_D)
                scale = tl.load(scales_ptr + group, mask=tile_mask, other=0.0).to(tl.float32)
                x = w[:, None] * scale  # (BLOCK_K, BLOCK_D)
            acc += tl.sum(x * codes.to(tl.float32), axis=0)
        tl.store(out_ptr + b * d + cols, acc, mask=col_mask)


def quantized_bag(codes: torch.Tensor, scales: torch.Tensor, dim: int, bits: int, group_size: int,
                  ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_k weights[b, k] * value(ids[b, k])`` over a quantized table.

    Args:
        codes, scales: a :class:`~memlayers.kernels.quantized.QuantizedTable`'s buffers
            (layouts in the module docstring), on the GPU (or the CPU under the interpreter).
        dim: the float table's row size ``d``; bits: 8 or 4; group_size: columns per int4 scale.
        ids: ``(B, K)`` int64 or int32 row ids in ``[0, N)``.
        weights: ``(B, K)`` weight of each lookup (computed in float32).

    Returns:
        ``(B, dim)`` float32.
    """
    _require_triton()
    if not supports_device(codes.device):
        raise ValueError("triton kernels need GPU tensors; CPU tensors run only with TRITON_INTERPRET=1 set before import")
    if ids.dim() != 2 or ids.shape != weights.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be (B, K) of one shape")
    for name, tensor in (("scales", scales), ("ids", ids), ("weights", weights)):
        _check_device(name, tensor, codes.device)
    check_ids(ids, codes.shape[0], "quantized bag")
    B, K = ids.shape
    out = torch.empty(B, dim, dtype=torch.float32, device=codes.device)  # (B, d)
    if B == 0 or dim == 0:
        return out
    if K == 0:
        return out.zero_()
    block_d = _pow2_block(dim, 16, _BAG_MAX_BLOCK_D)  # wider rows: columns tiled over the grid
    block_k = max(8, min(32, 2048 // block_d))
    grid = (B, triton.cdiv(dim, block_d))
    _quantized_bag_kernel[grid](
        codes.contiguous(), scales.contiguous(), ids.contiguous(), weights.to(torch.float32).contiguous(), out,
        K, dim, BITS=bits, GROUP=group_size if bits == 4 else 1, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=_num_warps(block_k * block_d),
    )  # fmt: skip
    return out
