"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding

    model.safetensors      the model's state dict (a tied tensor stored once)
    optimizer.safetensors  optimizer state tensors, keyed by parameter name
    state.json             format tag, step, run config, optimizer hyperparameters
                           and scalar state, RNG states, data position, metrics
    tokenizer.json         (when the run has one) so the checkpoint stands alone

It is first written to a hidden temporary directory beside the final one and
then renamed into place, so a crash mid-write leaves the previous checkpoint
as it was and no half-written ``step_<N>``. Nothing is pickled.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "memlayers-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read back (tensors already in the model/optimizer)."""

    path: Path
    step: int
    state: dict[str, Any]


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier key (tied weights); return them as key -> kept key."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        kept[key] = tensor.detach().contiguous().cpu()
    return kept, aliases


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states as JSON-safe values."""
    state = {
        "python": _encode(random.getstate()),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(_decode(state["python"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _encode(value: Any) -> Any:
    """Tuples to lists, recursively (Python's RNG state is nested tuples)."""
    return [_encode(v) for v in value] if isinstance(value, (tuple, list)) else value


def _decode(value: Any) -> Any:
    return tuple(_decode(v) for v in value) if isinstance(value, list) else value


def split_optimizer_state(model: nn.Module, optimizer) -> tuple[list[tuple[nn.Parameter, str, torch.Tensor]], dict]:
    """An optimizer's state as ``(param, "name::key", tensor)`` entries for its tensors, and JSON
    (groups with parameter names, scalar state such as Adam's ``step``) for the rest."""
    names = {id(p): n for n, p in model.named_parameters()}
    entries: list[tuple[nn.Parameter, str, torch.Tensor]] = []
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    state = optimizer.state  # a ChainedOptimizer merges its children's on every access
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[id(p)] for p in group["params"]]})
        for param in group["params"]:
            for key, value in state.get(param, {}).items():
                name = names[id(param)]
                if torch.is_tensor(value) and value.dim() > 0:
                    entries.append((param, f"{name}::{key}", value))
                else:
                    scalars.setdefault(name, {})[key] = value.item() if torch.is_tensor(value) else value
    return entries, {"param_groups": groups, "scalars": scalars}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state split into named tensors and JSON (groups, scalar state)."""
    entries, meta = split_optimizer_state(model, optimizer)
    return {key: value.detach().contiguous().cpu() for _, key, value in entries}, meta


def restore_optimizer_state(
    model: nn.Module, optimizer, meta: dict, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Put state saved by :func:`split_optimizer_state` back: hyperparameters and scalar state,
    and, with ``tensors`` (``{"name::key": tensor}``), every state tensor in place of the old."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    saved_groups = meta["param_groups"]
    if [g["params"] for g in saved_groups] != [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise CheckpointError("optimizer state does not match the model's parameter groups; start a new run or fix the config")
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    # a ChainedOptimizer's state lives in its children: put each parameter's state in its owner's
    children = getattr(optimizer, "optimizers", [optimizer])
    owner = {id(p): child.state for child in children for g in child.param_groups for p in g["params"]}
    if tensors is not None:
        for child in children:
            child.state.clear()
        for key, tensor in tensors.items():
            name, field = key.split("::", 1)
            param = params[name]
            owner[id(param)].setdefault(param, {})[field] = tensor.to(param.device)
    for name, values in meta["scalars"].items():
        param = params[name]
        for field, value in values.items():
            # torch's Adam keeps `step` as a 0-d float tensor
            owner[id(param)].setdefault(param, {})[field] = torch.tensor(value, dtype=torch.float32)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically; prune to ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_tensors, aliases = _unique_tensors(model.state_dict())
    save_file(model_tensors, tmp / "model.safetensors", metadata={"format": FORMAT})
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": step, "tied": aliases, **state}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_state(model, optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={"format": FORMAT})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # re-writing a step: move the old copy aside, put it back if the swap fails
        old = _set_aside(final)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep_last is not None:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(_set_aside(stale), ignore_errors=True)
    return final


def _set_aside(path: Path) -> Path:
    """Rename a checkpoint directory to a hidden name (atomic), so that a crash
    while deleting it never leaves a half-deleted ``step_<N>`` that looks complete."""
    hidden = path.with_name(f".old_{path.name}_{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    return hidden


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, or from a run directory (its latest)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"no checkpoint at {path}: expected a step_<N> directory with state.json, or a run directory containing checkpoints/")


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint, checked for format and version."""
    path = resolve_checkpoint(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: state.json is unreadable ({error}); use an earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a memlayers checkpoint (state.json has no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}; this memlayers reads version {VERSION}")
    return state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing; use an earlier checkpoint")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {file} is corrupt ({str(error).splitlines()[0]}); use an earlier checkpoint") from None


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model``, strictly."""
    path = resolve_checkpoint(path)
    state = read_state(path)
    if state.get("sharded"):
        raise CheckpointError(
            f"{path} is a sharded checkpoint (written by a torchrun run): resume it under torchrun, "
            f"or write a single-process copy with `memlayers consolidate {path} --out DIR`"
        )
    tensors = _load_tensors(path / "model.safetensors")
    for alias, kept in state.get("tied", {}).items():
        if kept in tensors:
            tensors[alias] = tensors[kept]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"checkpoint {path} does not fit this model ({detail}); check the config")
    model.load_state_dict(tensors)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Checkpoint:
    """Load weights (and optimizer state) from a checkpoint or a run's latest."""
    path = resolve_checkpoint(path)
    state = read_state(path)
    load_model_weights(path, model)
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {path} has no optimizer state; it cannot resume training")
        restore_optimizer_state(model, optimizer, state["optimizer"], _load_tensors(path / "optimizer.safetensors"))
    return Checkpoint(path=path, step=int(state["step"]), state=state)
