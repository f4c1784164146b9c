"""Lookup ids at every kernel boundary (issue 10): int32 ids give the same results as int64
ids, bit for bit, and ids of another dtype or out of range raise one clear error instead of
reading or writing out of bounds (int32 ids used to crash the C kernel with a segfault)."""

import subprocess
import sys

import pytest
import torch

from memlayers.kernels import cpu, embedding_bag, embedding_dot, row_update, triton_bag
from memlayers.kernels.backends import CpuOps, TorchOps, TritonOps
from memlayers.kernels.embedding_bag import RowGrad, row_grad_of

N, D = 13, 6
BACKENDS = ["reference", "torch", "torch_rows", "cpu", "triton", "triton_atomic", "auto"]
ROW_BACKENDS = ["torch_rows", "cpu", "triton", "triton_atomic", "auto"]  # reference/torch give dense gradients only
MODES = [(b, "dense") for b in BACKENDS] + [(b, "rows") for b in ROW_BACKENDS]
READS = ["embedding_bag", "embedding_dot"]
BAD_DTYPES = [torch.float32, torch.float64, torch.bool, torch.int16, torch.uint8]


def skip_unavailable(backend):
    if backend.startswith("triton") and not triton_bag.supports_device("cpu"):
        pytest.skip("triton is not installed, or not interpreted on the CPU")
    if backend == "cpu" and not cpu.available():
        pytest.skip("no C compiler for the CPU kernels")


