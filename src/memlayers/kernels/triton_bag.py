"""Triton kernels for the weighted embedding bag and its gradients.

Raw ops only (no autograd); an autograd ``Function`` elsewhere composes them.
Every op accumulates in fp32 and returns fp32, whatever the table's dtype
(fp32, bf16 or fp16: rows are loaded in their own dtype, then widened).

* :func:`bag` -- CSR weighted bag, ``out[s] = sum_{j in [offsets[s], offsets[s+1])}
  weights[j] * table[ids[j]]``. One program per (bag, block of ``BLOCK_D``
  columns); it walks the bag's members ``BLOCK_M`` at a time, loading a
  ``(BLOCK_M, BLOCK_D)`` tile of rows. The same kernel serves the forward
  (``offsets = arange(0, B*K + 1, K)``) and the deterministic row gradient:
  the "transposed bag" whose bags are the unique touched rows, whose members
  are that row's lookups sorted by row, whose ``ids`` are the bag ids of those
  lookups, and whose ``table`` is ``grad_out``. Every output element is written
  by exactly one program and summed in a fixed order, so the result is
  bit-for-bit reproducible.
* :func:`bag_dot` -- weight gradient of a fixed-size bag,
  ``out[b, k] = grad_out[b] . table[ids[b, k]]``. One program per bag.
* :func:`bag_backward_atomic` -- single pass over the lookups computing the
  weight gradient (as :func:`bag_dot`, when handed the table) and scattering
  ``weights[b, k] * grad_out[b]`` into an ``(n_rows, d)`` buffer (the dense
  table gradient, or the compact rows of unique ids) with ``tl.atomic_add``.
  Fast, but the summation order of a row's contributions is not fixed, so the
  row gradient is not bit-for-bit reproducible.

Performance notes (real GPUs): columns are the fastest-varying axis of every
tile, so row loads are coalesced along ``d``; row offsets ``ids * d`` and bag
offsets ``b * d`` are computed in int64 (tables can exceed 2**31 elements);
``num_warps`` grows with the tile size; tails in ``d``, ``K`` and the bag
length are masked. There is no ``tl.dot``: per-bag shapes are far too small
for tensor cores, and the ops are bandwidth-bound. Rows of the transposed bag
are as long as a row's popularity, so that backward can be load-imbalanced
under very skewed key distributions.

Imports cleanly without triton; :data:`AVAILABLE` says whether the kernels
exist. On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported). ``ids`` and
``inverse`` are range-checked by :func:`~memlayers.kernels.lookups.check_ids`
(on CUDA a device-side assertion, no host sync); ``offsets`` only on the CPU
(on CUDA their callers build them).
"""

from __future__ import annotations

import operator

import torch

from memlayers.kernels.lookups import check_ids, check_offsets

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

AVAILABLE: bool = triton is not None


# Largest column block of a program: `bag` tiles columns over the 2nd grid axis past this,
# `bag_dot` / `bag_backward_atomic` loop over column blocks inside the program.
_BAG_MAX_BLOCK_D = 256
_DOT_MAX_BLOCK_D = 1024

_TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["AVAILABLE", "bag", "bag_backward_atomic", "bag_dot", "supports_device"]


