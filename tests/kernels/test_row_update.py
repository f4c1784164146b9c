"""Row-sparse updates: the fused C kernels against the torch references, and the
references against the optimizer formulas written out by hand."""

import math

import pytest
import torch

from memlayers.kernels import cpu, embedding_bag, row_update
from memlayers.kernels.backends import CpuOps, TorchOps
from memlayers.kernels.embedding_bag import RowGrad, row_grad_of

needs_c = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")
N, D = 40, 12


def row_grad(ops, seed=0, scale=1.0):
    """A random row gradient over 40 rows (some untouched, some read many times), in two parts."""
    g = torch.Generator().manual_seed(seed)
    grad = RowGrad(N, D, ops)
    for B, K in ((6, 4), (3, 5)):
        ids = torch.randint(0, N - 8, (B, K), generator=g)  # rows N-8.. are never touched
        grad.add(ids, torch.rand(B, K, generator=g), torch.randn(B, D, generator=g))
    grad.scale = scale
    return grad


def tables(dtype, state_dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N, D, generator=g).to(dtype)
    m = (0.1 * torch.randn(N, D, generator=g)).to(state_dtype)
    v = torch.rand(N, D, generator=g).mul(0.01).to(state_dtype)
    steps = torch.randint(0, 5, (N,), generator=g, dtype=torch.int32)
    s = torch.rand(N, generator=g)
    return table, m, v, steps, s


def close(a, b, dtype):
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(a.float(), b.float(), **tol)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_fused_sgd_and_adagrad_match_references(dtype, scale):
    for name in ("sgd", "adagrad"):
        fused, fused_s = tables(dtype)[0], tables(dtype)[4]
        ref, ref_s = tables(dtype)[0], tables(dtype)[4]
        if name == "sgd":
            row_update.sgd_update(fused, row_grad(CpuOps, scale=scale), lr=0.1, weight_decay=0.01)
            row_update.sgd_update(ref, row_grad(TorchOps, scale=scale), lr=0.1, weight_decay=0.01)
        else:
            row_update.adagrad_update(fused, fused_s, row_grad(CpuOps, scale=scale), lr=0.1, eps=1e-8, weight_decay=0.01)
            row_update.adagrad_update(ref, ref_s, row_grad(TorchOps, scale=scale), lr=0.1, eps=1e-8, weight_decay=0.01)
            close(fused_s, ref_s, torch.float32)
        close(fused, ref, dtype)
        assert not torch.equal(fused, tables(dtype)[0])  # it did move


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_adam_matches_reference(dtype, state_dtype):
    fused, ref = tables(dtype, state_dtype), tables(dtype, state_dtype)
    for step in range(3):
        row_update.adam_update(*fused[:4], row_grad(CpuOps, seed=step, scale=0.7), 1e-2, 0.9, 0.99, 1e-8, 0.1)
        row_update.adam_update(*ref[:4], row_grad(TorchOps, seed=step, scale=0.7), 1e-2, 0.9, 0.99, 1e-8, 0.1)
    for a, b in zip(fused[:3], ref[:3], strict=True):
        close(a, b, dtype if a is fused[0] else state_dtype)
    assert torch.equal(fused[3], ref[3])


@pytest.mark.parametrize("ops", [TorchOps, CpuOps], ids=["reference", "fused"])
def test_untouched_rows_are_bitwise_unchanged(ops):
    if ops is CpuOps and not cpu.available():
        pytest.skip("no C compiler")
    table, m, v, steps, s = tables(torch.float32)
    before = [t.clone() for t in (table, m, v, steps, s)]
    grad = row_grad(ops)
    touched = torch.zeros(N, dtype=torch.bool)
    touched[grad.segments().rows] = True
    row_update.adam_update(table, m, v, steps, grad, 1e-2, weight_decay=0.1)
    row_update.adagrad_update(table, s, row_grad(ops), 1e-2, weight_decay=0.1)
    for new, old in zip((table, m, v, steps, s), before, strict=True):
        assert torch.equal(new[~touched], old[~touched])
        assert not torch.equal(new[touched], old[touched])
    assert torch.equal(steps[touched], before[3][touched] + 1)


