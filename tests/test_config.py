"""The config mechanism: dataclasses from dicts, YAML, dotted overrides, clear errors."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from memlayers.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    presets,
    resolve_config_path,
    to_dict,
)
from memlayers.demo.ablations import AblationConfig
from memlayers.demo.claims import ClaimsConfig
from memlayers.demo.continual import ContinualConfig
from memlayers.demo.suite import DemoConfig
from memlayers.train import RunConfig


@dataclass
class Inner:
    size: int = 3
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    layers: tuple[int, ...] = ()
    limit: float | None = None


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_nested_values_are_coerced():
    outer = from_dict(Outer, {"name": "run", "flag": True, "inner": {"size": 4, "rate": "1e-3", "layers": "4,12,20"}})
    assert outer == Outer("run", True, Inner(size=4, rate=1e-3, layers=(4, 12, 20)))
    assert from_dict(Inner, {"layers": [1, 2], "limit": None}).layers == (1, 2)
    assert from_dict(Inner, {"layers": 5}).layers == (5,)
    assert from_dict(Inner, {"rate": 2}).rate == 2.0


@pytest.mark.parametrize(
    "data,key,rule",
    [
        ({"nmae": "x"}, "nmae", "unknown key"),
        ({"inner": {"szie": 1}}, "inner.szie", "unknown key"),
        ({"inner": {"size": "big"}}, "inner.size", "must be an integer"),
        ({"inner": {"size": True}}, "inner.size", "must be an integer"),
        ({"inner": {"size": 2.5}}, "inner.size", "must be an integer"),
        ({"flag": "yes"}, "flag", "true or false"),
        ({"inner": {"mode": "c"}}, "inner.mode", "must be one of ['a', 'b']"),
        ({"inner": {"layers": ["x"]}}, "inner.layers[0]", "must be an integer"),
        ({"inner": {"layers": "1,b"}}, "inner.layers", "list of integers"),
        ({"inner": 3}, "inner", "must be a mapping"),
        ({"inner": {"rate": None}}, "inner.rate", "must not be null"),
        ({"inner": {"limit": "fast"}}, "inner.limit", "must be a number"),
    ],
)
def test_bad_values_name_the_dotted_key(data, key, rule):
    with pytest.raises(ConfigError) as error:
        from_dict(Outer, data)
    assert error.value.key == key
    assert rule in str(error.value)
    assert str(error.value).startswith(key + ":")


def test_dotted_overrides_build_nested_sections():
    # values are parsed as YAML 1.1, which reads 1e-3 as a string; from_dict coerces it
    data = apply_overrides({"model": {"dim": 8}}, ["model.memory.n_keys=16", "model.dim=32", "optim.lr=1e-3", "a.b="])
    assert data == {"model": {"dim": 32, "memory": {"n_keys": 16}}, "optim": {"lr": "1e-3"}, "a": {"b": None}}


@pytest.mark.parametrize("override,key", [("model.dim", "model.dim"), ("model.dim.x=1", "model.dim"), ("model..x=1", "model..x")])
def test_bad_overrides(override, key):
    with pytest.raises(ConfigError) as error:
        apply_overrides({"model": {"dim": 8}}, [override])
    assert error.value.key == key


def test_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(listing)
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  dim: 64\n  n_heads: 4\n  memory_layers: [1]\n")
    config = load_config(RunConfig, good, ["model.memory.knn=8", "optim.value_lr=0.01"])
    assert (config.model.dim, config.model.memory.knn, config.optim.value_lr) == (64, 8, 0.01)
    assert config.model.memory_layers == (1,)


def test_validation_errors_carry_the_full_path(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["model.memory.k_dim=33"])
    assert error.value.key == "model.memory.k_dim" and "even" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["model.memory.knn=64", "model.memory.n_keys=32"])
    assert error.value.key == "model.memory.knn" and "n_keys" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["model.memory.heads=0"])
    assert error.value.key == "model.memory.heads"
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["model.n_layers=4", "model.memory_layers=[1,4]"])
    assert error.value.key == "model.memory_layers" and "outside the model" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, ["optim.value_lr=-1"])
    assert error.value.key == "optim.value_lr"


def test_to_dict_round_trips():
    config = load_config(RunConfig, None, ["model.memory_layers=[0,2]", "model.memory.variant=peer"])
    assert from_dict(RunConfig, to_dict(config)) == config


def _load_preset(name: str) -> RunConfig | DemoConfig | AblationConfig | ClaimsConfig | ContinualConfig:
    """A shipped preset as the one config class it is written for."""
    for cls in (RunConfig, DemoConfig, AblationConfig, ClaimsConfig, ContinualConfig):
        try:
            return load_config(cls, name)
        except ConfigError:
            continue
    pytest.fail(f"preset {name} is none of RunConfig, DemoConfig, AblationConfig, ClaimsConfig, ContinualConfig")


@pytest.mark.parametrize("name", presets())
def test_every_shipped_preset_trains_the_vocabulary_it_counts(name):
    """A run gives its model the vocabulary of the tokenizer it trains (data.vocab_size), so a
    preset that trains one says the same size in model.vocab_size, which `info` counts (token
    shards and a given tokenizer bring theirs)."""
    config = _load_preset(name)
    if isinstance(config, RunConfig):
        brought = config.data.tokenizer is not None or config.data.shards is not None
        assert brought or config.data.vocab_size == config.model.vocab_size
    elif isinstance(config, DemoConfig):  # one top-level vocab_size; the models' is filled in from it
        assert "vocab_size" not in load_yaml(resolve_config_path(name)).get("model", {})
    elif isinstance(config, (ClaimsConfig, ContinualConfig)):  # it names a demo preset, which must load
        assert isinstance(load_config(DemoConfig, config.preset, list(config.demo_overrides)), DemoConfig)
