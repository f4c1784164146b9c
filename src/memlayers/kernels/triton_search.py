"""Triton product-key search: the exact top-knn slots of each (token, head) on a GPU.

Raw op only (:func:`topk`); the autograd function of :mod:`memlayers.kernels.search`
wraps it. Two kernels, each holding its data in registers:

* ``_half_topk``, one program per (row, half): the half's ``n_keys`` scores
  become 64-bit keys (an order-preserving integer of the float above the
  complement of the sub-key id, so keys are distinct and ties rank the lower
  id first), are sorted with ``tl.sort``, and the best ``knn`` keys are stored.
* ``_pair_topk``, one program per row: the ``knn x knn`` sums of the two
  halves' best (on a GPU, one register tile and one sort beat a sequential
  frontier walk), keyed the same way by slot id, sorted, the best ``knn``
  written out as scores, slot ids and the two sub-key ids.

Rows are addressed by strides, so the half scores are read where the batched
product left them. Like :mod:`memlayers.kernels.triton_bag` this imports
without triton (:data:`AVAILABLE`) and runs on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

AVAILABLE: bool = triton is not None

if AVAILABLE:

    @triton.jit
    def _ordered(x):
        """An int32 whose signed order is the float order of ``x`` (float32)."""
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _unordered(key):
        """The float32 of an ordered int32 (the inverse of ``_ordered``)."""
        return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)

    @triton.jit
    def _key(score, ident):
        """A 64-bit key: higher score first, then lower id (``ident`` < 2**31)."""
        return (_ordered(score).to(tl.int64) << 32) | ((~ident) & 0xFFFFFFFF)

    @triton.jit
    def _half_topk(s_ptr, best_ptr, heads, stride_p, stride_h, stride_half, n_keys,
                   KNN: tl.constexpr, N_POW: tl.constexpr):
        program = tl.program_id(0)
        row, half = program // 2, program % 2
        base = (row // heads).to(tl.int64) * stride_p + (row % heads) * stride_h + half * stride_half
        ids = tl.arange(0, N_POW)
        scores = tl.load(s_ptr + base + ids, mask=ids < n_keys, other=float("-inf")).to(tl.float32)
        keys = tl.where(ids < n_keys, _key(scores, ids.to(tl.int64)), -(2**63))
        keys = tl.sort(keys, descending=True)
        tl.store(best_ptr + program.to(tl.int64) * KNN + ids, keys, mask=ids < KNN)

    @triton.jit
    def _pair_topk(best_ptr, scores_ptr, slots_ptr, sub_ptr, n_keys, heads, head_stride,
                   KNN: tl.constexpr, K_POW: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, K_POW)
        a = tl.load(best_ptr + (2 * row) * KNN + k, mask=k < KNN, other=0)
        b = tl.load(best_ptr + (2 * row + 1) * KNN + k, mask=k < KNN, other=0)
        a_score, a_id = _unordered((a >> 32).to(tl.int32)), (~a) & 0xFFFFFFFF
        b_score, b_id = _unordered((b >> 32).to(tl.int32)), (~b) & 0xFFFFFFFF
        sums = a_score[:, None] + b_score[None, :]  # (K_POW, K_POW)
        slots = a_id[:, None] * n_keys + b_id[None, :]  # (K_POW, K_POW)
        valid = (k[:, None] < KNN) & (k[None, :] < KNN)
        keys = tl.where(valid, _key(sums, slots), -(2**63))
        keys = tl.sort(tl.reshape(keys, (K_POW * K_POW,)), descending=True)
        best_slots = (~keys) & 0xFFFFFFFF
        out = tl.arange(0, K_POW * K_POW)
        mask = out < KNN
        tl.store(scores_ptr + row * KNN + out, _unordered((keys >> 32).to(tl.int32)), mask=mask)
        tl.store(slots_ptr + row * KNN + out, best_slots, mask=mask)
        base = (row % heads) * head_stride
        tl.store(sub_ptr + 2 * row * KNN + out, base + best_slots // n_keys, mask=mask)
        tl.store(sub_ptr + (2 * row + 1) * KNN + out, base + n_keys + best_slots % n_keys, mask=mask)


def topk(s: torch.Tensor, knn: int, head_stride: int = 0) -> tuple[torch.Tensor, ...]:
    """Top-``knn`` of half scores ``s`` ``(P, H, 2, n_keys)`` (float32, last dim contiguous) per
    row ``p * H + h``: float32 scores and int64 slot ids, each ``(P * H, knn)``, and the sub-key
    rows read ``(P * H, 2, knn)``, ``h * head_stride + i`` and ``h * head_stride + n_keys + j``."""
    if not AVAILABLE:
        raise RuntimeError("the Triton search needs triton installed")
    P, H, _, n_keys = s.shape
    if n_keys**2 >= 2**31:
        raise ValueError(f"the Triton search keeps slot ids in 31 bits: n_keys must be < 46341, got {n_keys}")
    rows = P * H
    best = torch.empty(rows * 2, knn, dtype=torch.int64, device=s.device)  # (rows * 2, knn) keys
    scores = torch.empty(rows, knn, dtype=torch.float32, device=s.device)  # (rows, knn)
    slots = torch.empty(rows, knn, dtype=torch.int64, device=s.device)  # (rows, knn)
    sub = torch.empty(rows, 2, knn, dtype=torch.int64, device=s.device)  # (rows, 2, knn)
    if rows:
        _half_topk[(rows * 2,)](s, best, H, s.stride(0), s.stride(1), s.stride(2), n_keys, KNN=knn,
                                N_POW=triton.next_power_of_2(n_keys))
        _pair_topk[(rows,)](best, scores, slots, sub, n_keys, H, head_stride, KNN=knn,
                            K_POW=triton.next_power_of_2(knn))
    return scores, slots, sub
