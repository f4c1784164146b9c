"""Memory patches: what sparse or value finetuning changed, as rows you can ship, apply and undo.

A patch holds, per value table, the ids of the rows that changed with their
contents before and after (``old`` and ``new``), and a fingerprint of each
table it was made on. Applying it writes the ``new`` rows; reverting writes the
``old`` ones back, so the base returns bit for bit without its checkpoint. Its
size is rows changed x row bytes x 2, far below the model's.

On disk a patch is ``patch.safetensors`` (``<table>/rows``, ``<table>/old``,
``<table>/new``) and ``patch.json`` (format, base fingerprints, row counts,
bytes, and whatever the method that made it records: method, top_t, data
file and hash, steps).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memlayers.continual.sparse import value_tables
from memlayers.data.text import write_text_atomic

FORMAT = "memlayers.patch/1"
MERGE_POLICIES = ("error", "first", "second", "add")


class PatchError(ValueError):
    """A patch that cannot be used: unreadable, for another base model, or in conflict."""


def table_fingerprint(table: torch.Tensor) -> str:
    """sha256 of a table's shape, dtype and bytes: which base a patch belongs to."""
    data = table.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@dataclass
class MemoryPatch:
    """Changed rows per value table: ``rows`` ``(R,)`` int64 ascending, ``old`` and ``new`` ``(R, d)``."""

    rows: dict[str, torch.Tensor]
    old: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]
    base: dict[str, str]
    """Fingerprint of each table the patch was made on (:func:`table_fingerprint`)."""
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def between(cls, before: dict[str, torch.Tensor], model: nn.Module, info: dict[str, Any] | None = None) -> MemoryPatch:
        """The patch from tables ``before`` (copies taken before learning) to ``model``'s tables now."""
        tables = value_tables(model)
        rows, old, new = {}, {}, {}
        for name, table in tables.items():
            changed = (table.detach() != before[name]).any(1).nonzero().squeeze(1)  # (R,) ascending
            rows[name] = changed.cpu()
            old[name] = before[name][changed].cpu()
            new[name] = table.detach()[changed].cpu()
        return cls(rows, old, new, {name: table_fingerprint(t) for name, t in before.items()}, dict(info or {}))

    @property
    def n_rows(self) -> int:
        """Rows changed, over all tables."""
        return sum(r.numel() for r in self.rows.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the patch's tensors (what ``patch.safetensors`` holds, less its header)."""
        return sum(t.numel() * t.element_size() for part in (self.rows, self.old, self.new) for t in part.values())

    def _tables(self, model: nn.Module) -> dict[str, nn.Parameter]:
        tables = value_tables(model)
        if set(tables) != set(self.rows):
            raise PatchError(f"this patch changes value tables {sorted(self.rows)}, the model has {sorted(tables)}; "
                             "apply it to the model it was made on")
        for name, table in tables.items():
            if tuple(table.shape[1:]) != tuple(self.new[name].shape[1:]) or table.dtype != self.new[name].dtype:
                raise PatchError(f"table {name} is {tuple(table.shape)} {table.dtype}, the patch's rows are "
                                 f"{tuple(self.new[name].shape[1:])} {self.new[name].dtype}; apply it to the model it was made on")
        return tables

    def apply(self, model: nn.Module) -> None:
        """Write the patch's rows into ``model`` (in place), after checking it is the patch's base."""
        tables = self._tables(model)
        for name, table in tables.items():
            if table_fingerprint(table) != self.base[name]:
                raise PatchError(f"this patch was made on another base model (table {name} differs from the one "
                                 "it was made on); apply it to that model, or revert the patches applied since")
        with torch.no_grad():
            for name, table in tables.items():
                table[self.rows[name].to(table.device)] = self.new[name].to(table.device)

    def revert(self, model: nn.Module) -> None:
        """Restore the rows this patch changed (bit for bit), after checking it is applied."""
        tables = self._tables(model)
        for name, table in tables.items():
            if not torch.equal(table.detach()[self.rows[name].to(table.device)].cpu(), self.new[name]):
                raise PatchError(f"this patch is not applied to the model (table {name}'s rows differ from its "
                                 "new contents); nothing was reverted")
        with torch.no_grad():
            for name, table in tables.items():
                table[self.rows[name].to(table.device)] = self.old[name].to(table.device)

    def save(self, directory: str | Path) -> Path:
        """Write ``patch.safetensors`` and ``patch.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}/{part}": getattr(self, part)[name].contiguous() for name in self.rows
                   for part in ("rows", "old", "new")}
        tmp = directory / ".patch.safetensors.tmp"
        save_file(tensors, tmp)
        tmp.replace(directory / "patch.safetensors")
        meta = {"format": FORMAT, "base": self.base, "rows_changed": {n: r.numel() for n, r in self.rows.items()},
                "bytes": self.nbytes, **self.info}
        write_text_atomic(directory / "patch.json", json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MemoryPatch:
        """Read a patch directory; :class:`PatchError` naming what is wrong otherwise."""
        directory = Path(directory)
        for name in ("patch.json", "patch.safetensors"):
            if not (directory / name).is_file():
                raise PatchError(f"{directory} is not a memory patch: {name} is missing")
        try:
            meta = json.loads((directory / "patch.json").read_text())
            tensors = load_file(directory / "patch.safetensors")
        except (SafetensorError, OSError, ValueError) as error:
            raise PatchError(f"patch {directory} is unreadable ({str(error).splitlines()[0]}); make it again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise PatchError(f"{directory}/patch.json is not a memlayers patch (format {FORMAT!r} expected)")
        names = set(meta.get("base", {}))
        try:
            parts = {part: {n: tensors[f"{n}/{part}"] for n in names} for part in ("rows", "old", "new")}
        except KeyError as missing:
            raise PatchError(f"patch {directory} is incomplete: {missing} is missing; make it again") from None
        for n in names:
            if not parts["rows"][n].numel() == parts["old"][n].shape[0] == parts["new"][n].shape[0]:
                raise PatchError(f"patch {directory} is inconsistent: table {n}'s rows and contents differ in length")
        info = {k: v for k, v in meta.items() if k not in ("format", "base", "rows_changed", "bytes")}
        return cls(parts["rows"], parts["old"], parts["new"], dict(meta["base"]), info)


@contextlib.contextmanager
def patched(model: nn.Module, patch: MemoryPatch) -> Iterator[nn.Module]:
    """Apply ``patch`` to ``model`` for the ``with`` block; the base is restored on exit."""
    patch.apply(model)
    try:
        yield model
    finally:
        patch.revert(model)


def merge(first: MemoryPatch, second: MemoryPatch, policy: str = "error") -> MemoryPatch:
    """One patch with the changes of both (made on the same base).

    Rows both changed conflict; ``policy`` decides: ``error`` (refuse, naming them),
    ``first`` or ``second`` (that patch's contents win), or ``add`` (both changes,
    ``old + (new1 - old) + (new2 - old)``, as two finetunings of one base add).
    """
    if policy not in MERGE_POLICIES:
        raise PatchError(f"merge policy {policy!r} is not one of {', '.join(MERGE_POLICIES)}")
    if first.base != second.base:
        raise PatchError("these patches were made on different base models; merge patches of one base")
    rows, old, new = {}, {}, {}
    for name in first.rows:
        a, b = first.rows[name], second.rows[name]
        both = a[torch.isin(a, b)]
        if both.numel() and policy == "error":
            shown = ", ".join(str(r) for r in both[:10].tolist()) + (" ..." if both.numel() > 10 else "")
            raise PatchError(f"{both.numel()} rows of table {name} are changed by both patches ({shown}); "
                             "choose a policy: first, second or add")
        union = torch.unique(torch.cat([a, b]))  # (R,) ascending
        has_a, has_b = torch.isin(union, a), torch.isin(union, b)  # (R,) each
        in_a, in_b = torch.searchsorted(a, union), torch.searchsorted(b, union)  # positions where present
        dim, dtype = first.new[name].shape[1], first.new[name].dtype
        o = torch.empty(union.numel(), dim, dtype=dtype)
        n = torch.empty(union.numel(), dim, dtype=dtype)
        o[has_a], n[has_a] = first.old[name][in_a[has_a]], first.new[name][in_a[has_a]]
        only_b = has_b & ~has_a
        o[only_b], n[only_b] = second.old[name][in_b[only_b]], second.new[name][in_b[only_b]]
        conflict = has_a & has_b
        if policy == "second":
            n[conflict] = second.new[name][in_b[conflict]]
        elif policy == "add":
            n[conflict] = n[conflict] + second.new[name][in_b[conflict]] - o[conflict]
        rows[name], old[name], new[name] = union, o, n
    info = {"merged": [first.info, second.info], "policy": policy}
    return MemoryPatch(rows, old, new, dict(first.base), info)
