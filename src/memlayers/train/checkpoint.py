"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding

    model.safetensors      the model's state dict (a tied tensor stored once); with
                           ``"trained_only": true`` in state.json (a retrofit) without
                           the frozen parameters, which the run's ``base_model``
                           fingerprint names instead
    optimizer.safetensors  optimizer state tensors, keyed by parameter name
    state.json             format tag, step, run config, optimizer hyperparameters
                           and scalar state, RNG states, data position, metrics
    tokenizer.json         (when the run has one) so the checkpoint stands alone

It is written through :mod:`memlayers.train.checkpoint_write` (staging
directory, fsync, atomic rename, then pruning), so a crash mid-write leaves
the previous checkpoints as they were and no half-written ``step_<N>``.
Nothing is pickled.
"""

from __future__ import annotations

import base64
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memlayers.config import first_line
from memlayers.train import checkpoint_write
from memlayers.train.checkpoint_write import list_checkpoints

FORMAT = "memlayers-checkpoint"
VERSION = 1


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


def model_state(model: nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; with ``trained_only`` without the frozen parameters
    (``requires_grad`` false, every name of a tied one), buffers kept."""
    state = model.state_dict()
    if not trained_only:
        return state
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {key: tensor for key, tensor in state.items() if key not in frozen}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    keep_last: int | None = None,
    trained_only: bool = False,
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically (:mod:`.checkpoint_write`); prune to ``keep_last``.
    ``trained_only`` leaves the frozen parameters out (:func:`model_state`)."""
    staging = checkpoint_write.begin(run_dir, step)
    model_tensors, aliases = _unique_tensors(model_state(model, trained_only))
    save_file(model_tensors, staging / "model.safetensors", metadata={"format": FORMAT})
    checkpoint_write.written(staging, "model.safetensors", step)
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": step, "tied": aliases, **state}
    if trained_only:
        meta["trained_only"] = True
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_state(model, optimizer)
        save_file(opt_tensors, staging / "optimizer.safetensors", metadata={"format": FORMAT})
        checkpoint_write.written(staging, "optimizer.safetensors", step)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
        checkpoint_write.written(staging, "tokenizer.json", step)
    meta["files"] = checkpoint_write.manifest(staging)
    checkpoint_write.write_state(staging, meta, step)
    return checkpoint_write.commit(staging, step, keep_last)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, or from a run directory (its latest)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if checkpoint_write.STEP_DIR.match(path.name) and path.is_dir():
        raise CheckpointError(f"checkpoint {path} is damaged: its state.json is missing; {earlier_advice(path)}")
    found = list_checkpoints(path)
    damaged = checkpoint_write.damaged_checkpoints(path)
    if damaged and (not found or damaged[-1].name > found[-1].name):
        raise CheckpointError(f"checkpoint {damaged[-1]} is damaged: its state.json is missing; {earlier_advice(damaged[-1])}")
    if found:
        return found[-1]
    raise CheckpointError(f"no checkpoint at {path}: expected a step_<N> directory with state.json, or a run directory containing checkpoints/")


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint, checked for format and version."""
    path = resolve_checkpoint(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"checkpoint {path}: state.json is unreadable ({first_line(error)}); {earlier_advice(path)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a memlayers checkpoint (state.json has no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}; this memlayers reads version {VERSION}")
    if not checkpoint_write.state_intact(state):
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt (its checksum differs); {earlier_advice(path)}")
    return state


def earlier_advice(path: Path) -> str:
    """What to do when checkpoint ``path`` cannot be used: name the complete one before it."""
    earlier = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    if earlier:
        return f"resume from the one before it with --resume-from {earlier[-1]}"
    return "no earlier checkpoint of this run exists; start a new run"


def check_files(path: Path, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose files differ from what was written (missing, truncated, corrupt)."""
    problem = checkpoint_write.verify(path, state.get("files", {}))
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}; {earlier_advice(path)}")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing; {earlier_advice(file.parent)}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {file} is corrupt ({first_line(error)}); {earlier_advice(file.parent)}") from None


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def mmap_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of the file mapped into memory (private,
    read on demand: a page is read from disk when first touched, and never written back)."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing; {earlier_advice(file.parent)}")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len <= size - 8 else None
    except (OSError, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint file {file} is corrupt (no safetensors header); {earlier_advice(file.parent)}")
    storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, (start, end) = SAFETENSORS_DTYPES.get(info.get("dtype")), info.get("data_offsets", (0, -1))
        offset, shape = 8 + header_len + start, tuple(info.get("shape", ()))
        element = dtype.itemsize if dtype is not None else 1
        if dtype is None or offset % element or end - start != math.prod(shape) * element or 8 + header_len + end > size:
            raise CheckpointError(f"checkpoint file {file} has a tensor {name} that cannot be mapped "
                                  f"({info}); load it without memory mapping")
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // element, shape,
                                                          torch.empty(shape, device="meta").stride())
    return tensors


def load_model_weights(path: str | Path, model: nn.Module, mmap: bool = False) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model``, strictly (a ``trained_only``
    checkpoint: every parameter but the frozen ones). With ``mmap`` the tensors stay views of
    the mapped file and replace the model's own (``model`` may be on the meta device: nothing
    is allocated for it)."""
    path = resolve_checkpoint(path)
    state = read_state(path)
    if state.get("sharded"):
        raise CheckpointError(
            f"{path} is a sharded checkpoint (written by a torchrun run): resume it under torchrun, "
            f"or write a single-process copy with `memlayers consolidate {path} --out DIR`"
        )
    check_files(path, state)
    tensors = mmap_tensors(path / "model.safetensors") if mmap else _load_tensors(path / "model.safetensors")
    for alias, kept in state.get("tied", {}).items():
        if kept in tensors:
            tensors[alias] = tensors[kept]
    trained_only = bool(state.get("trained_only"))
    expected = model_state(model, trained_only)
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
    model.load_state_dict(tensors, strict=not trained_only, assign=mmap)  # checked above


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
