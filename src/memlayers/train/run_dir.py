"""A run directory belongs to one run: refuse to mix runs, and resume only what was saved.

``train.out_dir`` holds one run: ``config.yaml``, ``metrics.jsonl``,
``tokenizer.json``, the generated fact world ``data/``, ``checkpoints/`` and
``tensorboard/``. The checks here keep that true:

- a new run in a directory that already holds one is refused (pass ``--resume``
  or choose another directory); with ``--overwrite`` the old run is moved aside
  to ``<out_dir>/replaced/<time>/``, never deleted;
- ``--resume`` compares the effective config with the checkpoint's and the data
  and tokenizer files with the fingerprints the checkpoint recorded, and refuses
  any difference (except the keys in :data:`MAY_CHANGE`) with the keys listed;
- checkpoints newer than the one resumed from (a branch abandoned by
  ``--resume-from``) are moved aside to ``<out_dir>/abandoned/``, so that pruning
  by step number never deletes the new branch's checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlayers.config import ConfigError
from memlayers.data.text import file_sha256
from memlayers.model.accounting import count_parameters
from memlayers.model.config import ModelConfig
from memlayers.train.checkpoint_write import STEP_DIR, checkpoint_root

RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "tokenizer.json", "data", "checkpoints", "tensorboard")
"""What a run writes into its directory (what ``overwrite`` moves aside)."""

MAY_CHANGE = (
    "train.out_dir", "train.steps", "train.log_every", "train.eval_every", "train.eval_qa", "train.eval_batches",
    "train.checkpoint_every", "train.keep_last", "train.device", "train.threads", "train.track_usage",
    "train.batch_size", "parallel.", "data.train", "data.heldout", "data.qa", "data.qa.", "data.tokenizer",
)
"""Config keys (or prefixes) a resumed run may change: how long it runs, how it logs and saves,
where and how it is spread. ``train.batch_size`` may change only with the number of ranks,
so that the global batch stays (checked separately). Data and tokenizer files may move: their
contents are compared by fingerprint instead."""


def existing_run(run_dir: Path) -> list[str]:
    """The entries of a previous run found in ``run_dir`` (empty when there is none)."""
    found = []
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_file() and path.stat().st_size > 0 or path.is_dir() and any(path.iterdir()):
            found.append(name)
    return found


def check_fresh(run_dir: Path) -> None:
    """Refuse (ConfigError on ``train.out_dir``) a new run in a directory that holds a previous one."""
    found = existing_run(run_dir)
    if found:
        steps = sorted(int(m.group(1)) for p in checkpoint_root(run_dir).glob("step_*") if (m := STEP_DIR.match(p.name)))
        saved = f" with checkpoints up to step {steps[-1]}" if steps else ""
        raise ConfigError(
            "train.out_dir",
            f"{run_dir} already holds a run{saved} ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to move it aside (to replaced/ inside it), or choose another train.out_dir",
        )


def move_aside(run_dir: Path) -> str | None:
    """Move a previous run's entries in ``run_dir`` to ``replaced/<time>/``; returns a line saying so."""
    if not existing_run(run_dir):
        return None
    aside = run_dir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=False)
    for name in RUN_ENTRIES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    return f"moved the previous run in {run_dir} aside to {aside}"


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Move checkpoints of steps after ``step`` to ``abandoned/`` (a resume from an older one); returns them."""
    newer = [p for p in checkpoint_root(run_dir).glob("step_*") if (m := STEP_DIR.match(p.name)) and int(m.group(1)) > step]
    moved = []
    if newer:
        aside = run_dir / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for path in sorted(newer):
            os.replace(path, aside / path.name)
            moved.append(aside / path.name)
    return moved


def machine_bytes(device: torch.device) -> int:
    """Memory of the device a run trains on: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(model: ModelConfig, batch_size: int, seq_len: int, device: torch.device, shards: int = 1) -> None:
    """Refuse (ConfigError) a run whose model and batch cannot fit in memory, before allocating it.

    A lower bound: fp32 weights, gradients and two AdamW moments (16 bytes per
    parameter, split over the ``shards`` ranks that share one copy of the model),
    rotary tables, and per layer a few activations of the batch plus the logits.
    A run this refuses would fail allocating (or be killed by the OOM killer
    half-way through).
    """
    params = count_parameters(model).total
    tokens = batch_size * seq_len
    need = 16 * params // shards + 16 * model.max_seq_len * model.head_dim
    need += 4 * tokens * (8 * model.dim * model.n_layers + 3 * model.vocab_size)
    have = machine_bytes(device)
    if need > have:
        raise ConfigError(
            "model",
            f"this run needs at least {need / 2**30:,.1f} GiB ({params:,} parameters, batch of {tokens:,} tokens) "
            f"and the {device.type} has {have / 2**30:,.1f} GiB: lower model.dim, model.n_layers, "
            "model.memory.n_keys, model.max_seq_len or train.batch_size, or spread it over more ranks",
        )


def file_fingerprint(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for no file): how a resume knows the data is the same."""
    return None if path is None else file_sha256(path)


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen parameters of ``model`` (``requires_grad`` false; a tied one once),
    in order: each one's name, dtype, shape and bytes. How a resumed retrofit knows its base
    model is the one it was trained on, however it was loaded; it reads every frozen byte
    once (about the time of loading the model) and must run before the model is sharded."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}\n".encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key (checkpoint X, now Y)`` for every config key that differs and may not change on resume."""
    a, b = flatten(saved), flatten(now)
    differ = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            differ.append(f"{key} (checkpoint {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r})")
    return differ


def check_resume(
    checkpoint: Path, saved: dict[str, Any], config: dict[str, Any], fingerprints: dict[str, str | None], world: int
) -> None:
    """Refuse to resume ``checkpoint`` (its ``state.json`` is ``saved``) with another config, data or tokenizer."""
    problems = config_differences(saved.get("config", {}), config)
    saved_world = int(saved.get("world_size", 1))
    batch_now, batch_then = config["train"]["batch_size"] * world, saved["config"]["train"]["batch_size"] * saved_world
    if batch_now != batch_then:
        hint = f": set train.batch_size={batch_then // world}" if batch_then % world == 0 else ""
        problems.append(f"the global batch (checkpoint {batch_then} sequences, now {batch_now}{hint})")
    for name, digest in (saved.get("fingerprints") or {}).items():
        if name in fingerprints and fingerprints[name] != digest:
            what = "the base model's frozen weights differ from those" if name == "base_model" else f"the {name} file differs from the one"
            problems.append(f"{what} the run was trained on")
    if problems:
        raise ConfigError(
            "",
            f"cannot resume from {checkpoint}: {'; '.join(problems)}. Resume with the run's own "
            f"config ({checkpoint.parent.parent / 'config.yaml'}) and data, or start a new run in another train.out_dir",
        )
