"""The C product-key search against the torch reference: same slots, same scores, same gradients."""

import pytest
import torch

from memlayers.kernels import cpu
from memlayers.kernels.search import (
    MAX_CPU_KNN,
    half_scores,
    product_key_search,
    product_key_topk,
    product_key_topk_reference,
    resolve_search_backend,
    triton_available,
)

needs_c = pytest.mark.skipif(not cpu.available(), reason="no C compiler")

CASES = [
    # leading shape, n_keys, knn
    ((3, 5, 4), 16, 3),
    ((2, 7, 2), 64, 32),
    ((300, 4), 256, 32),  # enough rows to be split over threads
    ((2,), 8, 8),  # knn == n_keys: every pair is a candidate
    ((5,), 40, 1),
    ((30, 2), 37, 5),  # n_keys no multiple of 8: the vector scan's scalar tail
    ((20,), 200, 100),  # knn past the rank sort: insertion-sorted
    ((3,), 512, 400),  # candidates past the kernel's stack buffer
]


@needs_c
@pytest.mark.parametrize("shape,n_keys,knn", CASES)
def test_c_search_equals_the_reference(shape, n_keys, knn):
    torch.manual_seed(n_keys + knn)
    halves = torch.randn(*shape, 2, n_keys, requires_grad=True)
    scores, slots = product_key_topk(halves, knn, "cpu")
    ref_scores, ref_slots = product_key_topk_reference(halves, knn)
    assert scores.shape == slots.shape == (*shape, knn) and slots.dtype == torch.long
    assert torch.equal(scores, ref_scores)  # the same scores, bit for bit, in descending order
    # the same slots, but where two sums round to the same float (ties are then ordered either way)
    own = halves[..., 0, :].gather(-1, slots // n_keys) + halves[..., 1, :].gather(-1, slots % n_keys)
    assert torch.equal(own, scores)
    assert (slots.sort(-1).values.diff(dim=-1) > 0).all()  # distinct slots
    agree = (slots == ref_slots).all(-1)  # (...,) rows without ties
    assert agree.float().mean() > 0.9
    grad = torch.randn_like(scores)
    (ours,) = torch.autograd.grad(scores, halves, grad)
    (theirs,) = torch.autograd.grad(ref_scores, halves, grad)
    torch.testing.assert_close(ours[agree], theirs[agree])
    # every row: each selected sub-key gets the sum of the gradients of the slots it is part of
    expected = torch.zeros_like(halves)
    expected[..., 0, :].scatter_add_(-1, slots // n_keys, grad)
    expected[..., 1, :].scatter_add_(-1, slots % n_keys, grad)
    torch.testing.assert_close(ours, expected)


@pytest.mark.skipif(not triton_available(), reason="needs triton (interpreted on the CPU)")
def test_triton_search_equals_the_reference():
    # one case (the interpreter is slow): strided rows, n_keys and knn not powers of two
    shape, n_keys, knn = (2, 3, 2), 12, 3
    torch.manual_seed(n_keys + knn)
    base = torch.randn(shape[-1], 2, *shape[:-1], n_keys)  # heads and halves outermost, as the layer's product
    halves = base.movedim((0, 1), (-3, -2)).requires_grad_()  # (*shape, 2, n_keys), strided
    scores, slots = product_key_topk(halves, knn, "triton")
    ref_scores, ref_slots = product_key_topk_reference(halves, knn)
    assert torch.equal(scores, ref_scores) and torch.equal(slots, ref_slots)
    grad = torch.randn_like(scores)
    (ours,) = torch.autograd.grad(scores, halves, grad)
    (theirs,) = torch.autograd.grad(ref_scores, halves, grad)
    torch.testing.assert_close(ours, theirs)


@needs_c
def test_c_search_is_a_valid_top_k_when_most_scores_tie():
    torch.manual_seed(2)
    halves = torch.randint(0, 4, (50, 3, 2, 64)).float()  # four values: ties everywhere
    scores, slots = product_key_topk(halves, 20, "cpu")
    ref_scores, _ = product_key_topk_reference(halves, 20)
    assert torch.equal(scores, ref_scores)
    own = halves[..., 0, :].gather(-1, slots // 64) + halves[..., 1, :].gather(-1, slots % 64)
    assert torch.equal(own, scores) and (slots.sort(-1).values.diff(dim=-1) > 0).all()


@needs_c
def test_c_search_reads_strided_scores_without_copying_them():
    # the layout a batched product over (heads, halves) leaves: heads and halves outermost in memory
    torch.manual_seed(1)
    base = torch.randn(3, 2, 4, 5, 32)  # (heads, 2, batch, seq, n_keys)
    halves = base.permute(2, 3, 0, 1, 4)  # (batch, seq, heads, 2, n_keys), not contiguous
    assert not halves.is_contiguous()
    scores, slots = product_key_topk(halves, 6, "cpu")
    ref_scores, ref_slots = product_key_topk_reference(halves.contiguous(), 6)
    assert torch.equal(slots, ref_slots) and torch.equal(scores, ref_scores)  # no ties at this size


@needs_c
def test_c_search_takes_half_precision_and_ranks_in_float32():
    torch.manual_seed(0)
    halves = torch.randn(2, 64, 2, 128).bfloat16()
    scores, slots = product_key_topk(halves, 16, "cpu")
    assert scores.dtype == torch.bfloat16
    exact, _ = product_key_topk_reference(halves.float(), 16)  # bf16 sums tie often: compare scores, not tie order
    torch.testing.assert_close(scores, exact.bfloat16(), rtol=0, atol=0)
    a, b = halves.float().unbind(-2)
    own = a.gather(-1, slots // 128) + b.gather(-1, slots % 128)  # the returned slots' own scores
    torch.testing.assert_close(own.bfloat16(), scores, rtol=0, atol=0)


def selected_scores(q, keys, slots):
    """The returned slots' scores q1 . K1[i] + q2 . K2[j], with plain autograd ops."""
    n_keys = keys.shape[2]
    heads = torch.arange(keys.shape[0]).view(-1, 1)  # (H, 1) broadcasts over (..., H, knn)
    k1, k2 = keys[heads, 0, slots // n_keys], keys[heads, 1, slots % n_keys]  # (..., H, knn, d) each
    return (k1 * q[..., 0, None, :]).sum(-1) + (k2 * q[..., 1, None, :]).sum(-1)  # (..., H, knn)


@needs_c
@pytest.mark.parametrize("lead,heads,n_keys,knn,half", [
    ((37,), 3, 100, 7, 5),  # a block of sub-keys and a tail; rows of a head not a multiple of 4
    ((2, 65), 4, 256, 16, 16),  # the demo's layer: rows split over threads
    ((6,), 1, 64, 64, 1),  # knn == n_keys, one dimension per half
])
def test_c_search_scoring_in_its_kernel_equals_scoring_first(lead, heads, n_keys, knn, half):
    torch.manual_seed(n_keys + half)
    q, keys = torch.randn(*lead, heads, 2, half), torch.randn(heads, 2, n_keys, half)
    scores, slots = product_key_search(q, keys, knn, "cpu")  # float32: scored inside the kernel
    ref_scores, ref_slots = product_key_topk(half_scores(q, keys), knn, "cpu")  # scored by torch, then selected
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
    assert (slots == ref_slots).all(-1).float().mean() > 0.95  # but where sums tie within rounding
    torch.testing.assert_close(selected_scores(q, keys, slots), scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend,lead,n_keys,knn", [
    ("cpu", (3, 5), 16, 3), ("cpu", (40,), 64, 32), ("cpu", (2, 3), 8, 8), ("triton", (2, 3), 12, 3),
])
def test_sparse_search_backward_equals_the_dense_one(backend, lead, n_keys, knn):
    if backend == "cpu" and not cpu.available() or backend == "triton" and not triton_available():
        pytest.skip(f"search backend {backend} is not available here")
    torch.manual_seed(n_keys + knn)
    heads, half = 3, 5
    q = torch.randn(*lead, heads, 2, half, requires_grad=True)
    keys = torch.randn(heads, 2, n_keys, half, requires_grad=True)
    scores, slots = product_key_search(q, keys, knn, backend)
    ref_scores, ref_slots = product_key_search(q, keys, knn, "reference")
    assert scores.shape == slots.shape == (*lead, heads, knn)
    agree = (slots == ref_slots).all(-1)  # rows without ties
    assert agree.float().mean() > 0.9
    torch.testing.assert_close(scores[agree], ref_scores[agree])
    # the gradient of the selected scores only, reached through the sub-keys they read
    grad = torch.randn_like(scores)
    ours = torch.autograd.grad(scores, (q, keys), grad)
    theirs = torch.autograd.grad(selected_scores(q, keys, slots), (q, keys), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
        assert b.abs().sum() > 0


@needs_c
@pytest.mark.parametrize("trainable", ["queries", "keys"])
def test_c_search_backward_with_one_input_trainable(trainable):
    # the folded backward skips the part nobody asked for; the other part is unchanged
    torch.manual_seed(7)
    q = torch.randn(50, 2, 2, 6, requires_grad=trainable == "queries")
    keys = torch.randn(2, 2, 24, 6, requires_grad=trainable == "keys")
    scores, slots = product_key_search(q, keys, 10, "cpu")
    grad = torch.randn_like(scores)
    leaf = q if trainable == "queries" else keys
    (ours,) = torch.autograd.grad(scores, leaf, grad)
    (theirs,) = torch.autograd.grad(selected_scores(q, keys, slots), leaf, grad)
    torch.testing.assert_close(ours, theirs)
    assert theirs.abs().sum() > 0


def test_auto_and_bad_requests():
    s = torch.randn(4, 2, 32)
    expected = "cpu" if cpu.available() else "reference"
    assert resolve_search_backend("auto", s, 8) == expected
    assert resolve_search_backend("auto", s.double(), 8) == "reference"  # float64 keeps its precision
    assert resolve_search_backend("auto", torch.randn(4, 2, 2048), MAX_CPU_KNN + 1) == "reference"
    with pytest.raises(ValueError, match="unknown product-key search backend 'fast'"):
        product_key_topk(s, 4, "fast")
    with pytest.raises(ValueError, match="knn must be in"):
        product_key_topk(s, 33)
    with pytest.raises(ValueError, match=r"must be \(..., 2, n_keys\)"):
        product_key_topk(torch.randn(4, 3, 32), 4)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 CPU scores"):
        product_key_topk(s.double(), 4, "cpu")
    with pytest.raises(ValueError, match=r"must be \(..., H, 2, d\) and \(H, 2, n_keys, d\)"):
        product_key_search(torch.randn(4, 2, 2, 8), torch.randn(3, 2, 16, 8), 4)
    with pytest.raises(ValueError, match="knn must be in"):
        product_key_search(torch.randn(4, 3, 2, 8), torch.randn(3, 2, 16, 8), 17)


@needs_c
def test_layer_trains_the_same_with_either_search():
    from memlayers.memory import MemoryConfig, MemoryLayer

    config = MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8)
    grads = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        layer = MemoryLayer(12, config, search_backend=backend)
        x = torch.randn(3, 6, 12)
        layer(x).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
        assert g.abs().sum() > 0, name
