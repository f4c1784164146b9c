"""Triton bag kernels against plain PyTorch references.

Without a CUDA device the kernels run on CPU tensors under Triton's
interpreter (fp32, small shapes); with one, the ``gpu`` tests also run them
compiled, with fp32 and bf16 tables.
"""

import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of triton: @triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from memlayers.kernels import triton_bag  # noqa: E402
from memlayers.kernels.embedding_bag import embedding_bag_reference  # noqa: E402
from memlayers.kernels.triton_bag import bag, bag_backward_atomic, bag_dot, supports_device  # noqa: E402

# interpreted: the CPU tests run, the compiled-GPU tests skip; compiled (CUDA present): the reverse
INTERPRETED = triton_bag._INTERPRETED
assert supports_device("cpu") == INTERPRETED
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1")
needs_compiled_gpu = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device and compiled (not interpreted) kernels"
)


# ---------------------------------------------------------------- references


def csr_reference(table, ids, weights, offsets):
    """Segment sums by a Python loop over bags, in float64."""
    out = torch.zeros(offsets.numel() - 1, table.shape[1], dtype=torch.float64, device=table.device)
    rows = table.double()[ids] * weights.double()[:, None]  # (M, d)
    for s, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        out[s] = rows[lo:hi].sum(0)
    return out.float()


def dot_reference(table, ids, grad_out):
    return (table.double()[ids] * grad_out.double()[:, None, :]).sum(-1).float()  # (B, K)


def row_grad_reference(weights, grad_out, inverse, n_rows):
    d = grad_out.shape[1]
    contrib = (weights.double()[..., None] * grad_out.double()[:, None, :]).reshape(-1, d)  # (B*K, d)
    out = torch.zeros(n_rows, d, dtype=torch.float64, device=grad_out.device)
    return out.index_add_(0, inverse.reshape(-1), contrib).float()


def transposed_bag(ids, weights):
    """The row gradient as a CSR bag: one bag per unique row, members = its lookups' bag ids."""
    k = ids.shape[1]
    uniq, inverse = torch.unique(ids, return_inverse=True)
    order = torch.argsort(inverse.reshape(-1), stable=True)  # lookups sorted by row
    member_bags = order // k  # (B*K,) index into grad_out
    member_weights = weights.reshape(-1)[order]  # (B*K,)
    counts = torch.bincount(inverse.reshape(-1), minlength=uniq.numel())
    offsets = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return uniq, inverse, member_bags, member_weights, offsets


# ---------------------------------------------------------------- random cases


def fixed_case(n_bags, k, d, *, rows=50, distinct=7, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, d, generator=g).to(device=device, dtype=dtype)
    # ids from a few rows only: duplicates across bags, and forced duplicates within one
    ids = torch.randint(0, min(rows, distinct), (n_bags, k), generator=g)
    if k > 1:
        ids[:, -1] = ids[:, 0]
    weights = torch.rand(n_bags, k, generator=g) + 0.5
    weights[::2] *= -1
    grad_out = torch.randn(n_bags, d, generator=g)
    return table, ids.to(device), weights.to(device), grad_out.to(device)


def csr_case(d, *, rows=50, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, d, generator=g)
    sizes = torch.tensor([0, 3, 1, 0, 0, 9, 40, 2, 0])  # empty first, middle and last; one bag > BLOCK_M
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    m = int(offsets[-1])
    ids = torch.randint(0, rows, (m,), generator=g)
    ids[1] = ids[0]  # duplicate inside a bag
    ids[-1] = ids[0]  # and across bags
    weights = torch.randn(m, generator=g)
    return table.to(device), ids.to(device), weights.to(device), offsets.to(device)


# ---------------------------------------------------------------- interpreter / CPU


