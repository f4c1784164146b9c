"""MemoryLayer: outputs against naive loops, gradients, variants, shared pools."""

import math

import pytest
import torch
import torch.nn.functional as F

from memlayers.memory import MemoryConfig, MemoryLayer, MemoryPool

DIM = 12


def make_layer(seed=0, **overrides):
    torch.manual_seed(seed)
    config = MemoryConfig(**{"n_keys": 6, "heads": 2, "knn": 3, "k_dim": 8, **overrides})
    return MemoryLayer(DIM, config).double()


def naive_read(layer, x):
    """Per token: brute-force top-knn, softmax, weighted sum of value rows (and PEER activations)."""
    cfg = layer.config
    flat = x.reshape(-1, DIM)
    outputs = []
    for token in flat:
        scores, slots = layer.slot_scores(token).topk(cfg.knn, dim=-1)  # (heads, knn)
        weights = torch.softmax(scores / cfg.temperature, dim=-1)
        y = 0
        for h in range(cfg.heads):
            for i in range(cfg.knn):
                slot = slots[h, i]
                if cfg.variant == "peer":
                    y = y + weights[h, i] * F.gelu(layer.pool.up[slot] @ token) * layer.pool.values[slot]
                else:
                    y = y + weights[h, i] * layer.pool.values[slot]
        outputs.append(y)
    return torch.stack(outputs).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("value_dim,temperature", [(None, 1.0), (20, 1.0), (None, 0.1)])
def test_memory_plus_equals_naive(value_dim, temperature):
    layer = make_layer(value_dim=value_dim, temperature=temperature)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    y = naive_read(layer, x)
    expected = layer.w2(y * F.silu(layer.w1(x)))
    out = layer(x)
    assert out.shape == (2, 4, DIM)
    torch.testing.assert_close(out, expected)


def test_plain_variant_reads_values_directly_or_projects():
    layer = make_layer(variant="plain")
    assert layer.w1 is None and layer.w2 is None
    x = torch.randn(3, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_read(layer, x))
    projected = make_layer(variant="plain", value_dim=7)
    assert projected.w1 is None and projected.w2.weight.shape == (DIM, 7)
    torch.testing.assert_close(projected(x), projected.w2(naive_read(projected, x)))


def test_peer_equals_naive_per_slot_loop():
    layer = make_layer(variant="peer", seed=3)
    assert layer.pool.up.shape == (36, DIM) and layer.pool.values.shape == (36, DIM)
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_read(layer, x))


def test_gate_scales_the_output():
    gated = make_layer(gated=True, seed=5)
    plain = make_layer(gated=False, seed=5)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate")})
    x = torch.randn(4, DIM, dtype=torch.float64)
    expected = torch.sigmoid(gated.gate(x)) * plain(x)
    torch.testing.assert_close(gated(x), expected)


@pytest.mark.parametrize("variant,gated", [("plus", True), ("plain", False), ("peer", True)])
def test_gradients_reach_every_parameter(variant, gated):
    layer = make_layer(variant=variant, gated=gated, query_bias=True)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    (layer(x) * torch.randn(2, 5, DIM, dtype=torch.float64)).sum().backward()
    names = {name for name, _ in layer.named_parameters()}
    expected = {"search.query_proj.weight", "search.query_proj.bias", "search.keys", "pool.values"}
    expected |= {"w1.weight", "w2.weight"} if variant == "plus" else set()
    expected |= {"gate.weight", "gate.bias"} if gated else set()
    expected |= {"pool.up"} if variant == "peer" else set()
    assert names == expected
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    # only the rows that were read get value gradient
    _, indices = layer.lookup(x)
    touched = torch.zeros(36, dtype=torch.bool)
    touched[indices.flatten()] = True
    row_has_grad = layer.pool.values.grad.abs().sum(-1) > 0
    assert torch.equal(row_has_grad, touched)


def test_bfloat16_layer_matches_float32():
    layer = make_layer(seed=2).float()
    x = torch.randn(6, DIM)
    reference = layer(x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


def test_shared_pool_is_referenced_not_registered():
    config = MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8)
    pool = MemoryPool(DIM, config)
    first, second = MemoryLayer(DIM, config, pool=pool), MemoryLayer(DIM, config, pool=pool)
    assert first.pool is second.pool is pool
    assert not first.owns_pool
    assert all("pool" not in name for name, _ in first.named_parameters())
    own = MemoryLayer(DIM, config)
    assert own.owns_pool and "pool.values" in dict(own.named_parameters())


def test_shared_pool_of_the_wrong_shape_is_rejected():
    pool = MemoryPool(DIM, MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8))
    with pytest.raises(ValueError, match="shared pool"):
        MemoryLayer(DIM, MemoryConfig(n_keys=5, heads=2, knn=3, k_dim=8), pool=pool)
    with pytest.raises(ValueError, match="peer"):
        MemoryLayer(DIM, MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8, variant="peer"), pool=pool)


def test_init_scales():
    torch.manual_seed(0)
    layer = MemoryLayer(256, MemoryConfig(n_keys=64, heads=2, knn=4, k_dim=16, value_dim=128))
    assert layer.pool.values.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert layer.w1.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert layer.w2.weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
