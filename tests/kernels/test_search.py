"""The C product-key search against the torch reference: same slots, same scores, same gradients."""

import pytest
import torch

from memlayers.kernels import cpu
from memlayers.kernels.search import (
    MAX_CPU_KNN,
    product_key_topk,
    product_key_topk_reference,
    resolve_search_backend,
)

needs_c = pytest.mark.skipif(not cpu.available(), reason="no C compiler")

CASES = [
    # leading shape, n_keys, knn
    ((3, 5, 4), 16, 3),
    ((2, 7, 2), 64, 32),
    ((300, 4), 256, 32),  # enough rows to be split over threads
    ((2,), 8, 8),  # knn == n_keys: every pair is a candidate
    ((5,), 40, 1),
]


@needs_c
@pytest.mark.parametrize("shape,n_keys,knn", CASES)
def test_c_search_equals_the_reference(shape, n_keys, knn):
    torch.manual_seed(n_keys + knn)
    s1 = torch.randn(*shape, n_keys, requires_grad=True)
    s2 = torch.randn(*shape, n_keys, requires_grad=True)
    scores, slots = product_key_topk(s1, s2, knn, "cpu")
    ref_scores, ref_slots = product_key_topk_reference(s1, s2, knn)
    assert scores.shape == slots.shape == (*shape, knn) and slots.dtype == torch.long
    assert torch.equal(slots, ref_slots) and torch.equal(scores, ref_scores)  # same order, same bits
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    grad = torch.randn_like(scores)
    ours = torch.autograd.grad(scores, (s1, s2), grad)
    theirs = torch.autograd.grad(ref_scores, (s1, s2), grad)
    for g, ref in zip(ours, theirs, strict=True):
        # only the selected sub-keys get gradient, each the sum over the slots it is part of
        torch.testing.assert_close(g, ref)
        assert g.count_nonzero() <= 2 * knn * s1[..., 0].numel()


@needs_c
def test_c_search_takes_half_precision_and_ranks_in_float32():
    torch.manual_seed(0)
    s1, s2 = torch.randn(2, 64, 128), torch.randn(2, 64, 128)
    scores, slots = product_key_topk(s1.bfloat16(), s2.bfloat16(), 16, "cpu")
    assert scores.dtype == torch.bfloat16
    a, b = s1.bfloat16().float(), s2.bfloat16().float()
    exact, _ = product_key_topk_reference(a, b, 16)  # bf16 sums tie often: compare scores, not the order of ties
    torch.testing.assert_close(scores, exact.bfloat16(), rtol=0, atol=0)
    own = a.gather(-1, slots // 128) + b.gather(-1, slots % 128)  # the returned slots' own scores
    torch.testing.assert_close(own.bfloat16(), scores, rtol=0, atol=0)


def test_auto_and_bad_requests():
    s = torch.randn(4, 32)
    expected = "cpu" if cpu.available() else "reference"
    assert resolve_search_backend("auto", s, 8) == expected
    assert resolve_search_backend("auto", s.double(), 8) == "reference"  # float64 keeps its precision
    assert resolve_search_backend("auto", torch.randn(4, 2048), MAX_CPU_KNN + 1) == "reference"
    with pytest.raises(ValueError, match="unknown product-key search backend 'fast'"):
        product_key_topk(s, s, 4, "fast")
    with pytest.raises(ValueError, match="knn must be in"):
        product_key_topk(s, s, 33)
    with pytest.raises(ValueError, match="differ in shape"):
        product_key_topk(s, s[:, :16], 4)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 CPU scores"):
        product_key_topk(s.double(), s.double(), 4, "cpu")


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
