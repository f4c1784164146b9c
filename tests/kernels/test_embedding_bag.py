"""embedding_bag: the reference against a naive loop, every backend against the reference,
dense and row gradients, backend choice and bad input."""

import importlib

import pytest
import torch

from memlayers.kernels import (
    BACKENDS,
    backends,
    cpu,
    embedding_bag,
    embedding_bag_reference,
    embedding_dot,
)
from memlayers.kernels.embedding_bag import row_grad_of

eb_module = importlib.import_module("memlayers.kernels.embedding_bag")  # the package re-exports the function's name

# dtypes each backend takes (triton runs fp32 only under the interpreter)
DTYPES = {
    "reference": [torch.float32, torch.float64],
    "torch": [torch.float32, torch.float64],
    "torch_rows": [torch.float32, torch.float64],
    "cpu": [torch.float32],
    "triton": [torch.float32],
    "triton_atomic": [torch.float32],
}
FAST = ["torch_rows", "cpu", "triton", "triton_atomic"]
CASES = [(b, d) for b in sorted(BACKENDS) for d in DTYPES[b]]


def naive(indices, weights, table):
    flat_i, flat_w = indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1])
    out = torch.zeros(flat_i.shape[0], table.shape[1], dtype=table.dtype)
    for b in range(flat_i.shape[0]):
        for k in range(flat_i.shape[1]):
            out[b] += flat_w[b, k] * table[flat_i[b, k]]
    return out.reshape(*indices.shape[:-1], table.shape[1])


def random_case(dtype, lead=(3, 4), bag=6, rows=10, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=g, dtype=dtype)
    # few rows and many lookups: duplicates within a bag and across bags
    indices = torch.randint(0, rows, (*lead, bag), generator=g)
    indices[..., 1] = indices[..., 0]
    weights = torch.randn(*lead, bag, generator=g, dtype=dtype)
    return indices, weights, table


def skip_unavailable(backend):
    if backend.startswith("triton") and not backends.triton_available():
        pytest.skip("triton is not installed")
    if backend == "cpu" and not cpu.available():
        pytest.skip("no C compiler for the CPU kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_naive_loop(dtype):
    indices, weights, table = random_case(dtype)
    assert (indices[..., 0] == indices[..., 1]).all()
    torch.testing.assert_close(embedding_bag_reference(indices, weights, table), naive(indices, weights, table))


@pytest.mark.parametrize(("backend", "dtype"), CASES)
@pytest.mark.parametrize("lead", [(7,), (2, 3), (2, 2, 2)])
@pytest.mark.parametrize("bag", [6, 19])  # 19: the C kernels' 8-row and 4-row unrolled loops plus a tail
def test_backend_matches_reference_forward_and_backward(backend, dtype, lead, bag):
    skip_unavailable(backend)
    indices, weights, table = random_case(dtype, lead=lead, bag=bag, seed=len(lead))
    w_ref, t_ref = weights.clone().requires_grad_(), table.clone().requires_grad_()
    w, t = weights.clone().requires_grad_(), table.clone().requires_grad_()
    grad = torch.randn(*lead, table.shape[1], dtype=dtype)
    expected = embedding_bag_reference(indices, w_ref, t_ref)
    out = embedding_bag(indices, w, t, backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)
    expected.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch.testing.assert_close(t.grad, t_ref.grad)
    # weight gradient is grad . V[slot]
    torch.testing.assert_close(w.grad, (table[indices] * grad.unsqueeze(-2)).sum(-1))


@pytest.mark.parametrize("backend", ["torch_rows", "cpu", "triton"])
def test_row_gradient_equals_dense_gradient_and_touches_only_read_rows(backend):
    skip_unavailable(backend)
    indices, weights, table = random_case(torch.float32, lead=(5,), bag=4, rows=40, dim=7, seed=3)
    t_ref = table.clone().requires_grad_()
    t = torch.nn.Parameter(table.clone())
    grad = torch.randn(5, 7)
    embedding_bag_reference(indices, weights, t_ref).backward(grad)
    embedding_bag(indices, weights, t, backend=backend, table_grad="rows").backward(grad)
    assert t.grad is None  # nothing dense was written
    rows, grads = row_grad_of(t).rows()
    torch.testing.assert_close(rows, indices.unique())  # unique, ascending
    torch.testing.assert_close(grads, t_ref.grad[rows])
    assert row_grad_of(t).n_lookups == indices.numel()
    assert rows.numel() < 40 and t_ref.grad[~torch.isin(torch.arange(40), rows)].abs().max() == 0


def test_row_gradients_accumulate_over_layers_and_micro_batches():
    """A shared table read twice in one step, and two backward passes: the parts add up."""
    g = torch.Generator().manual_seed(5)
    table = torch.randn(30, 6, generator=g)
    t_ref, t = table.clone().requires_grad_(), torch.nn.Parameter(table.clone())
    for _ in range(2):  # two micro-batches
        i1, i2 = torch.randint(0, 30, (4, 3), generator=g), torch.randint(0, 30, (6, 5), generator=g)
        w1, w2 = torch.rand(4, 3, generator=g), torch.rand(6, 5, generator=g)
        g1, g2 = torch.randn(4, 6, generator=g), torch.randn(6, 6, generator=g)
        (embedding_bag_reference(i1, w1, t_ref) * g1).sum().add((embedding_bag_reference(i2, w2, t_ref) * g2).sum()).backward()
        (embedding_bag(i1, w1, t, table_grad="rows") * g1).sum().add((embedding_bag(i2, w2, t, table_grad="rows") * g2).sum()).backward()
    grad = row_grad_of(t)
    torch.testing.assert_close(grad.to_dense(), t_ref.grad)
    assert grad.sq_norm() == pytest.approx(float(t_ref.grad.double().square().sum()), rel=1e-5)
    grad.scale = 0.5
    torch.testing.assert_close(grad.to_dense(), 0.5 * t_ref.grad)
    assert grad.sq_norm() == pytest.approx(0.25 * float(t_ref.grad.double().square().sum()), rel=1e-5)


@pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")
def test_cpu_kernels_take_bfloat16_tables():
    indices, weights, table = random_case(torch.float32, lead=(6,), bag=19, rows=20, dim=9, seed=7)
    table = table.bfloat16()
    t, t_ref = table.clone().requires_grad_(), table.float().requires_grad_()
    grad = torch.randn(6, 9)
    out = embedding_bag(indices, weights, t, backend="cpu")
    expected = embedding_bag_reference(indices, weights, t_ref)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)  # one bf16 rounding of the sum
    w = weights.clone().requires_grad_()
    embedding_bag(indices, w, t, backend="cpu").backward(grad.bfloat16())
    torch.testing.assert_close(w.grad, (t_ref[indices] * grad.bfloat16().float().unsqueeze(-2)).sum(-1).detach())


