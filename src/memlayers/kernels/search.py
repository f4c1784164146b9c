"""Product-key top-k: the exact best ``knn`` slots from the scores of the two sub-key halves.

Slot ``(i, j)`` of a head scores ``s[0, i] + s[1, j]`` (the scores of its sub-keys in
the two halves) and has id ``i * n_keys + j``.
Its top-knn are among the pairs of each half's top-knn, so every backend first
selects those. Then:

- ``reference`` (torch ops, any device): all ``knn**2`` candidate sums and a
  top-k over them; the definition the others are tested against.
- ``cpu`` (``csrc/search.c``): both halves' top-knn sorted, then only the
  pairs that can still win (``(i + 1)(j + 1) <= knn`` and above a score bound,
  about ``knn ln knn`` of the ``knn**2``) are summed and the best knn selected.
  :func:`product_key_search` with float32 queries also scores the sub-keys
  inside the kernel, four rows of a head at a time, so the ``(..., H, 2, n_keys)``
  scores are never written to memory;
- ``triton`` (:mod:`memlayers.kernels.triton_search`): each half sorted in
  registers, then the ``knn**2`` sums as one register tile and one sort (on a
  GPU cheaper than pruning the pairs).

The fast backends' backward scatters the gradient of the selected scores only.
``auto`` picks ``triton`` for CUDA tensors when Triton is installed, ``cpu`` for
CPU tensors when the C kernels are built, else the reference.
"""

from __future__ import annotations

import torch

from memlayers.kernels import cpu
from memlayers.kernels.backends import ops_for, triton_available
from memlayers.kernels.embedding_bag import read_table_grad
from memlayers.kernels.lookups import fixed_offsets

BACKENDS = ("reference", "cpu", "triton")
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the C search takes (it ranks in float32; float64 scores stay with the reference)."""
MAX_CPU_KNN = 1024
"""The largest ``knn`` the C search takes (its buffers live on the stack)."""


def product_key_topk_reference(scores: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``knn`` slot ``(scores, ids)`` from the half scores ``scores`` ``(..., 2, n_keys)``
    (first half, second half); each result ``(..., knn)``, scores descending."""
    s1, s2 = scores[..., 0, :], scores[..., 1, :]  # (..., n_keys) each
    n_keys = s1.shape[-1]
    # candidates only: their order does not matter, and unsorted top-k is cheaper
    top1, idx1 = s1.topk(knn, dim=-1, sorted=False)  # (..., knn)
    top2, idx2 = s2.topk(knn, dim=-1, sorted=False)  # (..., knn)
    pair_scores = top1.unsqueeze(-1) + top2.unsqueeze(-2)  # (..., knn, knn)
    best_scores, best = pair_scores.flatten(-2).topk(knn, dim=-1)  # (..., knn)
    row = idx1.gather(-1, torch.div(best, knn, rounding_mode="floor"))  # (..., knn)
    col = idx2.gather(-1, best % knn)  # (..., knn)
    return best_scores, row * n_keys + col


def _run_c(kernel: str, rows: int, n_keys: int, knn: int, head_stride: int, *inputs) -> tuple[torch.Tensor, ...]:
    """The C search function ``kernel`` over ``rows`` rows, on threads: its leading arguments
    ``inputs``, then the outputs it writes, scores and slots ``(rows, knn)`` and sub-key rows
    ``(rows, 2, knn)`` (see :func:`_select`), which it returns."""
    out = torch.empty(rows, knn, dtype=torch.float32)  # (R, knn)
    slots = torch.empty(rows, knn, dtype=torch.long)  # (R, knn)
    sub = torch.empty(rows, 2, knn, dtype=torch.long)  # (R, 2, knn)
    failed = cpu.run(cpu.kernel(kernel), rows, *inputs, cpu.ptr(out), cpu.ptr(slots), cpu.ptr(sub), head_stride, grain=16)
    if failed:
        raise MemoryError(f"the product-key search could not allocate its scores and candidate keys per thread "
                          f"(n_keys {n_keys}, knn {knn})")
    return out, slots, sub


def _cpu_topk(s: torch.Tensor, knn: int, head_stride: int) -> tuple[torch.Tensor, ...]:
    """The C search over ``s`` ``(P, H, 2, n_keys)`` float32: scores and slots ``(P * H, knn)``,
    sub-key rows ``(P * H, 2, knn)`` (see :func:`_select`)."""
    heads, n_keys = s.shape[1], s.shape[-1]
    return _run_c("product_key_topk", s.shape[0] * heads, n_keys, knn, head_stride,
                  cpu.ptr_strided(s), heads, s.stride(0), s.stride(1), s.stride(2), n_keys, knn)


