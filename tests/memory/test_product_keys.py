"""Product-key search must equal brute force over all n_keys**2 slots."""

import math

import pytest
import torch

from memlayers.kernels import cpu
from memlayers.memory import MemoryConfig, ProductKeySearch
from memlayers.memory.product_keys import unit_normalize

SHAPES = [
    # n_keys, heads, knn, k_dim, qk_norm
    (8, 1, 3, 4, False),
    (16, 4, 8, 16, False),
    (32, 2, 32, 8, False),  # knn == n_keys: every sub-key kept
    (24, 3, 5, 12, True),
    (64, 2, 16, 32, True),
]


# the reference in float64, exactly brute force's scores; the C search in float32 scores inside its
# kernel (its own order of the dot products' sums, so the last bit may differ from torch's matmul)
BACKENDS = [("reference", torch.float64), pytest.param("cpu", torch.float32, marks=pytest.mark.skipif(
    not cpu.available(), reason="no C compiler"))]


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("n_keys,heads,knn,k_dim,qk_norm", SHAPES)
def test_search_equals_brute_force(n_keys, heads, knn, k_dim, qk_norm, backend, dtype):
    torch.manual_seed(n_keys * 7 + heads)
    config = MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, qk_norm=qk_norm)
    search = ProductKeySearch(24, config, backend=backend).to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    scores, indices = search(x)
    assert scores.shape == indices.shape == (3, 5, heads, knn)
    brute = search.slot_scores(x)  # (3, 5, heads, n_keys**2)
    assert brute.shape == (3, 5, heads, n_keys**2)
    best_scores, best_indices = brute.topk(knn, dim=-1)
    exact = {"rtol": 0, "atol": 0} if backend == "reference" else {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(scores, best_scores, **exact)
    assert torch.equal(indices.sort(-1).values, best_indices.sort(-1).values)  # no near-ties at these seeds
    # the returned scores are the scores of the returned slots
    torch.testing.assert_close(brute.gather(-1, indices), scores, **exact)
    assert indices.min() >= 0 and indices.max() < n_keys**2


def test_slot_index_is_row_major_pair_of_sub_keys():
    torch.manual_seed(0)
    config = MemoryConfig(n_keys=6, heads=2, knn=2, k_dim=10, query_bias=True)
    search = ProductKeySearch(7, config).double()
    with torch.no_grad():
        search.query_proj.bias.normal_()
    x = torch.randn(7, dtype=torch.float64)
    q = (search.query_proj.weight @ x + search.query_proj.bias).view(2, 10)  # (heads, k_dim)
    brute = search.slot_scores(x)  # (heads, 36)
    for h in range(2):
        for i in range(6):
            for j in range(6):
                expected = q[h, :5] @ search.keys[h, 0, i] + q[h, 5:] @ search.keys[h, 1, j]
                torch.testing.assert_close(brute[h, i * 6 + j], expected)


def test_qk_norm_makes_search_invariant_to_key_and_query_scale():
    torch.manual_seed(1)
    x = torch.randn(4, 16, dtype=torch.float64)
    for qk_norm, invariant in ((True, True), (False, False)):
        search = ProductKeySearch(16, MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, qk_norm=qk_norm)).double()
        scores, indices = search(x)
        with torch.no_grad():
            search.keys[:, 0] *= torch.rand(2, 8, 1, dtype=torch.float64) * 5 + 0.1
        scaled_scores, scaled_indices = search(x)
        assert torch.allclose(scores, scaled_scores) is invariant
        if qk_norm:
            assert torch.equal(indices, scaled_indices)
            assert scores.abs().max() <= 2 + 1e-9  # a sum of two cosines


def test_init_follows_the_paper():
    config = MemoryConfig(n_keys=256, heads=2, knn=4, k_dim=64)
    search = ProductKeySearch(128, config)
    bound = 1 / math.sqrt(64)
    assert search.keys.abs().max() <= bound
    assert search.keys.abs().max() > 0.95 * bound  # uniform fills the range
    assert torch.count_nonzero(search.query_proj.bias) == 0
    # Xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    xavier = math.sqrt(6 / (128 + 2 * 64))
    assert search.query_proj.weight.abs().max() <= xavier
    assert search.query_proj.weight.abs().max() > 0.95 * xavier


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unit_normalize_matches_f_normalize_and_its_gradient(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, 16, generator=g, dtype=torch.float64)
    x[0, 0, 0] = 0  # a zero row: the norm is clamped, the map a plain scaling by 1 / eps
    x[0, 0, 1] *= 1e-14  # a row below eps
    x[1] *= 1e3
    x = x.to(dtype)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = unit_normalize(ours)
    expected = torch.nn.functional.normalize(theirs, dim=-1)
    tol = {"rtol": 2e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, expected, **tol)
    out.backward(grad)
    expected.backward(grad)
    scale = theirs.grad.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)  # the clamped rows' gradients are ~1e12
    torch.testing.assert_close(ours.grad / scale, theirs.grad / scale, **tol)
    assert ours.grad.dtype == dtype


def test_unit_normalize_gradcheck():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unit_normalize, (x,))