def test_references_follow_the_formulas():
    table, m, v, steps, s = tables(torch.float32)
    grad = row_grad(TorchOps, scale=0.5)
    rows, g = grad.rows()
    r, gr = int(rows[0]), g[0]
    p0, m0, v0, t0, s0 = table[r].clone(), m[r].clone(), v[r].clone(), int(steps[r]), float(s[r])
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1

    row_update.adam_update(table, m, v, steps, grad, lr, b1, b2, eps, wd)
    t = t0 + 1
    m1, v1 = b1 * m0 + (1 - b1) * gr, b2 * v0 + (1 - b2) * gr**2
    expected = p0 * (1 - lr * wd) - lr / (1 - b1**t) * m1 / (v1.sqrt() / math.sqrt(1 - b2**t) + eps)
    torch.testing.assert_close(table[r], expected)
    assert int(steps[r]) == t

    p1 = table[r].clone()
    row_update.adagrad_update(table, s, row_grad(TorchOps, scale=0.5), lr, eps, wd)
    s1 = s0 + float(gr.square().mean())
    assert float(s[r]) == pytest.approx(s1, rel=1e-6)
    torch.testing.assert_close(table[r], p1 * (1 - lr * wd) - lr * gr / (math.sqrt(s1) + eps))


def test_first_touch_late_gets_its_own_bias_correction():
    """Adam's first step moves a row by ~lr per coordinate, whatever the global step."""
    table = torch.nn.Parameter(torch.zeros(10, 4))
    m, v = torch.zeros(10, 4), torch.zeros(10, 4)
    steps = torch.zeros(10, dtype=torch.int32)
    for _ in range(5):  # rows 0..4 are trained for five steps first
        embedding_bag(torch.arange(5)[None], torch.ones(1, 5), table, table_grad="rows").sum().backward()
        row_update.adam_update(table, m, v, steps, row_grad_of(table), lr=0.1)
        table.row_grad = None
    embedding_bag(torch.tensor([[7]]), torch.ones(1, 1), table, table_grad="rows").sum().backward()
    row_update.adam_update(table, m, v, steps, row_grad_of(table), lr=0.1)
    torch.testing.assert_close(table[7].detach(), torch.full((4,), -0.1), atol=1e-6, rtol=0)
    assert steps.tolist() == [5] * 5 + [0, 0, 1, 0, 0]


def test_dense_gradient_rows_and_state_checks():
    grad = torch.zeros(6, 3)
    grad[[1, 4]] = torch.randn(2, 3)
    rows, g = row_update.dense_rows(grad)
    assert rows.tolist() == [1, 4] and torch.equal(g, grad[[1, 4]])
    table = torch.randn(6, 3)
    with pytest.raises(ValueError, match="float32 of shape"):
        row_update.adagrad_update(table, torch.zeros(5), (rows, g), lr=0.1)
    with pytest.raises(ValueError, match="int32"):
        row_update.adam_update(table, torch.zeros(6, 3), torch.zeros(6, 3), torch.zeros(6), (rows, g), lr=0.1)


@pytest.mark.parametrize("ops", [TorchOps, CpuOps], ids=["reference", "fused"])
def test_an_update_invalidates_graphs_that_saved_the_old_table(ops):
    if ops is CpuOps and not cpu.available():
        pytest.skip("no C compiler")
    table = torch.nn.Parameter(torch.randn(N, D))
    indices, weights = torch.randint(0, N, (3, 4)), torch.rand(3, 4, requires_grad=True)
    stale = embedding_bag(indices, weights, table, table_grad="rows")  # saves the table for the weight gradient
    row_update.sgd_update(table, row_grad(ops), lr=0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.sum().backward()


def test_adagrad_on_column_shards_equals_adagrad_on_the_whole_table():
    """Memory parallelism splits rows into column shards; with the per-row sums of g^2
    added over the shards, each shard moves exactly as its columns of the whole table."""
    table, _, _, _, state = tables(torch.float32)
    rows, grads = row_grad(TorchOps, seed=3).rows()
    whole, whole_state = table.clone(), state.clone()
    row_update.adagrad_update(whole, whole_state, (rows, grads), lr=0.1, weight_decay=0.01)
    total = grads.square().sum(dim=1)  # what the all-reduce over the shards returns
    for cols in (slice(0, 5), slice(5, D)):
        shard, shard_state = table[:, cols].contiguous(), state.clone()
        row_update.adagrad_update(shard, shard_state, (rows, grads[:, cols].contiguous()), lr=0.1, weight_decay=0.01,
                                  row_sum_reduce=lambda local, total=total: total.clone(), row_width=D)
        torch.testing.assert_close(shard, whole[:, cols])
        torch.testing.assert_close(shard_state, whole_state)
