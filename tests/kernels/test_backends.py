"""The seam: every backend's ops give the reference's results on random inputs.

Each backend class in ``backends.OPS`` is called directly, op by op (bags,
weight gradient, row-gradient norm, the three row updates), against
``TorchOps``, so a backend that drops or bends an op of the interface fails
here before any model notices.
"""

import pytest
import torch

from memlayers.kernels import backends, cpu
from memlayers.kernels.backends import OPS, TorchOps
from memlayers.kernels.embedding_bag import RowGrad
from memlayers.kernels.lookups import fixed_offsets

N, D, B, K = 50, 16, 9, 6
FAST = [name for name in OPS if name != "torch_rows"]


def available(name: str) -> bool:
    return cpu.available() if name == "cpu" else backends.triton_available()


@pytest.fixture(params=FAST)
def ops(request):
    if not available(request.param):
        pytest.skip(f"backend {request.param} is not available here")
    return OPS[request.param]


def lookups(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N, D, generator=g)
    ids = torch.randint(0, N - 10, (B, K), generator=g)  # the last 10 rows are never read
    ids[:, 1] = ids[:, 0]  # a row twice in one bag
    weights = torch.randn(B, K, generator=g)
    grad_out = torch.randn(B, D, generator=g)
    return table, ids, weights, grad_out


def test_every_backend_implements_the_whole_seam():
    seam = ("bag", "bag_dot", "sq_norm", "sgd", "adagrad", "adam")
    for name, ops in OPS.items():
        assert all(callable(getattr(ops, op, None)) for op in seam), name
        assert issubclass(ops, TorchOps), f"{name} must fall back to the reference for what it does not take"


def test_bag_and_bag_dot_match_the_reference(ops):
    table, ids, weights, grad_out = lookups()
    # ragged CSR bags (one empty), as the row-gradient reduction reads them
    offsets = torch.tensor([0, 3, 3, 10, 25, B * K])
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    torch.testing.assert_close(ops.bag(table, flat_ids, flat_w, offsets), TorchOps.bag(table, flat_ids, flat_w, offsets))
    fixed = fixed_offsets(B, K, ids.device)
    torch.testing.assert_close(ops.bag(table, flat_ids, flat_w, fixed), TorchOps.bag(table, flat_ids, flat_w, fixed))
    torch.testing.assert_close(ops.bag_dot(table, ids, grad_out), TorchOps.bag_dot(table, ids, grad_out))
    # more lookups per bag than a kernel reads at once, and a width that is no multiple of a vector
    g = torch.Generator().manual_seed(5)
    wide, many = torch.randn(N, 13, generator=g), torch.randint(0, N, (B, 19), generator=g)
    out = torch.randn(B, 13, generator=g)
    torch.testing.assert_close(ops.bag_dot(wide, many, out), TorchOps.bag_dot(wide, many, out))


def row_grad(ops, seed=0):
    _, ids, weights, grad_out = lookups(seed)
    grad = RowGrad(N, D, ops)
    grad.add(ids, weights, grad_out)
    grad.add(ids[:4].flip(0), weights[:4], grad_out[:4] * 2)  # a second part (another layer's read)
    grad.scale = 0.7
    return grad


def test_row_gradient_and_its_norm_match_the_reference(ops):
    rows, grads = row_grad(ops).rows()
    ref_rows, ref_grads = row_grad(TorchOps).rows()
    torch.testing.assert_close(rows, ref_rows)
    torch.testing.assert_close(grads, ref_grads)
    # rows read once (the C norm takes them from each bag's |grad_out|^2) and rows read more often
    reads = row_grad(ops).segments().offsets.diff()
    assert (reads == 1).any() and (reads > 1).any()
    assert row_grad(ops).sq_norm() == pytest.approx(row_grad(TorchOps).sq_norm(), rel=1e-5)


def test_a_one_pass_dense_gradient_matches_the_written_out_row_gradient(ops):
    if not hasattr(ops, "dense_grad"):
        pytest.skip("this backend writes dense gradients through RowGrad")
    table, ids, weights, grad_out = lookups()
    reference = RowGrad(N, D, TorchOps)
    reference.add(ids, weights, grad_out)
    dense, dots = ops.dense_grad(N, ids, weights, grad_out)
    assert dots is None  # no table, no weight gradient
    torch.testing.assert_close(dense, reference.to_dense())
    assert dense[N - 10:].eq(0).all()  # rows never read: zero, though the output starts uninitialised
    with pytest.raises(IndexError, match="must lie in"):
        ops.dense_grad(N - 20, ids, weights, grad_out)
    with pytest.raises(ValueError, match="the table is"):
        ops.dense_grad(N, ids, weights, grad_out, table[:, :-1])
    # with the table: the weight gradient in the same pass, float32 and bfloat16 tables
    for t in (table, table.bfloat16()):
        same, dots = ops.dense_grad(N, ids, weights, grad_out, t)
        assert torch.equal(same, dense)
        torch.testing.assert_close(dots, TorchOps.bag_dot(t.float(), ids, grad_out))
    # a table big enough to be split over threads by rows: the same sums as one thread
    g = torch.Generator().manual_seed(1)
    many = torch.randint(0, 4096, (137, 31), generator=g)  # more lookups than a kernel lists at once, bags across
    many[:, 1] = many[:, 0]
    w, out, big = torch.randn(137, 31, generator=g), torch.randn(137, D + 3, generator=g), torch.randn(4096, D + 3, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_dots = ops.dense_grad(4096, many, w, out, big)
        torch.set_num_threads(4)
        four, four_dots = ops.dense_grad(4096, many, w, out, big)
        assert torch.equal(four, one) and torch.equal(four_dots, one_dots)
    finally:
        torch.set_num_threads(threads)
    reference = RowGrad(4096, D + 3, TorchOps)
    reference.add(many, w, out)
    torch.testing.assert_close(one, reference.to_dense())
    torch.testing.assert_close(one_dots, TorchOps.bag_dot(big, many, out))


@pytest.mark.parametrize("update", ["sgd", "adagrad", "adam"])
def test_row_updates_match_the_reference(ops, update):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(N, D, generator=g)
    states = {
        "sgd": [],
        "adagrad": [torch.rand(N, generator=g)],
        "adam": [0.1 * torch.randn(N, D, generator=g), 0.01 * torch.rand(N, D, generator=g),
                 torch.randint(0, 4, (N,), generator=g, dtype=torch.int32)],
    }[update]
    hyper = {"sgd": (0.1, 0.01), "adagrad": (0.1, 1e-8, 0.01), "adam": (1e-2, 0.9, 0.99, 1e-8, 0.1)}[update]
    original = table.clone()
    mine = [table.clone(), *(s.clone() for s in states)]
    getattr(ops, update)(*mine, row_grad(ops), *hyper)
    getattr(TorchOps, update)(table, *states, row_grad(TorchOps), *hyper)
    for a, b in zip(mine, [table, *states], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    touched = row_grad(TorchOps).rows()[0]
    assert (mine[0][touched] - original[touched]).abs().min() > 0  # every touched row moved
    assert torch.equal(mine[0][N - 10:], original[N - 10:])  # no other row did