@pytest.mark.parametrize(
    ("backend", "table_grad"),
    [("reference", "dense"), ("torch", "dense")] + [(b, g) for b in ("torch_rows", "cpu", "triton") for g in ("dense", "rows")],
)
def test_embedding_dot_matches_a_loop_with_both_gradients(backend, table_grad):
    """PEER's read of expert inputs: out[b, k] = table[ids[b, k]] . x[b]."""
    skip_unavailable(backend)
    indices, _, table = random_case(torch.float32, lead=(2, 3), bag=9, rows=12, dim=7, seed=11)
    x = torch.randn(2, 3, 7)
    expected = torch.stack([(table[indices[..., k]] * x).sum(-1) for k in range(9)], dim=-1)  # (2, 3, 9)
    t, xg = torch.nn.Parameter(table.clone()), x.clone().requires_grad_()
    t_ref, x_ref = table.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 3, 9)
    out = embedding_dot(indices, t, xg, backend, table_grad)
    torch.testing.assert_close(out, expected)
    out.backward(grad)
    (torch.einsum("...kd,...d->...k", t_ref[indices], x_ref) * grad).sum().backward()
    torch.testing.assert_close(xg.grad, x_ref.grad)
    if table_grad == "rows":
        assert t.grad is None
        torch.testing.assert_close(row_grad_of(t).to_dense(), t_ref.grad)
    else:
        torch.testing.assert_close(t.grad, t_ref.grad)
    with pytest.raises(ValueError, match="do not fit"):
        embedding_dot(indices, t, x[..., :-1], backend)


def test_auto_picks_the_cpu_kernels_and_falls_back_to_torch(monkeypatch):
    table = torch.randn(4, 3)
    assert backends.resolve_backend("auto", table) == ("cpu" if cpu.available() else "torch")
    assert backends.resolve_backend("auto", table.double()) == "torch"
    assert backends.resolve_backend("auto", table.double(), "rows") == "torch_rows"
    monkeypatch.setattr(cpu, "available", lambda: False)
    assert backends.resolve_backend("auto", table) == "torch"
    assert backends.resolve_backend("torch_rows", table) == "torch_rows"


def test_bad_inputs_raise_clear_errors():
    indices, weights, table = random_case(torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        embedding_bag(indices, weights[..., :-1], table)
    with pytest.raises(ValueError, match="2-D"):
        embedding_bag(indices, weights, table[None])
    with pytest.raises(ValueError, match="unknown embedding_bag backend"):
        embedding_bag(indices, weights, table, backend="cuda-magic")
    with pytest.raises(ValueError, match="table_grad must be"):
        embedding_bag(indices, weights, table, table_grad="sparse")
    with pytest.raises(ValueError, match="dense table gradient only"):
        embedding_bag(indices, weights, table, backend="reference", table_grad="rows")
    with pytest.raises(ValueError, match="leaf"):
        embedding_bag(indices, weights, table.requires_grad_() * 2, table_grad="rows")
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\) \(the table has 10 rows\), got ids in \[0, 10\]"):
        embedding_bag(torch.tensor([[0, 10]]), torch.ones(1, 2), table)  # every backend: see test_bad_ids.py
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU tables"):
        embedding_bag(indices, weights.double(), table.double(), backend="cpu")