def _cpu_search(q: torch.Tensor, keys: torch.Tensor, knn: int) -> tuple[torch.Tensor, ...]:
    """The C search with the scoring fused in, for float32 queries ``(..., H, 2, d)`` and sub-keys
    ``(H, 2, n_keys, d)``: what :func:`_select` returns with ``head_stride = 2 * n_keys``, without
    writing the half scores out (each row's stay in a buffer of the kernel)."""
    heads, _, n_keys, d = keys.shape
    q = q.detach().contiguous()  # (..., H, 2, d): rows (p, h)
    kt = keys.detach().transpose(-1, -2).contiguous()  # (H, 2, d, n_keys): a query's scores are a vector loop
    return _run_c("product_key_search", q.numel() // (2 * d), n_keys, knn, 2 * n_keys,
                  cpu.ptr(q), cpu.ptr(kt), heads, d, n_keys, knn)


def _cpu_search_backward(q: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, grad_scores: torch.Tensor,
                         need_q: bool, need_keys: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The C search's backward for float32 queries ``(..., H, 2, d)`` and sub-keys ``(H, 2, n_keys, d)``:
    each row's slot gradients folded onto the distinct sub-keys it read (knn 32 reads about 11 per
    half), then the queries' gradient as a bag of those and the sub-keys' as one pass over them.
    ``ids`` ``(R, 2, knn)``: the rows read, as :func:`_cpu_search` returns them."""
    heads, _, n_keys, d = keys.shape
    R, _, knn = ids.shape
    table = keys.detach().contiguous().reshape(heads * 2 * n_keys, d)  # (H * 2 * n_keys, d)
    g = grad_scores.detach().float().contiguous()  # (..., H, knn): rows (p, h)
    folded = torch.empty(R, 2, knn, dtype=torch.long)  # (R, 2, knn): each half's distinct rows, then -1
    folded_w = torch.empty(R, 2, knn)  # (R, 2, knn): their summed slot gradients, then 0
    grad_q = torch.empty(R, 2, d) if need_q else None  # (R, 2, d)
    failed = cpu.run(cpu.kernel("search_backward"), R, cpu.ptr(table), d, table.shape[0], cpu.ptr(ids), cpu.ptr(g),
                     knn, None if grad_q is None else cpu.ptr(grad_q), cpu.ptr(folded), cpu.ptr(folded_w), grain=16)
    if failed:
        raise MemoryError(f"the product-key search's backward could not allocate its row map ({table.shape[0]} rows)")
    grad_keys = None
    if need_keys:
        grad_keys = torch.empty(table.shape)  # (H * 2 * n_keys, d)
        x = q.detach().contiguous().reshape(R * 2, d)  # (2R, d): the query half each folded row was read with
        # the one-pass dense gradient skips the -1 padding (no thread owns it); split by rows as there
        cpu.run(cpu.kernel("dense_grad", torch.float32), table.shape[0], cpu.ptr(grad_keys), d, cpu.ptr(folded),
                cpu.ptr(folded_w), folded.numel(), knn, cpu.ptr(x), None, None, grain=1024)
        grad_keys = grad_keys.reshape(keys.shape)
    return None if grad_q is None else grad_q.reshape(q.shape), grad_keys


def _triton_topk(s: torch.Tensor, knn: int, head_stride: int) -> tuple[torch.Tensor, ...]:
    from memlayers.kernels import triton_search

    return triton_search.topk(s, knn, head_stride)


KERNELS = {"cpu": _cpu_topk, "triton": _triton_topk}


def _select(scores: torch.Tensor, knn: int, backend: str, head_stride: int = 0) -> tuple[torch.Tensor, ...]:
    """A fast backend's selection from half scores ``(..., H, 2, n_keys)``, rows ``(p, h)``: slot
    scores (float32) and slot ids ``(P * H, knn)``, and the sub-keys each slot reads ``(P * H, 2, knn)``:
    ``h * head_stride + i`` and ``h * head_stride + n_keys + j`` (``head_stride`` 0: positions in the
    row's two halves; ``2 * n_keys``: rows of the sub-keys ``(H, 2, n_keys, d)`` as one table)."""
    lead, n_keys = scores.shape[:-2], scores.shape[-1]
    heads = lead[-1] if lead else 1
    # rows (p, h): the leading dims but the last merge into p, which a view can do for the
    # layouts the search produces (heads outermost in memory); anything else is copied
    s = scores.detach().float().reshape(-1, heads, 2, n_keys)  # (P, H, 2, n_keys)
    if s.stride(-1) != 1:
        s = s.contiguous()
    return KERNELS[backend](s, knn, head_stride)


class _FusedTopk(torch.autograd.Function):
    """A fast backend's selection, with the backward that scatters the selected scores' gradient."""

    @staticmethod
    def forward(ctx, scores, knn, backend):  # noqa: D102 (autograd hook)
        out, slots, sub = _select(scores, knn, backend)  # (R = P * H, knn), (R, knn), (R, 2, knn)
        ctx.save_for_backward(sub)
        ctx.shape, ctx.dtype = scores.shape, scores.dtype
        slots = slots.reshape(*scores.shape[:-2], knn)
        ctx.mark_non_differentiable(slots)
        return out.to(scores.dtype).reshape(*scores.shape[:-2], knn), slots

    @staticmethod
    def backward(ctx, grad_scores, _):  # noqa: D102 (autograd hook)
        (sub,) = ctx.saved_tensors
        R, _, knn = sub.shape
        grad = grad_scores.reshape(R, 1, knn).expand(R, 2, knn)  # (R, 2, knn): both halves of a slot
        # only the selected sub-keys' scores get gradient: one zero fill, one scatter
        out = torch.zeros(R, 2 * ctx.shape[-1], dtype=grad.dtype, device=grad.device)  # (R, 2 * n_keys)
        out.scatter_add_(-1, sub.reshape(R, 2 * knn), grad.reshape(R, 2 * knn))
        return out.to(ctx.dtype).reshape(ctx.shape), None, None


def half_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Every sub-key's score ``(..., H, 2, n_keys)`` from queries ``(..., H, 2, k_dim/2)``
    and sub-keys ``(H, 2, n_keys, k_dim/2)``."""
    return torch.einsum("...hpd,hpnd->...hpn", q, keys)  # (..., H, 2, n_keys)


class _SparseSearch(torch.autograd.Function):
    """Scores, a fast backend's selection, and a backward that reads only the selected sub-keys.

    The selected slot's score is ``q1 . K1[i] + q2 . K2[j]``, so its gradient reaches
    the queries as a bag of the selected sub-keys and the sub-keys as a row gradient
    (the embedding-bag ops of :mod:`memlayers.kernels.backends`), instead of a dense
    ``(..., n_keys)`` score gradient multiplied back through both matmuls. The C search
    first folds each row's slot gradients onto the distinct sub-keys the row read
    (:func:`_cpu_search_backward`), so each of those is read once per row.
    """

    @staticmethod
    def forward(ctx, q, keys, knn, backend):  # noqa: D102 (autograd hook)
        # ids (R = P * H, 2, knn): the rows read of the sub-keys as one (H * 2 * n_keys, half) table
        ctx.fused = backend == "cpu" and q.dtype == keys.dtype == torch.float32
        if ctx.fused:
            out, slots, ids = _cpu_search(q, keys, knn)  # (R, knn), (R, knn), ids
        else:
            out, slots, ids = _select(half_scores(q, keys), knn, backend, head_stride=2 * keys.shape[2])
        ctx.save_for_backward(q, keys, ids)
        lead = q.shape[:-2]
        slots = slots.reshape(*lead, knn)
        ctx.mark_non_differentiable(slots)
        return out.to(q.dtype).reshape(*lead, knn), slots

    @staticmethod
    def backward(ctx, grad_scores, _):  # noqa: D102 (autograd hook)
        q, keys, ids = ctx.saved_tensors
        if ctx.fused:
            return (*_cpu_search_backward(q, keys, ids, grad_scores, *ctx.needs_input_grad[:2]), None, None)
        H, _, n_keys, half = keys.shape
        R, knn = ids.shape[0], ids.shape[2]
        table = keys.reshape(H * 2 * n_keys, half)  # (H*2*n_keys, half)
        ops = ops_for("auto", table)
        flat_ids = ids.reshape(R * 2, knn)  # (2R, knn): both halves of a row read with its score gradient
        weights = grad_scores.reshape(R, 1, knn).float().expand(R, 2, knn).reshape(R * 2, knn)  # (2R, knn)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            offsets = fixed_offsets(R * 2, knn, ids.device)
            grad_q = ops.bag(table, flat_ids.reshape(-1), weights.reshape(-1), offsets)  # (2R, half)
            grad_q = grad_q.to(q.dtype).reshape(q.shape)
        if ctx.needs_input_grad[1]:
            x = q.reshape(R * 2, half).to(torch.promote_types(q.dtype, torch.float32))  # (2R, half)
            grad_keys = read_table_grad("dense", None, table.shape[0], flat_ids, weights, x, ops, keys.dtype)
            grad_keys = grad_keys.reshape(keys.shape)
        return grad_q, grad_keys, None, None


def resolve_search_backend(backend: str, scores: torch.Tensor, knn: int) -> str:
    """The concrete backend ``backend`` stands for with half scores ``scores`` and ``knn``."""
    if backend == "auto":
        if scores.device.type == "cuda":
            return "triton" if triton_available() else "reference"
        fast = scores.device.type == "cpu" and scores.dtype in CPU_DTYPES and knn <= MAX_CPU_KNN and cpu.available()
        return "cpu" if fast else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown product-key search backend {backend!r}; choose auto or one of {list(BACKENDS)}")
    if backend == "cpu":
        if scores.device.type != "cpu" or scores.dtype not in CPU_DTYPES:
            raise ValueError(f"search backend 'cpu' takes float32, bfloat16 or float16 CPU scores, got {scores.dtype} "
                             f"on {scores.device}; use backend 'auto'")
        if knn > MAX_CPU_KNN:
            raise ValueError(f"search backend 'cpu' takes knn <= {MAX_CPU_KNN}, got {knn}; use backend 'auto'")
        if not cpu.available():
            raise ValueError("search backend 'cpu' needs the C kernels, which could not be built (no C compiler); "
                             "use backend 'auto'")
    if backend == "triton" and not triton_available():
        raise ValueError("search backend 'triton' needs triton installed; use backend 'auto'")
    return backend


def product_key_topk(scores: torch.Tensor, knn: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-``knn`` slots of each row of half scores ``scores`` ``(..., 2, n_keys)``.

    ``scores[..., 0, i]`` is sub-key ``i``'s score in the first half, ``scores[..., 1, j]``
    sub-key ``j``'s in the second. Returns ``(slot_scores, ids)``, each ``(..., knn)``:
    slot scores in descending order (the dtype of ``scores``, differentiable) and slot
    ids ``i * n_keys + j``. ``backend``: ``auto`` or one of :data:`BACKENDS`.
    """
    if scores.dim() < 2 or scores.shape[-2] != 2:
        raise ValueError(f"half scores must be (..., 2, n_keys), got {tuple(scores.shape)}")
    if not 1 <= knn <= scores.shape[-1]:
        raise ValueError(f"knn must be in [1, n_keys = {scores.shape[-1]}], got {knn}")
    name = resolve_search_backend(backend, scores, knn)
    if name == "reference":
        return product_key_topk_reference(scores, knn)
    return _FusedTopk.apply(scores, knn, name)


def product_key_search(q: torch.Tensor, keys: torch.Tensor, knn: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Score queries ``(..., H, 2, k_dim/2)`` against sub-keys ``(H, 2, n_keys, k_dim/2)`` and
    select the exact top-``knn`` slots: :func:`product_key_topk` of :func:`half_scores`, with a
    backward that touches only the selected sub-keys on the fast backends (the reference
    differentiates the dense scores). Returns ``(slot_scores, ids)``, each ``(..., H, knn)``."""
    if q.dim() < 3 or keys.dim() != 4 or q.shape[-3:] != (keys.shape[0], 2, keys.shape[-1]):
        raise ValueError(f"queries {tuple(q.shape)} and sub-keys {tuple(keys.shape)} must be (..., H, 2, d) and (H, 2, n_keys, d)")
    if not 1 <= knn <= keys.shape[2]:
        raise ValueError(f"knn must be in [1, n_keys = {keys.shape[2]}], got {knn}")
    name = resolve_search_backend(backend, q, knn)
    if name == "reference":
        return product_key_topk_reference(half_scores(q, keys), knn)
    return _SparseSearch.apply(q, keys, knn, name)