def random_case(seed=0):
    """ids (4, 3, 7) with duplicates in a bag, weights, table (N, D), x (4, 3, D): never zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (4, 3, 7), generator=g)
    ids[..., 1] = ids[..., 0]
    return ids, torch.randn(4, 3, 7, generator=g), torch.randn(N, D, generator=g), torch.randn(4, 3, D, generator=g)


def read(name, ids, weights, table, x, backend, table_grad):
    """One read of ``table`` (a bag, or PEER's dots with ``x``) and its gradient against a random output gradient."""
    w, t, xg = weights.clone().requires_grad_(), torch.nn.Parameter(table.clone()), x.clone().requires_grad_()
    if name == "embedding_bag":
        out, other = embedding_bag(ids, w, t, backend, table_grad), w
    else:
        out, other = embedding_dot(ids, t, xg, backend, table_grad), xg
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    table_grad_value = row_grad_of(t).to_dense() if table_grad == "rows" else t.grad
    return out.detach(), other.grad, table_grad_value


@pytest.mark.parametrize("name", READS)
@pytest.mark.parametrize(("backend", "table_grad"), MODES)
def test_int32_ids_give_the_int64_results_bit_for_bit(name, backend, table_grad):
    skip_unavailable(backend)
    ids, weights, table, x = random_case()
    expected = read(name, ids, weights, table, x, backend, table_grad)
    got = read(name, ids.int(), weights, table, x, backend, table_grad)
    assert all(e.abs().sum() > 0 for e in expected)  # output and both gradients are not trivially zero
    for what, e, g in zip(("output", "input gradient", "table gradient"), expected, got, strict=True):
        assert torch.equal(e, g), what


@pytest.mark.parametrize("name", READS)
@pytest.mark.parametrize(("backend", "table_grad"), MODES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", [-1, N, 2**31 - 1])
def test_out_of_range_ids_raise_with_the_range_and_the_row_count(name, backend, table_grad, dtype, bad):
    skip_unavailable(backend)
    ids, weights, table, x = random_case(seed=2)
    ids[2, 1, 3] = bad
    lo, hi = min(bad, int(ids.min())), max(bad, int(ids.max()))
    message = rf"{name}: indices must lie in \[0, {N}\) \(the table has {N} rows\), got ids in \[{lo}, {hi}\]"
    with pytest.raises(IndexError, match=message):
        read(name, ids.to(dtype), weights, table, x, backend, table_grad)


@pytest.mark.parametrize("name", READS)
@pytest.mark.parametrize(("backend", "table_grad"), MODES)
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_ids_of_other_dtypes_raise_naming_the_dtype(name, backend, table_grad, dtype):
    skip_unavailable(backend)
    ids, weights, table, x = random_case(seed=3)
    with pytest.raises(ValueError, match=rf"{name}: indices must be int64 or int32, got {dtype}"):
        read(name, ids.to(dtype), weights, table, x, backend, table_grad)


@pytest.mark.parametrize("name", READS)
@pytest.mark.parametrize(("backend", "table_grad"), MODES)
def test_empty_bags_read_zeros_and_0d_ids_raise(name, backend, table_grad):
    skip_unavailable(backend)
    _, _, table, x = random_case(seed=10)
    for lead, k in (((4, 3), 0), ((0,), 7)):  # bags of no lookups; no bags
        ids, weights = torch.zeros(*lead, k, dtype=torch.int32), torch.ones(*lead, k)
        out, _, grad = read(name, ids, weights, table, torch.randn(*lead, D), backend, table_grad)
        assert out.shape == (*lead, D if name == "embedding_bag" else k) and not out.any()
        assert grad is None or not grad.any()
    with pytest.raises(ValueError, match=rf"{name}: indices must have a lookup axis \(..., K\), got a 0-D tensor"):
        read(name, torch.tensor(3), torch.tensor(1.0), table, x[0, 0], backend, table_grad)


@pytest.mark.parametrize("ops", [CpuOps, TritonOps])
def test_raw_ops_take_int32_ids_and_refuse_what_would_read_out_of_bounds(ops):
    """The ops are called directly too (memory parallelism, row gradients): they check their own inputs."""
    skip_unavailable("cpu" if ops is CpuOps else "triton")
    ids, weights, table, x = random_case(seed=4)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)  # (84,)
    offsets = torch.arange(0, 85, 7)  # (13,)
    bag_ids, grad_out = ids.reshape(12, 7), x.reshape(12, D)  # (12, 7), (12, D)
    assert torch.equal(ops.bag(table, flat_ids.int(), flat_w, offsets), ops.bag(table, flat_ids, flat_w, offsets))
    assert torch.equal(ops.bag(table, flat_ids, flat_w, offsets.int()), ops.bag(table, flat_ids, flat_w, offsets))
    assert torch.equal(ops.bag_dot(table, bag_ids.int(), grad_out), ops.bag_dot(table, bag_ids, grad_out))
    for bad in (-1, N):
        with pytest.raises(IndexError, match=rf"bag: ids must lie in \[0, {N}\)"):
            ops.bag(table, torch.cat([flat_ids[:-1], torch.tensor([bad])]), flat_w, offsets)
        with pytest.raises(IndexError, match=rf"bag_dot: ids must lie in \[0, {N}\)"):
            ops.bag_dot(table, torch.cat([bag_ids[:-1], torch.full((1, 7), bad)]), grad_out)
    with pytest.raises(ValueError, match="bag: ids must be int64 or int32, got torch.float32"):
        ops.bag(table, flat_ids.float(), flat_w, offsets)
    with pytest.raises(ValueError, match="bag_dot: ids must be int64 or int32, got torch.bool"):
        ops.bag_dot(table, bag_ids.bool(), grad_out)
    with pytest.raises(ValueError, match="same length"):
        ops.bag(table, flat_ids, flat_w[:-1], offsets)
    with pytest.raises(ValueError, match="offsets must be int64 or int32"):
        ops.bag(table, flat_ids, flat_w, offsets.float())
    for bad_offsets in (offsets + 1, offsets.flip(0), offsets - 1):  # past the ids, decreasing, negative
        with pytest.raises(ValueError, match="offsets must rise from >= 0 to at most 84"):
            ops.bag(table, flat_ids, flat_w, bad_offsets)
    with pytest.raises(ValueError, match=r"grad_out"):
        ops.bag_dot(table, bag_ids, grad_out[:, :-1])


@pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")
def test_the_c_kernels_refuse_tensors_they_cannot_address():
    table = torch.randn(N, D)
    with pytest.raises(ValueError, match=r"contiguous CPU tensors, got a \(6, 13\) tensor on cpu \(not contiguous\)"):
        cpu.ptr(table.t())
    with pytest.raises(ValueError, match="2-D CPU table"):
        CpuOps.bag(table[None], torch.zeros(1, dtype=torch.long), torch.ones(1), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="unsupported dtype"):
        CpuOps.bag(table.double(), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.tensor([0, 1]))


def parts(seed):
    """Two random row-gradient parts over N rows: (ids (B, K), weights (B, K), grad_out (B, D))."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, N, (B, K), generator=g), torch.randn(B, K, generator=g), torch.randn(B, D, generator=g))
        for B, K in ((5, 4), (3, 6))
    ]


@pytest.mark.parametrize("ops", [TorchOps, CpuOps, TritonOps])
def test_row_gradients_take_int32_ids_and_refuse_bad_ones(ops):
    skip_unavailable({TorchOps: "torch_rows", CpuOps: "cpu", TritonOps: "triton"}[ops])
    wide, narrow = RowGrad(N, D, ops), RowGrad(N, D, ops)
    for i, (ids, weights, grad_out) in enumerate(parts(seed=5)):
        wide.add(ids, weights, grad_out)
        narrow.add(ids.int() if i == 0 else ids, weights, grad_out)  # mixed dtypes over parts
    for e, g in zip(wide.rows(), narrow.rows(), strict=True):
        assert torch.equal(e, g)
    assert torch.equal(wide.to_dense(), narrow.to_dense()) and wide.to_dense().abs().sum() > 0
    ids, weights, grad_out = parts(seed=6)[0]
    for bad in (-1, N):
        ids[0, 0] = bad
        with pytest.raises(IndexError, match=rf"row gradient: ids must lie in \[0, {N}\) \(the table has {N} rows\)"):
            RowGrad(N, D, ops).add(ids, weights, grad_out)
    with pytest.raises(ValueError, match="row gradient: ids must be int64 or int32, got torch.float64"):
        RowGrad(N, D, ops).add(ids.double(), weights, grad_out)


def adam_state():
    return torch.zeros(N, D), torch.zeros(N, D), torch.zeros(N, dtype=torch.int32)


UPDATES = {
    "sgd": lambda table, grad: row_update.sgd_update(table, grad, lr=0.1, weight_decay=0.01),
    "adagrad": lambda table, grad: row_update.adagrad_update(table, torch.zeros(N), grad, lr=0.1, weight_decay=0.01),
    "adam": lambda table, grad: row_update.adam_update(table, *adam_state(), grad, lr=0.1, weight_decay=0.01),
}


@pytest.mark.parametrize("update", sorted(UPDATES))
def test_row_updates_take_int32_rows_and_refuse_bad_rows(update):
    g = torch.Generator().manual_seed(7)
    table = torch.randn(N, D, generator=g)
    rows, grads = torch.tensor([0, 4, 5, 12]), torch.randn(4, D, generator=g)
    wide, narrow = table.clone(), table.clone()
    UPDATES[update](wide, (rows, grads))
    UPDATES[update](narrow, (rows.int(), grads))
    assert torch.equal(wide, narrow) and not torch.equal(wide, table)
    for bad in (-1, N):
        with pytest.raises(IndexError, match=rf"row update: rows must lie in \[0, {N}\) \(the table has {N} rows\)"):
            UPDATES[update](table, (torch.tensor([0, 4, 5, bad]), grads))
    with pytest.raises(ValueError, match="row update: rows must be int64 or int32, got torch.float32"):
        UPDATES[update](table, (rows.float(), grads))
    with pytest.raises(ValueError, match=r"must be \(U,\) and \(U, 6\)"):
        UPDATES[update](table, (rows, grads[:, :-1]))


@pytest.mark.parametrize("ops", [TorchOps, CpuOps])
@pytest.mark.parametrize("update", sorted(UPDATES))
def test_row_updates_refuse_a_row_gradient_of_another_table(update, ops):
    """The fused kernels write the gradient's rows by address: a gradient of a larger or wider
    table must be refused, never applied."""
    if ops is CpuOps and not cpu.available():
        pytest.skip("no C compiler for the CPU kernels")
    table = torch.randn(N, D)
    for n_rows, dim in ((N + 20, D), (N, D + 2)):
        grad = RowGrad(n_rows, dim, ops)
        ids, weights, _ = parts(seed=8)[0]
        grad.add(ids + 20 if n_rows > N else ids, weights, torch.randn(ids.shape[0], dim))
        with pytest.raises(ValueError, match=rf"a row gradient of a \({n_rows}, {dim}\) table cannot update a \({N}, {D}\) table"):
            UPDATES[update](table, grad)


def test_adam_refuses_moments_of_another_shape():
    table, (m, v, steps) = torch.randn(N, D), adam_state()
    grad = RowGrad(N, D, CpuOps if cpu.available() else TorchOps)
    grad.add(*parts(seed=9)[0])
    for state in ((m[:-1], v, steps), (m, v[:, :-1], steps), (m, v, steps[:-1])):
        with pytest.raises(ValueError, match=r"Adam state of a \(13, 6\) table must be moments of that shape"):
            row_update.adam_update(table, *state, grad, lr=0.1)


CRASHED = """
import torch
from memlayers.kernels import embedding_bag
g = torch.Generator().manual_seed(0)
idx, w, table = torch.randint(0, 50, (8, 4), generator=g), torch.randn(8, 4, generator=g), torch.randn(50, 16, generator=g)
idx[0, :2] = torch.tensor([0, 49])
print("int32 equal:", torch.equal(embedding_bag(idx.int(), w, table), embedding_bag(idx, w, table)))  # the default backend
for bad in (idx.float(), idx - 50, idx * 1000):
    try:
        embedding_bag(bad, w, table)
    except (ValueError, IndexError) as error:
        print(type(error).__name__, error)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")
def test_the_calls_that_crashed_the_c_kernel_raise_in_a_fresh_process():
    """`embedding_bag(idx.int(), w, table)` on the default CPU backend was a segmentation fault:
    run in a child, so that a crash fails this test (exit -11) instead of killing pytest."""
    child = subprocess.run(
        [sys.executable, "-c", CRASHED], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.splitlines() == [
        "int32 equal: True",
        "ValueError embedding_bag: indices must be int64 or int32, got torch.float32",
        "IndexError embedding_bag: indices must lie in [0, 50) (the table has 50 rows), got ids in [-50, -1]",
        "IndexError embedding_bag: indices must lie in [0, 50) (the table has 50 rows), got ids in [0, 49000]",
    ]
