"""Optimizer groups chosen by parameter name, per-group clipping, and a few real AdamW steps."""

from __future__ import annotations

import math

import pytest
import torch

from memlayers.config import ConfigError
from memlayers.memory.config import MemoryConfig
from memlayers.model import ModelConfig, MoEConfig, Transformer
from memlayers.model.ffn import MoE
from memlayers.train import OptimConfig, build_optimizer, clip_gradients
from memlayers.train.optim import peak_lr

MEMORY = {"n_keys": 4, "heads": 2, "knn": 2, "k_dim": 6}


def _config(memory: dict | None = None, **overrides) -> ModelConfig:
    fields = {
        "dim": 16,
        "n_layers": 3,
        "n_heads": 2,
        "vocab_size": 29,
        "max_seq_len": 16,
        "ffn_hidden_dim": 20,
    }
    fields.update(overrides)
    return ModelConfig(
        **fields,
        memory=MemoryConfig(**{**MEMORY, **(memory or {})}),
        moe=MoEConfig(n_experts=3, top_k=2, hidden_dim=6),
    )


def _model(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(_config(**kwargs))


def _groups(optimizer) -> dict[str, dict]:
    return {group["name"]: group for group in optimizer.param_groups}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


OPTIM = OptimConfig(lr=2e-4, weight_decay=0.05, value_lr=3e-3, value_weight_decay=0.01)


def _check_groups(model: Transformer, expected_values: list[torch.Tensor]) -> dict[str, dict]:
    optimizer = build_optimizer(model, OPTIM)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = _groups(optimizer)
    all_params = list(model.parameters())
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    # Each parameter appears exactly once.
    assert len(grouped) == len(all_params) == len(_ids(grouped))
    assert _ids(grouped) == _ids(all_params)

    values = groups["values"]
    assert _ids(values["params"]) == _ids(expected_values)
    assert len(values["params"]) == len(expected_values)
    assert values["lr"] == 3e-3 and values["weight_decay"] == 0.01
    experts = [p for layer in model.layers if isinstance(layer.ffn, MoE) for p in (layer.ffn.w1, layer.ffn.w2, layer.ffn.w3)]
    if experts:
        assert _ids(groups["experts"]["params"]) == _ids(experts)
        assert groups["experts"]["lr"] == 2e-4 and groups["experts"]["weight_decay"] == 0.05  # expert_lr null: lr
    else:
        assert "experts" not in groups
    rest = [p for p in all_params if id(p) not in _ids(expected_values) | _ids(experts)]
    assert _ids(groups["decay"]["params"]) == _ids(p for p in rest if p.dim() >= 2)
    assert groups["decay"]["lr"] == 2e-4 and groups["decay"]["weight_decay"] == 0.05
    assert _ids(groups["no_decay"]["params"]) == _ids(p for p in rest if p.dim() < 2)
    assert groups["no_decay"]["lr"] == 2e-4 and groups["no_decay"]["weight_decay"] == 0.0
    for group in optimizer.param_groups:
        assert group["betas"] == (OPTIM.beta1, OPTIM.beta2) and group["eps"] == OPTIM.eps
    return groups


def test_groups_shared_pool():
    model = _model(memory_layers=(0, 2))
    groups = _check_groups(model, [model.memory_pool.values])
    # The memory layer's own matrices (query, keys, W_1, W_2) are ordinary decayed weights.
    layer = model.layers[0].ffn
    decay = _ids(groups["decay"]["params"])
    for param in (
        layer.search.query_proj.weight,
        layer.search.keys,
        layer.w1.weight,
        layer.w2.weight,
    ):
        assert id(param) in decay
    assert id(layer.search.query_proj.bias) in _ids(groups["no_decay"]["params"])
    assert id(model.layers[1].attention_norm.weight) in _ids(groups["no_decay"]["params"])


def test_groups_unshared_pools():
    model = _model(memory_layers=(0, 2), memory={"shared_values": False})
    first, second = model.memory_layers()
    _check_groups(model, [first.pool.values, second.pool.values])


def test_groups_peer_pool_includes_up():
    model = _model(memory_layers=(1,), memory={"variant": "peer"})
    _check_groups(model, [model.memory_pool.values, model.memory_pool.up])


def test_groups_unshared_peer_pools():
    model = _model(memory_layers=(0, 1), memory={"variant": "peer", "shared_values": False})
    tables = [t for layer in model.memory_layers() for t in (layer.pool.values, layer.pool.up)]
    _check_groups(model, tables)


def test_groups_tied_moe_gated_model():
    model = _model(memory_layers=(1,), moe_layers=(2,), tie_embeddings=True, memory={"gated": True})
    groups = _check_groups(model, [model.memory_pool.values])
    assert id(model.layers[1].ffn.gate.bias) in _ids(groups["no_decay"]["params"])
    assert id(model.layers[2].ffn.w1) in _ids(groups["experts"]["params"])
    assert id(model.layers[2].ffn.router.weight) in _ids(groups["decay"]["params"])


def test_experts_get_their_own_learning_rate_through_the_schedule():
    model = _model(moe_layers=(1,))
    config = OptimConfig(lr=2e-4, expert_lr=5e-3)
    groups = _groups(build_optimizer(model, config))
    assert groups["experts"]["lr"] == 5e-3 and groups["decay"]["lr"] == 2e-4
    assert [peak_lr(config, name) for name in ("experts", "values", "decay", "no_decay")] == [5e-3, 1e-3, 2e-4, 2e-4]


def test_dense_model_has_no_values_group():
    model = _model()
    groups = _groups(build_optimizer(model, OPTIM))
    assert set(groups) == {"decay", "no_decay"}


def test_frozen_parameters_are_left_out():
    model = _model(memory_layers=(1,))
    model.tok_embeddings.weight.requires_grad_(False)
    grouped = [p for g in build_optimizer(model, OPTIM).param_groups for p in g["params"]]
    assert id(model.tok_embeddings.weight) not in _ids(grouped)
    assert len(grouped) == sum(1 for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- clipping


def _set_grads(model: Transformer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)


def _norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))