@needs_interpreter
@pytest.mark.parametrize("d", [1, 5, 16, 33, 64])
def test_bag_csr_matches_segment_sums(d):
    table, ids, weights, offsets = csr_case(d, seed=d)
    out = bag(table, ids, weights, offsets)
    assert out.shape == (offsets.numel() - 1, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, csr_reference(table, ids, weights, offsets))
    empty = (offsets[1:] == offsets[:-1]).nonzero().flatten()
    assert empty.numel() == 4 and (out[empty] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("d", [5, 16, 33])
def test_bag_fixed_size_forward_matches_embedding_bag_reference(k, d):
    table, ids, weights, _ = fixed_case(6, k, d, seed=10 * k + d)
    offsets = torch.arange(0, ids.numel() + 1, k)
    out = bag(table, ids.reshape(-1), weights.reshape(-1), offsets)
    torch.testing.assert_close(out, embedding_bag_reference(ids, weights, table))


@needs_interpreter
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("d", [1, 5, 33, 64])
def test_bag_dot_matches_reference(k, d):
    table, ids, _, grad_out = fixed_case(5, k, d, seed=100 + 10 * k + d)
    out = bag_dot(table, ids, grad_out)
    assert out.shape == (5, k) and out.dtype == torch.float32
    torch.testing.assert_close(out, dot_reference(table, ids, grad_out))


@needs_interpreter
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("d", [1, 5, 33, 64])
def test_bag_backward_atomic_matches_reference(k, d):
    table, ids, weights, grad_out = fixed_case(5, k, d, seed=200 + 10 * k + d)
    uniq, inverse = torch.unique(ids, return_inverse=True)
    grad_w, row_grads = bag_backward_atomic(table, ids, weights, grad_out, inverse, uniq.numel())
    assert row_grads.shape == (uniq.numel(), d) and row_grads.dtype == torch.float32
    torch.testing.assert_close(grad_w, dot_reference(table, ids, grad_out))
    torch.testing.assert_close(row_grads, row_grad_reference(weights, grad_out, inverse, uniq.numel()))


@needs_interpreter
def test_bag_backward_atomic_dense_rows_and_without_a_table():
    table, ids, weights, grad_out = fixed_case(6, 4, 9, seed=250)
    dense_ref = row_grad_reference(weights, grad_out, ids, table.shape[0])
    grad_w, dense = bag_backward_atomic(table, ids, weights, grad_out, ids, table.shape[0])  # inverse = ids: dense
    torch.testing.assert_close(dense, dense_ref)
    torch.testing.assert_close(grad_w, dot_reference(table, ids, grad_out))
    unread = torch.ones(table.shape[0], dtype=torch.bool)
    unread[ids.reshape(-1)] = False
    assert unread.any() and dense[unread].eq(0).all()
    no_dots, alone = bag_backward_atomic(None, ids, weights, grad_out, ids, table.shape[0])
    assert no_dots is None
    torch.testing.assert_close(alone, dense_ref)


@needs_interpreter
@pytest.mark.parametrize("d", [5, 33])
def test_transposed_bag_is_the_row_gradient_and_agrees_with_atomics(d):
    table, ids, weights, grad_out = fixed_case(7, 8, d, seed=300 + d)
    uniq, inverse, member_bags, member_weights, offsets = transposed_bag(ids, weights)
    row_grads = bag(grad_out, member_bags, member_weights, offsets)  # (n_unique, d)
    expected = row_grad_reference(weights, grad_out, inverse, uniq.numel())
    torch.testing.assert_close(row_grads, expected)
    _, atomic_rows = bag_backward_atomic(table, ids, weights, grad_out, inverse, uniq.numel())
    torch.testing.assert_close(atomic_rows, row_grads)
    # and both equal autograd's gradient of the dense table, at the touched rows
    t = table.clone().requires_grad_()
    embedding_bag_reference(ids, weights, t).backward(grad_out)
    torch.testing.assert_close(row_grads, t.grad[uniq])


@needs_interpreter
def test_several_column_blocks(monkeypatch):
    """Tiny block caps force bag's 2nd grid axis and bag_dot's in-program column loop."""
    monkeypatch.setattr(triton_bag, "_BAG_MAX_BLOCK_D", 16)
    monkeypatch.setattr(triton_bag, "_DOT_MAX_BLOCK_D", 16)
    d = 40  # three blocks of 16, the last one partial
    table, ids, weights, offsets = csr_case(d, seed=7)
    torch.testing.assert_close(bag(table, ids, weights, offsets), csr_reference(table, ids, weights, offsets))
    table, ids, weights, grad_out = fixed_case(4, 3, d, seed=8)
    torch.testing.assert_close(bag_dot(table, ids, grad_out), dot_reference(table, ids, grad_out))
    uniq, inverse = torch.unique(ids, return_inverse=True)
    grad_w, row_grads = bag_backward_atomic(table, ids, weights, grad_out, inverse, uniq.numel())
    torch.testing.assert_close(grad_w, dot_reference(table, ids, grad_out))
    torch.testing.assert_close(row_grads, row_grad_reference(weights, grad_out, inverse, uniq.numel()))


@needs_interpreter
def test_int32_indices_and_non_contiguous_inputs():
    table, ids, weights, grad_out = fixed_case(4, 3, 9, seed=9)
    wide = torch.randn(table.shape[0], 2 * table.shape[1])
    wide[:, ::2] = table
    strided = wide[:, ::2]  # same values, not contiguous
    assert not strided.is_contiguous()
    offsets = torch.arange(0, ids.numel() + 1, 3, dtype=torch.int32)
    out = bag(strided, ids.reshape(-1).int(), weights.reshape(-1), offsets)
    torch.testing.assert_close(out, embedding_bag_reference(ids, weights, table))
    strided_ids = ids.t().contiguous().t()
    assert not strided_ids.is_contiguous()
    torch.testing.assert_close(bag_dot(strided, strided_ids, grad_out), dot_reference(table, ids, grad_out))
    uniq, inverse = torch.unique(ids, return_inverse=True)
    _, row_grads = bag_backward_atomic(table, ids.int(), weights, grad_out, inverse.int(), uniq.numel())
    torch.testing.assert_close(row_grads, row_grad_reference(weights, grad_out, inverse, uniq.numel()))


@needs_interpreter
def test_deterministic_bag_is_bitwise_repeatable():
    table, ids, weights, offsets = csr_case(33, seed=11)
    assert torch.equal(bag(table, ids, weights, offsets), bag(table, ids, weights, offsets))


@needs_interpreter
def test_empty_inputs_return_without_launching():
    table = torch.randn(10, 6)
    none = torch.zeros(0, dtype=torch.int64)
    out = bag(table, none, torch.zeros(0), torch.zeros(4, dtype=torch.int64))  # M = 0, three empty bags
    assert out.shape == (3, 6) and (out == 0).all()
    assert bag(table, none, torch.zeros(0), torch.zeros(1, dtype=torch.int64)).shape == (0, 6)  # S = 0
    assert bag_dot(table, torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 6)).shape == (0, 4)
    grad_w, row_grads = bag_backward_atomic(
        table, torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4), torch.zeros(0, 6),
        torch.zeros(0, 4, dtype=torch.int64), 0,
    )  # fmt: skip
    assert grad_w.shape == (0, 4) and row_grads.shape == (0, 6)


