"""embedding_bag: the reference against a naive loop, every backend against the reference."""

import pytest
import torch

from memlayers.kernels import BACKENDS, embedding_bag, embedding_bag_reference


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_naive_loop(dtype):
    indices, weights, table = random_case(dtype)
    assert (indices[..., 0] == indices[..., 1]).all()
    torch.testing.assert_close(embedding_bag_reference(indices, weights, table), naive(indices, weights, table))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(7,), (2, 3), (2, 2, 2)])
def test_backend_matches_reference_forward_and_backward(backend, dtype, lead):
    indices, weights, table = random_case(dtype, lead=lead, seed=len(lead))
    w_ref, t_ref = weights.clone().requires_grad_(), table.clone().requires_grad_()
    w, t = weights.clone().requires_grad_(), table.clone().requires_grad_()
    grad = torch.randn(*lead, table.shape[1], dtype=dtype)
    expected = embedding_bag_reference(indices, w_ref, t_ref)
    out = embedding_bag(indices, w, t, backend=backend)
    torch.testing.assert_close(out, expected)
    expected.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch.testing.assert_close(t.grad, t_ref.grad)
    # weight gradient is grad . V[slot]
    torch.testing.assert_close(w.grad, (table[indices] * grad.unsqueeze(-2)).sum(-1))


def test_bad_inputs_raise_clear_errors():
    indices, weights, table = random_case(torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        embedding_bag(indices, weights[..., :-1], table)
    with pytest.raises(ValueError, match="2-D"):
        embedding_bag(indices, weights, table[None])
    with pytest.raises(ValueError, match="unknown embedding_bag backend"):
        embedding_bag(indices, weights, table, backend="cuda-magic")
