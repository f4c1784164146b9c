"""One way to put a checkpoint directory on disk, for single-process and sharded checkpoints.

A checkpoint ``<run>/checkpoints/step_<N>/`` is written like this:

1. :func:`begin`: a hidden staging directory ``.tmp_step_<N>`` is made (a stale
   one from a crashed writer is removed first);
2. the writers fill it (one process, or every rank of a torchrun job);
3. :func:`commit`: every file and the staging directory are fsynced, the staging
   directory is renamed to ``step_<N>`` (atomic), the parent is fsynced, and
   only then are older checkpoints pruned to ``keep_last``.

So at any instant ``step_<N>`` is either absent or complete, and a crash costs
at most the checkpoint being written. A directory is never deleted under its
final name: it is renamed to a hidden name first, so a crash while deleting
leaves no half-deleted ``step_<N>`` that looks complete. Re-writing an existing
step sets the old copy aside as ``.old_step_<N>`` and :func:`recover` puts it
back if a crash came before the new one was in place. Leftovers of crashed
writers are cleaned (or restored) by :func:`recover`, which the trainer calls
when a run starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from memlayers.data.text import file_sha256
from memlayers.faults import fault_point

STEP_DIR = re.compile(r"^step_(\d+)$")
STAGING, OLD, PRUNED = ".tmp_", ".old_", ".pruned_"


def checkpoint_root(run_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step_<step>`` (zero-padded, so names sort like steps)."""
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (hidden staging or set-aside directories ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """The hidden directory checkpoint ``step`` is written into before it is committed."""
    return _hidden(step_dir(run_dir, step), STAGING)


def damaged_checkpoints(run_dir: str | Path) -> list[Path]:
    """``step_<N>`` directories without ``state.json``, oldest first: a commit never leaves
    one, so something removed it after the checkpoint was written."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and not (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def begin(run_dir: str | Path, step: int) -> Path:
    """An empty staging directory for checkpoint ``step`` (a leftover one is removed first)."""
    staging = staging_dir(run_dir, step)
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    fault_point("checkpoint.begin", step)
    return staging


def written(staging: Path, name: str, step: int) -> None:
    """Mark that file ``name`` of the staging directory is complete (a fault point per file)."""
    fault_point(f"checkpoint.write.{name}", step)


def manifest(staging: Path) -> dict[str, list]:
    """``{relative path: [bytes, sha256]}`` of every file written so far, for ``state.json``:
    a load then tells a truncated or corrupted file from a good one."""
    return {
        str(path.relative_to(staging)): [path.stat().st_size, file_sha256(path)]
        for path in sorted(staging.rglob("*"))
        if path.is_file()
    }


def write_state(staging: Path, state: dict[str, Any], step: int) -> None:
    """Write ``state.json`` with a checksum of its own contents, so that a damaged one is refused."""
    state = {k: v for k, v in state.items() if k != "checksum"}
    body = json.dumps(state, sort_keys=True)
    state = {**state, "checksum": hashlib.sha256(body.encode()).hexdigest()}
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    written(staging, "state.json", step)


def state_intact(state: dict[str, Any]) -> bool:
    """Whether ``state.json``'s contents match the checksum written with them (True without one)."""
    state = dict(state)
    checksum = state.pop("checksum", None)
    return checksum is None or hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest() == checksum


def verify(path: Path, files: dict[str, list]) -> str | None:
    """What is wrong with the files of checkpoint ``path`` against its manifest (None: nothing)."""
    for name, (size, digest) in files.items():
        file = path / name
        if not file.is_file():
            return f"file {file} is missing"
        if file.stat().st_size != size:
            return f"file {file} is truncated or overwritten ({file.stat().st_size} bytes, {size} written)"
        if file_sha256(file) != digest:
            return f"file {file} is corrupt (its checksum differs from the one written)"
    return None


def commit(staging: Path, step: int, keep_last: int | None = None) -> Path:
    """fsync the staging directory, rename it to ``step_<step>``, fsync the parent, then prune."""
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            _fsync(path)
    for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        _fsync(directory)
    _fsync(staging)
    final = staging.parent / staging.name[len(STAGING):]
    fault_point("checkpoint.rename", step)
    if final.exists():  # re-writing a step: the old copy stays until the new one is in place
        old = _hidden(final, OLD)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(staging, final)
        except BaseException:  # put the old copy back now (recover() would do it at the next start)
            os.replace(old, final)
            raise
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
        _fsync(final.parent)
    fault_point("checkpoint.renamed", step)
    if keep_last is not None:
        prune(final.parent.parent, keep_last, step)
    return final


def prune(run_dir: str | Path, keep_last: int, step: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the newest one)."""
    for stale in list_checkpoints(run_dir)[: -max(keep_last, 1)]:
        hidden = _hidden(stale, PRUNED)
        os.replace(stale, hidden)
        fault_point("checkpoint.prune", step)
        shutil.rmtree(hidden, ignore_errors=True)
    _fsync(checkpoint_root(run_dir))


def recover(run_dir: str | Path) -> list[str]:
    """Clean up after crashed writers; returns what was done, one line each.

    Staging and pruned directories are removed. A set-aside ``.old_step_<N>``
    is put back when ``step_<N>`` is missing (the crash came between the two
    renames of a re-write) and removed otherwise. Call it only when no other
    process writes checkpoints of this run.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.iterdir()):
        if path.name.startswith((STAGING, PRUNED)):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name} (left by an interrupted checkpoint write)")
        elif path.name.startswith(OLD):
            final = root / path.name[len(OLD):]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path.name} (an old copy of {final.name})")
            else:
                os.replace(path, final)
                done.append(f"restored {final.name} (a re-write of it was interrupted)")
    if done:
        _fsync(root)
    return done


def _hidden(path: Path, prefix: str) -> Path:
    return path.with_name(prefix + path.name)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
