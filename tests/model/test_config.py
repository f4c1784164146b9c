"""ModelConfig and MoEConfig: rules, error keys and messages, FFN kinds and sizes, the presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from memlayers.config import ConfigError, from_dict, load_config
from memlayers.memory.config import MemoryConfig
from memlayers.model import ModelConfig, MoEConfig, Transformer, count_parameters
from memlayers.train import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# (ModelConfig kwargs, error key, text the message must state)
MODEL_ERRORS = [
    ({"dim": 30, "n_heads": 4}, "n_heads", "must divide dim=30"),
    ({"dim": 12, "n_heads": 4}, "n_heads", "must be even"),  # head_dim 3
    ({"dim": 16, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads", "must divide n_heads=4"),
    ({"dim": 16, "n_heads": 4, "n_kv_heads": 0}, "n_kv_heads", "must divide n_heads=4"),
    (
        {"n_layers": 4, "memory_layers": (4,)},
        "memory_layers",
        "layer 4 is outside the model (valid: 0..3)",
    ),
    ({"n_layers": 4, "memory_layers": (-1,)}, "memory_layers", "layer -1 is outside the model"),
    ({"n_layers": 4, "moe_layers": (9,)}, "moe_layers", "layer 9 is outside the model"),
    ({"n_layers": 4, "memory_layers": (1, 2, 1)}, "memory_layers", "lists a layer twice"),
    ({"n_layers": 4, "moe_layers": (3, 3)}, "moe_layers", "lists a layer twice"),
    (
        {"n_layers": 4, "memory_layers": (1, 2), "moe_layers": (2, 3)},
        "moe_layers",
        "[2] are also memory layers",
    ),
    ({"dim": 0}, "dim", "must be >= 1"),
    ({"vocab_size": 0}, "vocab_size", "must be >= 1"),
    ({"norm_eps": 0.0}, "norm_eps", "must be > 0"),
    ({"init_std": -0.1}, "init_std", "must be > 0"),
    ({"ffn_hidden_dim": 0}, "ffn_hidden_dim", "must be >= 1"),
]


@pytest.mark.parametrize(
    ("kwargs", "key", "rule"),
    MODEL_ERRORS,
    ids=[e[1] + "-" + str(i) for i, e in enumerate(MODEL_ERRORS)],
)
def test_model_config_errors_name_the_field_and_rule(kwargs, key, rule):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    assert info.value.key == key
    assert rule in str(info.value)
    assert str(info.value).startswith(f"{key}: ")
    assert isinstance(info.value, ValueError)


MOE_ERRORS = [
    ({"n_experts": 4, "top_k": 5}, "top_k", "must be in [1, n_experts=4], got 5"),
    ({"n_experts": 4, "top_k": 0}, "top_k", "must be in [1, n_experts=4], got 0"),
    ({"n_experts": 0, "top_k": 1}, "n_experts", "must be >= 1"),
    ({"hidden_dim": 0}, "hidden_dim", "must be >= 1 or null"),
    ({"aux_loss_weight": -1.0}, "aux_loss_weight", "must be >= 0"),
]


@pytest.mark.parametrize(("kwargs", "key", "rule"), MOE_ERRORS, ids=[e[1] for e in MOE_ERRORS])
def test_moe_config_errors_name_the_field_and_rule(kwargs, key, rule):
    with pytest.raises(ConfigError) as info:
        MoEConfig(**kwargs)
    assert info.value.key == key
    assert rule in str(info.value)


def test_valid_edge_values_are_accepted():
    # head_dim 2, every layer a memory layer
    ModelConfig(dim=16, n_heads=8, n_layers=2, memory_layers=(0, 1))
    ModelConfig(dim=16, n_heads=4, n_kv_heads=1, n_layers=3, memory_layers=(0,), moe_layers=(1, 2))
    MoEConfig(n_experts=3, top_k=3)
    assert ModelConfig(memory_layers=[2, 0]).memory_layers == (2, 0)  # lists become tuples


# (nested dict given to from_dict(RunConfig, ...), full dotted key, rule)
RUN_ERRORS = [
    ({"model": {"n_layers": 4, "memory_layers": [4]}}, "model.memory_layers", "outside the model"),
    ({"model": {"memory": {"knn": 2000}}}, "model.memory.knn", "must be <= n_keys (1024)"),
    ({"model": {"memory": {"k_dim": 33}}}, "model.memory.k_dim", "must be even"),
    ({"model": {"moe": {"n_experts": 2, "top_k": 3}}}, "model.moe.top_k", "n_experts=2"),
    ({"model": {"dim": 30}}, "model.n_heads", "must divide dim=30"),
    (
        {"model": {"n_layers": 3, "memory_layers": [1], "moe_layers": [1]}},
        "model.moe_layers",
        "also memory layers",
    ),
    ({"model": {"dimm": 3}}, "model.dimm", "unknown key"),
    ({"model": {"memory": {"n_key": 3}}}, "model.memory.n_key", "unknown key"),
    ({"modle": {}}, "modle", "unknown key"),
    ({"model": {"dim": "big"}}, "model.dim", "must be an integer"),
    ({"model": {"memory": {"variant": "huge"}}}, "model.memory.variant", "must be one of"),
    ({"optim": {"lr": 0}}, "optim.lr", "must be > 0"),
]


@pytest.mark.parametrize(("data", "key", "rule"), RUN_ERRORS, ids=[e[1] for e in RUN_ERRORS])
def test_run_config_errors_carry_the_full_dotted_key(data, key, rule):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    assert info.value.key == key
    assert rule in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.memory_layers=7"], "model.memory_layers"),
        (["model.memory_layers=[1,1]"], "model.memory_layers"),
        (["model.memory.knn=100"], "model.memory.knn"),  # tiny.yaml has n_keys 64
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.moe_layers=2"], "model.moe_layers"),  # tiny.yaml's memory layer is 2
        (["model.dimm=3"], "model.dimm"),
    ],
)
def test_load_config_overrides_errors_carry_the_full_dotted_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, CONFIGS / "tiny.yaml", overrides)
    assert info.value.key == key


def test_load_config_applies_overrides():
    config = load_config(
        RunConfig, CONFIGS / "tiny.yaml", ["model.memory_layers=1,3", "model.memory.knn=8"]
    )
    assert config.model.memory_layers == (1, 3)
    assert config.model.memory.knn == 8
    assert config.model.ffn_kind(1) == "memory" and config.model.ffn_kind(2) == "dense"


def test_ffn_kind():
    config = ModelConfig(dim=16, n_heads=2, n_layers=5, memory_layers=(0, 3), moe_layers=(2,))
    assert [config.ffn_kind(i) for i in range(5)] == ["memory", "dense", "moe", "memory", "dense"]
    peer = ModelConfig(
        dim=16,
        n_heads=2,
        n_layers=3,
        memory_layers=(1,),
        moe_layers=(0,),
        memory=MemoryConfig(variant="peer"),
    )
    assert [peer.ffn_kind(i) for i in range(3)] == ["moe", "peer", "dense"]


@pytest.mark.parametrize(
    ("kwargs", "hidden"),
    [
        ({"dim": 1024, "multiple_of": 256}, 2816),  # int(8 * 1024 / 3) = 2730, rounded up to 2816
        ({"dim": 4096, "multiple_of": 256}, 11008),  # Llama-2 7B
        ({"dim": 4096, "multiple_of": 1024, "ffn_dim_multiplier": 1.3}, 14336),  # Llama-3 8B
        ({"dim": 96, "multiple_of": 1}, 256),  # int(768 / 3) = 256, no rounding
        ({"dim": 100, "multiple_of": 32}, 288),  # int(266.67) = 266 -> 288
        ({"dim": 1024, "ffn_hidden_dim": 1000}, 1000),  # explicit size wins
    ],
)
def test_ffn_hidden_follows_llama_rule(kwargs, hidden):
    config = ModelConfig(n_heads=2, **kwargs)
    assert config.ffn_hidden == hidden


def test_expert_hidden_defaults_to_dense_hidden():
    config = ModelConfig(dim=1024, n_heads=16, moe=MoEConfig(hidden_dim=None))
    assert config.expert_hidden == 2816
    assert ModelConfig(dim=1024, n_heads=16, moe=MoEConfig(hidden_dim=512)).expert_hidden == 512


def test_head_dim_and_kv_heads():
    config = ModelConfig(dim=64, n_heads=8)
    assert config.head_dim == 8 and config.kv_heads == 8
    assert ModelConfig(dim=64, n_heads=8, n_kv_heads=2).kv_heads == 2


# run presets; demo*.yaml hold DemoConfigs and are tested with the demo
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("demo"))


def test_presets_exist():
    names = {path.stem for path in PRESETS}
    assert {"tiny", "paper_373m_dense", "paper_373m_memory", "paper_373m_moe"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_validates(path):
    config = load_config(RunConfig, path)
    assert isinstance(config.model, ModelConfig)
    counts = count_parameters(config.model)
    assert counts.total > 0 and counts.active <= counts.total


def test_tiny_preset_builds_a_model():
    config = load_config(RunConfig, CONFIGS / "tiny.yaml")
    model = Transformer(config.model)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config.model).total


def test_paper_373m_dense_has_373m_parameters():
    model = load_config(RunConfig, CONFIGS / "paper_373m_dense.yaml").model
    total = count_parameters(model).total
    assert 373e6 <= total <= 375e6, total


def test_paper_presets_share_the_base_shape():
    dense = load_config(RunConfig, CONFIGS / "paper_373m_dense.yaml").model
    memory = load_config(RunConfig, CONFIGS / "paper_373m_memory.yaml").model
    moe = load_config(RunConfig, CONFIGS / "paper_373m_moe.yaml").model
    for other in (memory, moe):
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "ffn_hidden"):
            assert getattr(other, name) == getattr(dense, name), name
    assert memory.memory_layers == (4, 12, 20) and memory.memory.n_slots == 1024**2
    assert moe.moe_layers == (4, 12, 20)


PAPER_RECIPES = {"paper_134m_memory": 134e6, "paper_373m_memory": 373e6, "paper_1.3b_memory": 1.3e9, "paper_8b_memory": 8.03e9}


@pytest.mark.parametrize("name,dense_params", PAPER_RECIPES.items())
def test_paper_recipes_follow_the_paper(name, dense_params):
    config = load_config(RunConfig, CONFIGS / f"{name}.yaml")
    model = config.model
    # the base model without memory has the paper's size (within 5%)
    base = count_parameters(dataclasses.replace(model, memory_layers=())).total
    assert abs(base - dense_params) / dense_params < 0.05, base
    # three Memory+ blocks spread through the depth, one shared pool of 1024**2 values, qk-norm
    L = model.n_layers
    assert model.memory_layers == tuple(round(L * (2 * i + 1) / 6) for i in range(3))
    assert model.memory.n_slots == 1024**2 and model.memory.shared_values and model.memory.qk_norm
    assert (model.memory.heads, model.memory.knn, model.memory.k_dim, model.memory.variant) == (4, 32, 512, "plus")
    assert config.optim.value_lr == 1e-3 and config.data.shards is not None
    assert config.data.seq_len == model.max_seq_len