def _scale_to(params, target: float) -> None:
    scale = target / _norm(params)
    for p in params:
        p.grad.mul_(scale)


def _clip_case(config: OptimConfig, seed: int, value_norm: float, rest_norm: float, **model_kwargs):
    """An optimizer over a memory model whose value and other gradients have the given norms.

    Returns the optimizer, the value parameters and the other parameters."""
    model = _model(**{"memory_layers": (1,), **model_kwargs})
    optimizer = build_optimizer(model, config)
    values = _groups(optimizer)["values"]["params"]
    rest = [p for p in model.parameters() if id(p) not in _ids(values)]
    _set_grads(model, seed=seed)
    _scale_to(values, value_norm)
    _scale_to(rest, rest_norm)
    return optimizer, values, rest


@pytest.mark.parametrize("shared", [True, False])
def test_clip_gradients_clips_values_and_rest_separately(shared):
    config = OptimConfig(grad_clip=2.0, value_grad_clip=0.5)
    optimizer, values, rest = _clip_case(config, 0, 7.0, 13.0, memory_layers=(0, 2), memory={"shared_values": shared})
    before = {id(p): p.grad.clone() for p in values + rest}

    norms = clip_gradients(optimizer, config)
    assert norms["value_grad_norm"] == pytest.approx(7.0, rel=1e-5)
    assert norms["grad_norm"] == pytest.approx(13.0, rel=1e-5)
    assert _norm(values) == pytest.approx(0.5, rel=1e-5)
    assert _norm(rest) == pytest.approx(2.0, rel=1e-5)
    # Clipping scales each group uniformly, keeping directions.
    for params, scale in ((values, 0.5 / 7.0), (rest, 2.0 / 13.0)):
        for p in params:
            torch.testing.assert_close(p.grad, before[id(p)] * scale, rtol=1e-5, atol=1e-8)


