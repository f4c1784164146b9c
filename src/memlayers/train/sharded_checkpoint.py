"""Sharded checkpoints: every rank writes its own shards as safetensors through
``torch.distributed.checkpoint`` (its Hugging Face storage: safetensors files
and a JSON index, no pickle), and any number of ranks reads them back.

A sharded checkpoint is a ``step_<N>/`` directory like a single-process one
(:mod:`memlayers.train.checkpoint`), written through the same
:mod:`memlayers.train.checkpoint_write`: ``state.json`` (config, step, data
position, RNG, optimizer hyperparameters and scalar state; ``"sharded": true``),
``tokenizer.json``, and ``shards/`` with the tensors: ``model.<name>`` for
parameters (a ``trained_only`` checkpoint, a retrofit's: only the trained ones)
and ``optim.<name>.<state>`` for optimizer state. Tensors are saved
as DTensors, so loading re-shards them to whatever mesh the loading job has:
resume with the same number of ranks, another number, or one process
(:func:`load_sharded` with ``no_dist``); :func:`export_checkpoint` writes the
single-process format.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate

from memlayers.config import first_line
from memlayers.distributed.comm import barrier
from memlayers.faults import fault_point
from memlayers.train import checkpoint_write
from memlayers.train.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    check_files,
    earlier_advice,
    load_checkpoint,
    model_state,
    read_state,
    resolve_checkpoint,
    restore_optimizer_state,
    save_checkpoint,
    split_optimizer_state,
)

SHARDS = "shards"


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return list(getattr(optimizer, "optimizers", [optimizer]))


def init_optimizer_state(optimizer) -> None:
    """Create every optimizer state tensor now (zeros), so that a checkpoint can be loaded into them."""
    for child in _optimizers(optimizer):
        for group in child.param_groups:
            for p in group["params"]:
                if child.state.get(p):
                    continue
                if hasattr(child, "init_state"):  # the row-sparse optimizers
                    child.init_state(p)
                else:  # torch's Adam/AdamW
                    child.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }


def _as_saved(param: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A state tensor as it is saved: a DTensor laid out like its parameter, in a float dtype.

    Row-sparse optimizers keep plain local tensors for a sharded table: the
    moments are that rank's columns (placed like the table), per-row counters
    are the same on every rank (replicated). Integer counters are stored as
    float32 (exact up to 2**24 steps).
    """
    if not state.is_floating_point():
        state = state.float()
    if isinstance(state, DTensor) or not isinstance(param, DTensor):
        return state
    if state.shape == param.to_local().shape:
        return DTensor.from_local(state, param.device_mesh, param.placements, run_check=False)
    return DTensor.from_local(state, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)


def _flat_state(
    model: nn.Module, optimizer, trained_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[tuple]]:
    """Tensors to save or load into, JSON metadata, and (saved, live) pairs to copy back after a load."""
    for module in model.modules():  # a forward without backward (evaluation) leaves FSDP's root unsharded
        if isinstance(module, FSDPModule):
            module.reshard()
    tensors = {f"model.{name}": t for name, t in model_state(model, trained_only).items()}
    if optimizer is None:
        return tensors, {"param_groups": [], "scalars": {}}, []
    entries, meta = split_optimizer_state(model, optimizer)
    copy_back = []
    for param, key, value in entries:
        saved = _as_saved(param, value)
        tensors["optim." + key.replace("::", ".")] = saved
        if saved is not value:
            copy_back.append((saved, value))
    return tensors, meta, copy_back


def dcp_cause(error: BaseException) -> str:
    """One line saying what failed in a DCP call: for a ``CheckpointException`` (which gathers
    every rank's failure), the first failing rank and its exception; else the error's first line."""
    if isinstance(error, CheckpointException) and error.failures:
        rank = min(error.failures)
        cause = error.failures[rank][0]
        return f"rank {rank}: {type(cause).__name__}: {first_line(cause)}"
    return first_line(error)


def raise_interrupt(error: BaseException) -> None:
    """Re-raise a Ctrl-C or SIGTERM (``KeyboardInterrupt``) that DCP caught on this rank and
    wrapped into a ``CheckpointException``, so that the command ends as interrupted."""
    if isinstance(error, CheckpointException):
        for cause, _ in error.failures.values():
            if isinstance(cause, KeyboardInterrupt):
                raise cause from None


