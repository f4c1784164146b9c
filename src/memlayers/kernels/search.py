"""Product-key top-k: the exact best ``knn`` slots from the scores of the two sub-key halves.

Slot ``(i, j)`` of a head scores ``s1[i] + s2[j]`` and has id ``i * n_keys + j``.
Its top-knn are among the pairs of each half's top-knn, so every backend first
selects those. Then:

- ``reference`` (torch ops, any device): all ``knn**2`` candidate sums and a
  top-k over them; the definition the others are tested against.
- ``cpu`` (``csrc/search.c``): both halves' top-knn sorted, then a heap walk
  over the frontier of taken pairs yields the top-knn sums in order in
  O(knn log knn), never forming the ``knn**2`` sums; the backward scatters the
  gradient of the selected scores only.

``auto`` picks ``cpu`` for CPU tensors when the C kernels are built, else the
reference.
"""

from __future__ import annotations

import torch

from memlayers.kernels import cpu

BACKENDS = ("reference", "cpu")
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the C search takes (it ranks in float32; float64 scores stay with the reference)."""
MAX_CPU_KNN = 1024
"""The largest ``knn`` the C search takes (its buffers live on the stack)."""


def product_key_topk_reference(s1: torch.Tensor, s2: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` slot ``(scores, ids)`` from half scores ``s1``, ``s2`` ``(..., n_keys)``;
    each result ``(..., knn)``, scores descending."""
    n_keys = s1.shape[-1]
    # candidates only: their order does not matter, and unsorted top-k is cheaper
    top1, idx1 = s1.topk(knn, dim=-1, sorted=False)  # (..., knn)
    top2, idx2 = s2.topk(knn, dim=-1, sorted=False)  # (..., knn)
    pair_scores = top1.unsqueeze(-1) + top2.unsqueeze(-2)  # (..., knn, knn)
    scores, best = pair_scores.flatten(-2).topk(knn, dim=-1)  # (..., knn)
    row = idx1.gather(-1, torch.div(best, knn, rounding_mode="floor"))  # (..., knn)
    col = idx2.gather(-1, best % knn)  # (..., knn)
    return scores, row * n_keys + col


class _CpuTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s1, s2, knn):  # noqa: D102 (autograd hook)
        shape, n_keys = s1.shape[:-1], s1.shape[-1]
        a = s1.detach().reshape(-1, n_keys).float().contiguous()  # (M, n_keys)
        b = s2.detach().reshape(-1, n_keys).float().contiguous()  # (M, n_keys)
        rows = a.shape[0]
        scores = torch.empty(rows, knn, dtype=torch.float32)  # (M, knn)
        slots, sub1, sub2 = (torch.empty(rows, knn, dtype=torch.long) for _ in range(3))  # (M, knn) each
        cpu.parallel_for(cpu.kernel("product_key_topk"), rows, cpu.ptr(a), cpu.ptr(b), n_keys, knn, cpu.ptr(scores),
                         cpu.ptr(slots), cpu.ptr(sub1), cpu.ptr(sub2), grain=16)
        ctx.save_for_backward(sub1, sub2)
        ctx.shape, ctx.n_keys, ctx.dtypes = shape, n_keys, (s1.dtype, s2.dtype)
        slots = slots.reshape(*shape, knn)
        ctx.mark_non_differentiable(slots)
        return scores.to(s1.dtype).reshape(*shape, knn), slots

    @staticmethod
    def backward(ctx, grad_scores, _):  # noqa: D102 (autograd hook)
        sub1, sub2 = ctx.saved_tensors
        grad = grad_scores.reshape(sub1.shape)  # (M, knn)
        grads = []
        for sub, dtype in zip((sub1, sub2), ctx.dtypes, strict=True):
            g = torch.zeros(sub.shape[0], ctx.n_keys, dtype=grad.dtype)  # (M, n_keys)
            grads.append(g.scatter_add_(1, sub, grad).to(dtype).reshape(*ctx.shape, ctx.n_keys))
        return grads[0], grads[1], None


def resolve_search_backend(backend: str, s1: torch.Tensor, knn: int) -> str:
    """The concrete backend ``backend`` stands for with half scores ``s1`` and ``knn``."""
    if backend == "auto":
        fast = s1.device.type == "cpu" and s1.dtype in CPU_DTYPES and knn <= MAX_CPU_KNN and cpu.available()
        return "cpu" if fast else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown product-key search backend {backend!r}; choose auto or one of {list(BACKENDS)}")
    if backend == "cpu":
        if s1.device.type != "cpu" or s1.dtype not in CPU_DTYPES:
            raise ValueError(f"search backend 'cpu' takes float32, bfloat16 or float16 CPU scores, got {s1.dtype} "
                             f"on {s1.device}; use backend 'auto'")
        if knn > MAX_CPU_KNN:
            raise ValueError(f"search backend 'cpu' takes knn <= {MAX_CPU_KNN}, got {knn}; use backend 'auto'")
        if not cpu.available():
            raise ValueError("search backend 'cpu' needs the C kernels, which could not be built (no C compiler); "
                             "use backend 'auto'")
    return backend


def product_key_topk(s1: torch.Tensor, s2: torch.Tensor, knn: int,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``knn`` slots of each row of half scores ``s1``, ``s2`` ``(..., n_keys)``.

    Returns ``(scores, ids)``, each ``(..., knn)``: scores in descending order (the
    dtype of ``s1``, differentiable with respect to both halves) and slot ids
    ``i * n_keys + j``. ``backend``: ``auto`` or one of :data:`BACKENDS`.
    """
    if s1.shape != s2.shape:
        raise ValueError(f"the two halves' scores differ in shape: {tuple(s1.shape)} and {tuple(s2.shape)}")
    if not 1 <= knn <= s1.shape[-1]:
        raise ValueError(f"knn must be in [1, n_keys = {s1.shape[-1]}], got {knn}")
    if resolve_search_backend(backend, s1, knn) == "cpu":
        return _CpuTopk.apply(s1, s2, knn)
    return product_key_topk_reference(s1, s2, knn)