def test_clip_gradients_group_below_its_limit_is_untouched():
    config = OptimConfig(grad_clip=1.0, value_grad_clip=1.0)
    # a huge value gradient must not shrink the rest
    optimizer, values, rest = _clip_case(config, 1, 50.0, 0.3)
    before = {id(p): p.grad.clone() for p in rest}
    norms = clip_gradients(optimizer, config)
    assert norms["value_grad_norm"] == pytest.approx(50.0, rel=1e-5)
    assert norms["grad_norm"] == pytest.approx(0.3, rel=1e-5)
    assert _norm(values) == pytest.approx(1.0, rel=1e-5)
    for p in rest:
        assert torch.equal(p.grad, before[id(p)])


def test_clip_gradients_none_limits_clip_nothing():
    config = OptimConfig(grad_clip=None, value_grad_clip=None)
    optimizer, values, rest = _clip_case(config, 2, 9.0, 11.0)
    before = {id(p): p.grad.clone() for p in values + rest}
    norms = clip_gradients(optimizer, config)
    assert norms["value_grad_norm"] == pytest.approx(9.0, rel=1e-5)
    assert norms["grad_norm"] == pytest.approx(11.0, rel=1e-5)
    for p in values + rest:
        assert torch.equal(p.grad, before[id(p)])


def test_clip_gradients_one_limit_none():
    config = OptimConfig(grad_clip=1.0, value_grad_clip=None)
    optimizer, values, rest = _clip_case(config, 3, 9.0, 11.0)
    norms = clip_gradients(optimizer, config)
    assert norms == {
        "grad_norm": pytest.approx(11.0, rel=1e-5),
        "value_grad_norm": pytest.approx(9.0, rel=1e-5),
    }
    assert _norm(values) == pytest.approx(9.0, rel=1e-5)
    assert _norm(rest) == pytest.approx(1.0, rel=1e-5)


def test_clip_gradients_skips_missing_grads_and_dense_models():
    model = _model()
    config = OptimConfig()
    optimizer = build_optimizer(model, config)
    assert clip_gradients(optimizer, config) == {}  # no gradients yet
    _set_grads(model, seed=4)
    assert set(clip_gradients(optimizer, config)) == {"grad_norm"}


# ---------------------------------------------------------------- config and training


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"value_lr": 0.0}, "value_lr"),
        ({"expert_lr": 0.0}, "expert_lr"),
        ({"eps": 0.0}, "eps"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"value_weight_decay": -1.0}, "value_weight_decay"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"value_grad_clip": -1.0}, "value_grad_clip"),
    ],
)
def test_optim_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        OptimConfig(**kwargs)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: must be")


def test_optim_config_valid_edges():
    OptimConfig(
        beta1=0.0, weight_decay=0.0, value_weight_decay=0.0, grad_clip=None, value_grad_clip=None
    )


@pytest.mark.parametrize(
    "memory", [{}, {"variant": "peer"}, {"shared_values": False}], ids=["plus", "peer", "unshared"]
)
def test_adamw_steps_reduce_the_loss(memory):
    model = _model(memory_layers=(0, 2), moe_layers=(1,), memory=memory)
    config = OptimConfig(lr=1e-2, value_lr=3e-2, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 29, (4, 12), generator=generator)
    targets = torch.randint(0, 29, (4, 12), generator=generator)
    values = [p.detach().clone() for p in _groups(optimizer)["values"]["params"]]
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(tokens, targets).loss
        loss.backward()
        clip_gradients(optimizer, config)
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    # The value tables were trained too.
    for before, after in zip(values, _groups(optimizer)["values"]["params"], strict=True):
        assert not torch.equal(before, after.detach())