def save_sharded(
    run_dir: str | Path, step: int, model: nn.Module, optimizer, state: dict[str, Any],
    tokenizer_path: str | Path | None = None, keep_last: int | None = None, trained_only: bool = False,
) -> Path:
    """Every rank writes its shards of ``step_<step>``; rank 0 adds the JSON and commits it
    (:mod:`.checkpoint_write`: fsync, atomic rename, then pruning). ``trained_only`` leaves
    the frozen parameters out."""
    rank = dist.get_rank()
    if rank == 0:
        checkpoint_write.begin(run_dir, step)
    barrier()
    staging = checkpoint_write.staging_dir(run_dir, step)
    tensors, meta, _ = _flat_state(model, optimizer, trained_only)
    fault_point("checkpoint.shards", step)  # a rank lost here leaves the others inside DCP's collectives
    try:
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(staging / SHARDS), save_distributed=True))
    except CheckpointException as error:  # a BaseException: no except Exception would see it
        raise_interrupt(error)
        raise CheckpointError(f"the shards of checkpoint step {step} could not be written ({dcp_cause(error)}); "
                              "the newest complete checkpoint is kept: fix the cause and restart with --resume") from None
    checkpoint_write.written(staging, SHARDS, step)
    barrier()
    if rank == 0:
        info = {"format": FORMAT, "version": VERSION, "sharded": True, "world_size": dist.get_world_size(),
                "step": step, "optimizer": meta, **state}
        if trained_only:
            info["trained_only"] = True
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
            checkpoint_write.written(staging, "tokenizer.json", step)
        info["files"] = checkpoint_write.manifest(staging)
        checkpoint_write.write_state(staging, info, step)
        checkpoint_write.commit(staging, step, keep_last)
    barrier()
    return checkpoint_write.step_dir(run_dir, step)


def load_sharded(path: str | Path, model: nn.Module, optimizer=None, no_dist: bool = False) -> None:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``), re-sharding to their layout.

    ``no_dist``: in one process without a process group (plain tensors).
    """
    path = resolve_checkpoint(path)
    state = read_state(path)
    if not state.get("sharded"):
        raise CheckpointError(f"{path} is a single-process checkpoint; load it with memlayers.train.checkpoint")
    check_files(path, state)
    if optimizer is not None:
        init_optimizer_state(optimizer)
    tensors, _, copy_back = _flat_state(model, optimizer, bool(state.get("trained_only")))
    try:
        with warnings.catch_warnings():
            if no_dist:  # DCP warns that it assumes one process: what no_dist asked for
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)), no_dist=no_dist)
    except ValueError as error:  # DCP's size check: the checkpoint's tensors have other shapes
        raise CheckpointError(f"checkpoint {path} does not fit this model ({first_line(error)}); check the config") from None
    except (RuntimeError, KeyError, OSError, CheckpointException) as error:  # CheckpointException is a BaseException
        raise_interrupt(error)
        raise CheckpointError(f"sharded checkpoint {path} could not be read ({dcp_cause(error)}); {earlier_advice(path)}") from None
    for saved, live in copy_back:
        live.copy_(saved.to_local() if isinstance(saved, DTensor) else saved)
    if optimizer is not None:
        restore_optimizer_state(model, optimizer, state["optimizer"])


def _model_and_optimizer(path: Path, state: dict[str, Any]):
    """The model and optimizer a checkpoint's config describes, built in this process."""
    if state.get("trained_only"):
        raise CheckpointError(f"{path} is a retrofit's checkpoint: it holds only the memory, not its base model, so it "
                              "cannot be converted; resume the retrofit (under torchrun or in one process) instead")
    from memlayers.config import from_dict
    from memlayers.model.transformer import Transformer
    from memlayers.train.config import RunConfig
    from memlayers.train.optim import build_optimizer, uses_row_grads

    config = from_dict(RunConfig, state["config"])
    model = Transformer(config.model)
    if uses_row_grads(config.optim):
        for layer in model.memory_layers():
            layer.table_grad = "rows"
    return model, build_optimizer(model, config.optim)


def _run_state(state: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``state.json`` that describe the run (not the file format)."""
    return {k: v for k, v in state.items() if k not in ("format", "version", "sharded", "world_size", "step", "optimizer", "tied", "files", "checksum")}


def export_checkpoint(checkpoint: str | Path, run_dir: str | Path) -> Path:
    """Write a sharded checkpoint as a single-process one (weights and optimizer state, safetensors)
    in ``run_dir/checkpoints/``; one process, no process group needed."""
    path = resolve_checkpoint(checkpoint)
    state = read_state(path)
    if not state.get("sharded"):
        raise CheckpointError(f"{path} is already a single-process checkpoint")
    model, optimizer = _model_and_optimizer(path, state)
    load_sharded(path, model, optimizer, no_dist=True)
    tokenizer = path / "tokenizer.json"
    return save_checkpoint(run_dir, int(state["step"]), model, optimizer, _run_state(state),
                           tokenizer_path=tokenizer if tokenizer.is_file() else None)


def shard_checkpoint(checkpoint: str | Path, run_dir: str | Path) -> Path:
    """Write a single-process checkpoint as a sharded one in ``run_dir/checkpoints/``, so that a
    torchrun job (any number of ranks) resumes from it; runs in one process."""
    path = resolve_checkpoint(checkpoint)
    state = read_state(path)
    if state.get("sharded"):
        raise CheckpointError(f"{path} is already a sharded checkpoint")
    model, optimizer = _model_and_optimizer(path, state)
    load_checkpoint(path, model, optimizer)
    init_optimizer_state(optimizer)  # parameters the run never stepped still get (zero) state
    started = not dist.is_initialized()
    if started:  # a one-rank group: the shards are whole tensors, which any mesh can load
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tokenizer = path / "tokenizer.json"
        return save_sharded(run_dir, int(state["step"]), model, optimizer, _run_state(state),
                            tokenizer_path=tokenizer if tokenizer.is_file() else None)
    finally:
        if started:
            dist.destroy_process_group()