if triton is not None:

    @triton.jit
    def _bag_kernel(
        table_ptr,  # (N, d) fp32 / bf16 / fp16, contiguous
        ids_ptr,  # (M,) int32 / int64
        weights_ptr,  # (M,) fp32
        offsets_ptr,  # (S + 1,) int64
        out_ptr,  # (S, d) fp32
        d,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        col_mask = cols < d
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_M):
            j = j0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            member_mask = j < end
            rows = tl.load(ids_ptr + j, mask=member_mask, other=0).to(tl.int64)  # (BLOCK_M,)
            w = tl.load(weights_ptr + j, mask=member_mask, other=0.0).to(tl.float32)  # (BLOCK_M,)
            tile_mask = member_mask[:, None] & col_mask[None, :]
            # (BLOCK_M, BLOCK_D) rows; int64 offsets, contiguous along d
            tile = tl.load(table_ptr + rows[:, None] * d + cols[None, :], mask=tile_mask, other=0.0)
            acc += tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
        tl.store(out_ptr + s * d + cols, acc, mask=col_mask)

    @triton.jit
    def _bag_dot_kernel(
        table_ptr,  # (N, d) fp32 / bf16 / fp16, contiguous; read only WITH_DOTS
        ids_ptr,  # (B, K) int32 / int64
        grad_ptr,  # (B, d) fp32 / bf16 / fp16
        dots_ptr,  # (B, K) fp32 out; written only WITH_DOTS
        weights_ptr,  # (B, K) fp32; read only WITH_ROW_GRADS
        inverse_ptr,  # (B, K) int32 / int64; read only WITH_ROW_GRADS
        row_grads_ptr,  # (n_rows, d) fp32, zero-initialised; written only WITH_ROW_GRADS
        K,
        d,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ONE_D_BLOCK: tl.constexpr,
        WITH_DOTS: tl.constexpr,
        WITH_ROW_GRADS: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        grad_row = grad_ptr + b * d
        if ONE_D_BLOCK:
            # d fits in one block: read grad_out[b] once for the whole bag.
            g_once = tl.load(grad_row + tl.arange(0, BLOCK_D), mask=tl.arange(0, BLOCK_D) < d, other=0.0)
            g_once = g_once.to(tl.float32)  # (BLOCK_D,)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_mask = ks < K
            rows = tl.load(ids_ptr + b * K + ks, mask=k_mask, other=0).to(tl.int64)  # (BLOCK_K,)
            if WITH_ROW_GRADS:
                w = tl.load(weights_ptr + b * K + ks, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
                slots = tl.load(inverse_ptr + b * K + ks, mask=k_mask, other=0).to(tl.int64)  # (BLOCK_K,)
            acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
                col_mask = cols < d
                if ONE_D_BLOCK:
                    g = g_once
                else:
                    g = tl.load(grad_row + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
                tile_mask = k_mask[:, None] & col_mask[None, :]
                if WITH_DOTS:
                    tile = tl.load(table_ptr + rows[:, None] * d + cols[None, :], mask=tile_mask, other=0.0)
                    acc += tl.sum(tile.to(tl.float32) * g[None, :], axis=1)  # (BLOCK_K,)
                if WITH_ROW_GRADS:
                    tl.atomic_add(
                        row_grads_ptr + slots[:, None] * d + cols[None, :],  # (BLOCK_K, BLOCK_D)
                        w[:, None] * g[None, :],
                        mask=tile_mask,
                        sem="relaxed",
                    )
            if WITH_DOTS:
                tl.store(dots_ptr + b * K + ks, acc, mask=k_mask)


# @triton.jit picks the interpreter at decoration time (TRITON_INTERPRET=1), so ask the kernel itself.
_INTERPRETED: bool = triton is not None and type(_bag_kernel).__name__ == "InterpretedFunction"


def supports_device(device: torch.device | str) -> bool:
    """Whether the kernels can run on tensors of ``device`` in this process.

    GPU devices need triton; CPU tensors also need the interpreter, which
    ``TRITON_INTERPRET=1`` turns on only if set before this module is imported.
    """
    return AVAILABLE and (torch.device(device).type != "cpu" or _INTERPRETED)


def _pow2_block(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (both powers of two)."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def _num_warps(tile_elems: int) -> int:
    """About 512 tile elements per warp (16 fp32 per thread), 1 to 8 warps."""
    return max(1, min(8, tile_elems // 512))


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("triton is not installed; install memlayers[triton] or use another embedding_bag backend")


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but table is on {device}; all inputs must share a device")


def _check_table(table: torch.Tensor) -> None:
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (rows, dim), got shape {tuple(table.shape)}")
    if table.dtype not in _TABLE_DTYPES:
        raise ValueError(f"table dtype must be float32, bfloat16 or float16, got {table.dtype}")
    if table.device.type == "cpu" and not _INTERPRETED:
        raise ValueError(
            "triton kernels need GPU tensors; CPU tensors run only with TRITON_INTERPRET=1 set before import"
        )


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """CSR weighted bag: ``out[s] = sum_{offsets[s] <= j < offsets[s+1]} weights[j] * table[ids[j]]``.

    Args:
        table: ``(N, d)`` float32, bfloat16 or float16 rows.
        ids: ``(M,)`` int64 or int32 row ids in ``[0, N)``.
        weights: ``(M,)`` weight of each member (computed in float32).
        offsets: ``(S + 1,)`` int64 or int32 bag boundaries; ``offsets[0] == 0``,
            ``offsets[-1] == M``, non-decreasing (checked on the CPU only: on CUDA it would sync).
            Empty bags give zero rows.

    Returns:
        ``(S, d)`` float32, accumulated in float32, deterministic.
    """
    _require_triton()
    _check_table(table)
    if ids.dim() != 1 or weights.dim() != 1 or ids.shape != weights.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be 1-D of the same length")
    _check_float("weights", weights)
    for name, tensor in (("ids", ids), ("weights", weights), ("offsets", offsets)):
        _check_device(name, tensor, table.device)
    check_offsets(offsets, ids.numel(), "bag")
    check_ids(ids, table.shape[0], "bag")

    n_bags, d = offsets.numel() - 1, table.shape[1]
    if ids.numel() == 0 or n_bags == 0 or d == 0:
        return torch.zeros(n_bags, d, dtype=torch.float32, device=table.device)  # (S, d)

    table = table.contiguous()  # (N, d)
    ids = ids.contiguous()  # (M,)
    weights = weights.to(torch.float32).contiguous()  # (M,)
    offsets = offsets.to(torch.int64).contiguous()  # (S + 1,)
    out = torch.empty(n_bags, d, dtype=torch.float32, device=table.device)  # (S, d)

    block_d = _pow2_block(d, 16, _BAG_MAX_BLOCK_D)
    block_m = max(8, min(32, 2048 // block_d))
    grid = (n_bags, triton.cdiv(d, block_d))
    _bag_kernel[grid](
        table, ids, weights, offsets, out, d,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_num_warps(block_m * block_d),
    )  # fmt: skip
    return out


def _bag_dot_launch(
    table: torch.Tensor | None,
    ids: torch.Tensor,
    grad_out: torch.Tensor,
    weights: torch.Tensor | None,
    inverse: torch.Tensor | None,
    row_grads: torch.Tensor | None,
) -> torch.Tensor | None:
    """Launch ``_bag_dot_kernel`` on validated inputs; returns the ``(B, K)`` dots (None without a table)."""
    n_bags, k = ids.shape
    d = grad_out.shape[1]
    ids = ids.contiguous()  # (B, K)
    grad_out = grad_out.contiguous()  # (B, d)
    with_dots, with_row_grads = table is not None, row_grads is not None
    dots = torch.empty(n_bags, k, dtype=torch.float32, device=ids.device) if with_dots else None  # (B, K)

    block_d = _pow2_block(d, 16, _DOT_MAX_BLOCK_D)
    block_k = _pow2_block(k, 2, max(2, 4096 // block_d))
    spare = grad_out  # a placeholder for the pointers a variant does not touch
    _bag_dot_kernel[(n_bags,)](
        table.contiguous() if with_dots else spare, ids, grad_out, dots if with_dots else spare,
        weights if with_row_grads else spare,
        inverse if with_row_grads else ids,
        row_grads if with_row_grads else spare,
        k, d,
        BLOCK_K=block_k, BLOCK_D=block_d, ONE_D_BLOCK=d <= block_d, WITH_DOTS=with_dots,
        WITH_ROW_GRADS=with_row_grads, num_warps=_num_warps(block_k * block_d),
    )  # fmt: skip
    return dots


def _check_fixed_bag(table: torch.Tensor | None, ids: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Refuse a fixed-size bag's gradient inputs: ``ids (B, K)`` (rows of the table, when there is
    one to read) and ``grad_out (B, d)`` (``d`` the table's width), on one device."""
    device = grad_out.device if table is None else table.device
    if table is not None:
        _check_table(table)
    if ids.dim() != 2:
        raise ValueError(f"ids must be 2-D (bags, K), got shape {tuple(ids.shape)}")
    d = grad_out.shape[-1] if table is None else table.shape[1]
    if grad_out.dim() != 2 or grad_out.shape[0] != ids.shape[0] or grad_out.shape[1] != d:
        raise ValueError(f"grad_out must have shape (B, d) = ({ids.shape[0]}, {d}), got {tuple(grad_out.shape)}")
    if grad_out.dtype not in _TABLE_DTYPES:
        raise ValueError(f"grad_out dtype must be float32, bfloat16 or float16, got {grad_out.dtype}")
    _check_device("ids", ids, device)
    _check_device("grad_out", grad_out, device)
    if table is not None:
        check_ids(ids, table.shape[0], "bag_dot")


def bag_dot(table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Weight gradient of a fixed-size bag: ``out[b, k] = dot(grad_out[b], table[ids[b, k]])``.

    Args:
        table: ``(N, d)`` float32, bfloat16 or float16 rows.
        ids: ``(B, K)`` int64 or int32 row ids in ``[0, N)``.
        grad_out: ``(B, d)`` gradient of the bag output.

    Returns:
        ``(B, K)`` float32, accumulated in float32.
    """
    _require_triton()
    _check_fixed_bag(table, ids, grad_out)
    n_bags, k = ids.shape
    if n_bags == 0 or k == 0 or table.shape[1] == 0:
        return torch.zeros(n_bags, k, dtype=torch.float32, device=table.device)  # (B, K)
    return _bag_dot_launch(table, ids, grad_out, None, None, None)


def bag_backward_atomic(
    table: torch.Tensor | None,
    ids: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    inverse: torch.Tensor,
    n_rows: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Both gradients of a fixed-size bag in one pass, the row gradient by atomics.

    ``grad_weights[b, k] = dot(grad_out[b], table[ids[b, k]])`` and
    ``row_grads[inverse[b, k]] += weights[b, k] * grad_out[b]``. With
    ``inverse = ids`` and ``n_rows`` the table's rows, ``row_grads`` is the
    dense table gradient; with the inverse of ``torch.unique(ids,
    return_inverse=True)`` it is compact, row ``r`` for the ``r``-th unique id.
    Not bit-for-bit deterministic (the order of atomic float adds varies); use
    :func:`bag` on the transposed bag for a deterministic row gradient.

    Args:
        table: ``(N, d)`` float32, bfloat16 or float16 rows, or None for the row gradient alone.
        ids: ``(B, K)`` int64 or int32 row ids into ``table``.
        weights: ``(B, K)`` weights of the forward bag (computed in float32).
        grad_out: ``(B, d)`` gradient of the bag output.
        inverse: ``(B, K)`` int64 or int32, each lookup's slot in ``[0, n_rows)`` (checked).
        n_rows: number of rows of ``row_grads``.

    Returns:
        ``(grad_weights (B, K) or None without a table, row_grads (n_rows, d))``, both float32.
    """
    _require_triton()
    try:
        n_rows = operator.index(n_rows)
    except TypeError:
        raise ValueError(f"n_rows must be a non-negative int, got {n_rows!r}") from None
    if n_rows < 0:
        raise ValueError(f"n_rows must be a non-negative int, got {n_rows!r}")
    _check_fixed_bag(table, ids, grad_out)
    if weights.shape != ids.shape or inverse.shape != ids.shape:
        raise ValueError(
            f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)} and inverse {tuple(inverse.shape)} "
            "must have the same (B, K) shape"
        )
    _check_float("weights", weights)
    _check_device("weights", weights, grad_out.device)
    _check_device("inverse", inverse, grad_out.device)

    n_bags, k = ids.shape
    d = grad_out.shape[1]
    row_grads = torch.zeros(n_rows, d, dtype=torch.float32, device=grad_out.device)  # (n_rows, d)
    if n_bags == 0 or k == 0 or d == 0:
        dots = None if table is None else torch.zeros(n_bags, k, dtype=torch.float32, device=grad_out.device)
        return dots, row_grads
    if n_rows == 0:
        raise ValueError(f"n_rows is 0 but there are {n_bags * k} lookups to scatter")
    check_ids(inverse, n_rows, "bag_backward_atomic", "inverse")
    weights = weights.to(torch.float32).contiguous()  # (B, K)
    inverse = inverse.contiguous()  # (B, K)
    dots = _bag_dot_launch(table, ids, grad_out, weights, inverse, row_grads)  # (B, K) or None
    return dots, row_grads
