"""One configuration mechanism: nested dataclasses, YAML presets, dotted overrides.

A config is a tree of dataclasses. It is filled from a plain dict (usually a
YAML file), then dotted ``key=value`` overrides from the command line are
applied, and every dataclass checks its own values in ``__post_init__``.
Unknown keys, wrong types and broken rules all raise :class:`ConfigError`,
whose message names the full dotted key and the rule, e.g.::

    model.memory.k_dim: must be even (it is split into two halves), got 33
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.rule = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.rule)


def first_line(error: BaseException) -> str:
    """What a one-line error quotes of ``error``: its message's first line, or the name of its
    type when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, message)


def check_layers(layers: Sequence[int], key: str, n_layers: int) -> None:
    """Raise ``ConfigError(key, ...)`` unless ``layers`` are distinct indices of a model of ``n_layers``."""
    for index in layers:
        check(0 <= index < n_layers, key, f"layer {index} is outside the model (valid: 0..{n_layers - 1})")
    check(len(set(layers)) == len(layers), key, f"lists a layer twice: {list(layers)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to ``annotation``, or raise a ConfigError."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(key, "must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error.rule)
        raise ConfigError(key, "; ".join(errors))
    if value is None:
        raise ConfigError(key, "must not be null")
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (int, str)) and not isinstance(value, bool) and origin is tuple:
            value = [value] if isinstance(value, int) else _split_list(value, key)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}")
        item_type = (get_args(annotation) or (Any,))[0]
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        key_type, value_type = get_args(annotation) or (Any, Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping of {annotation.__name__} fields, got {value!r}")
        try:
            return from_dict(annotation, value)
        except ConfigError as error:
            raise error.under(key) from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"must be a string, got {value!r}")
    raise ConfigError(key, f"unsupported config type {annotation!r}")


def _split_list(text: str, key: str) -> list[int]:
    """Parse "4,12,20" (the reference code's layer-list syntax) into ints."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(key, f"must be a list of integers, got {text!r}") from None


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; valid keys are {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain nested dict (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML)."""
    data = dict(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(override, "an override must look like key.path=value")
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(path, "empty key in dotted path")
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(keys[: depth + 1]), "is a value, not a section")
            node[key] = child = dict(child)
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[keys[-1]] = raw
    return data


PRESETS = Path(__file__).resolve().parent / "configs"


def presets() -> list[str]:
    """Names of the YAML presets shipped with memlayers."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path as given, or a shipped preset by name (``tiny`` -> configs/tiny.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESETS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and preset.is_file():
        return preset
    raise ConfigError("", f"config file {path} does not exist; pass a YAML file or a preset name ({', '.join(presets())})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one clear error for a missing or malformed file."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError("", f"config file {path} is not valid YAML: {first_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file plus dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))