@needs_interpreter
def test_bad_inputs_raise_clear_errors():
    table, ids, weights, grad_out = fixed_case(4, 3, 5)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    offsets = torch.arange(0, 13, 3)
    inverse = torch.unique(ids, return_inverse=True)[1]
    with pytest.raises(ValueError, match="table must be 2-D"):
        bag(table[None], flat_ids, flat_w, offsets)
    with pytest.raises(ValueError, match="table dtype"):
        bag(table.double(), flat_ids, flat_w, offsets)
    with pytest.raises(ValueError, match="same length"):
        bag(table, flat_ids, flat_w[:-1], offsets)
    with pytest.raises(ValueError, match="same length"):
        bag(table, ids, weights, offsets)
    with pytest.raises(ValueError, match="offsets must be 1-D"):
        bag(table, flat_ids, flat_w, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids must be int64 or int32"):
        bag(table, flat_ids.float(), flat_w, offsets)
    with pytest.raises(ValueError, match="offsets must be int64 or int32"):
        bag(table, flat_ids, flat_w, offsets.float())
    with pytest.raises(ValueError, match="weights must be a floating-point"):
        bag(table, flat_ids, flat_ids, offsets)
    with pytest.raises(ValueError, match="ids must be 2-D"):
        bag_dot(table, flat_ids, grad_out)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(B, d\) = \(4, 5\)"):
        bag_dot(table, ids, grad_out[:, :-1])
    with pytest.raises(ValueError, match=r"grad_out must have shape"):
        bag_dot(table, ids, grad_out[:-1])
    with pytest.raises(ValueError, match="grad_out dtype"):
        bag_dot(table, ids, grad_out.double())
    with pytest.raises(ValueError, match="must have the same"):
        bag_backward_atomic(table, ids, weights[:, :-1], grad_out, inverse, 5)
    with pytest.raises(ValueError, match="must have the same"):
        bag_backward_atomic(table, ids, weights, grad_out, inverse[:-1], 5)
    with pytest.raises(ValueError, match="inverse must be int64 or int32"):
        bag_backward_atomic(table, ids, weights, grad_out, inverse.float(), 5)
    with pytest.raises(ValueError, match="n_rows must be a non-negative int"):
        bag_backward_atomic(table, ids, weights, grad_out, inverse, -1)
    with pytest.raises(ValueError, match="n_rows must be a non-negative int"):
        bag_backward_atomic(table, ids, weights, grad_out, inverse, 2.5)
    with pytest.raises(ValueError, match="n_rows is 0"):
        bag_backward_atomic(table, ids, weights, grad_out, inverse, 0)


def test_module_imports_and_reports_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_bag_without_triton", triton_bag.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.AVAILABLE is False and triton_bag.AVAILABLE is True
    assert not module.supports_device("cpu") and not module.supports_device("cuda")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        module.bag(torch.zeros(2, 2), torch.zeros(1, dtype=torch.int64), torch.ones(1), torch.tensor([0, 1]))


# ---------------------------------------------------------------- compiled on a GPU


GPU_TOL = {"rtol": 1e-5, "atol": 1e-4}  # bf16 is widened to fp32 exactly: only the summation order differs


@pytest.mark.gpu
@needs_compiled_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [5, 33, 300, 1030])
def test_gpu_all_ops_match_references(dtype, d):
    table, ids, weights, grad_out = fixed_case(64, 32, d, rows=500, distinct=200, seed=d, device="cuda", dtype=dtype)
    grad_out = grad_out.to(dtype)
    wide_table, wide_grad = table.float(), grad_out.float()

    offsets = torch.arange(0, ids.numel() + 1, ids.shape[1], device="cuda")
    out = bag(table, ids.reshape(-1), weights.reshape(-1), offsets)
    expected = csr_reference(wide_table, ids.reshape(-1), weights.reshape(-1), offsets)
    torch.testing.assert_close(out, expected, **GPU_TOL)

    torch.testing.assert_close(bag_dot(table, ids, grad_out), dot_reference(wide_table, ids, wide_grad), **GPU_TOL)

    uniq, inverse, member_bags, member_weights, row_offsets = transposed_bag(ids, weights)
    expected_rows = row_grad_reference(weights, wide_grad, inverse, uniq.numel())
    torch.testing.assert_close(bag(grad_out, member_bags, member_weights, row_offsets), expected_rows, **GPU_TOL)
    grad_w, row_grads = bag_backward_atomic(table, ids, weights, grad_out, inverse, uniq.numel())
    torch.testing.assert_close(grad_w, dot_reference(wide_table, ids, wide_grad), **GPU_TOL)
    torch.testing.assert_close(row_grads, expected_rows, **GPU_TOL)
    _, dense = bag_backward_atomic(None, ids, weights, grad_out, ids, table.shape[0])  # the table gradient alone
    torch.testing.assert_close(dense[uniq], expected_rows, **GPU_TOL)

    csr_table, csr_ids, csr_weights, csr_offsets = csr_case(d, rows=500, seed=d, device="cuda")
    csr_table = csr_table.to(dtype)
    out = bag(csr_table, csr_ids, csr_weights, csr_offsets)
    torch.testing.assert_close(out, csr_reference(csr_table.float(), csr_ids, csr_weights, csr_offsets), **GPU_TOL)


@pytest.mark.gpu
@needs_compiled_gpu
def test_gpu_cpu_tensors_raise():
    table, ids, weights, _ = fixed_case(2, 3, 4)
    with pytest.raises(ValueError, match="need GPU tensors"):
        bag(table, ids.reshape(-1), weights.reshape(-1), torch.arange(0, 7, 3))
