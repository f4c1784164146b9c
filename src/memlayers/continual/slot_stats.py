"""Slot statistics: how often each memory slot is read, and in how many batches.

Sparse memory finetuning (Lin et al., *Continual Learning via Sparse Memory
Finetuning*, arXiv 2510.15103) ranks the slots a batch of new data reads by
TF-IDF: the slot's reads in that batch (term frequency) against how many of B
background batches read it at all (document frequency). The same counts tell
whether a memory is used well (dead slots, skew), so one pass over background
data serves both.

Counts are kept per memory layer and head (``reads``) and, for the document
frequency, per value table (``batches``): layers that share one pool share its
rows, so a row is "in" a batch when any of them read it. Every count is an
integer sum over batches, so statistics of two data sets add
(:meth:`SlotStats.add`) and memory stays O(slots) whatever the data size.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from memlayers.data.text import DataError, replace_atomic
from memlayers.memory.layer import MemoryLayer

FORMAT = "memlayers.slot_stats/1"


class SlotStatsError(ValueError):
    """A slot statistics file that cannot be used (missing, corrupt, or for another model)."""


@dataclass
class SlotStats:
    """Read counts of every memory layer's slots over ``n_batches`` batches of ``n_tokens`` tokens."""

    reads: dict[str, torch.Tensor]
    """Per memory layer (module name): ``(heads, n_slots)`` int64, reads of each slot by each head."""
    batches: dict[str, torch.Tensor]
    """Per value table (parameter name): ``(n_slots,)`` int64, batches in which any layer read the row."""
    tables: dict[str, str]
    """Each memory layer's value table."""
    n_batches: int = 0
    n_tokens: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    """Free-form provenance (data file, its hash, model fingerprint), kept in the file's header."""

    def table_reads(self, table: str) -> torch.Tensor:
        """``(n_slots,)`` reads of ``table``'s rows, summed over its layers and their heads."""
        layers = [name for name, t in self.tables.items() if t == table]
        if not layers:
            raise KeyError(f"no memory layer reads value table {table!r}; tables: {sorted(set(self.tables.values()))}")
        return sum(self.reads[name].sum(0) for name in layers)

    def idf(self, table: str) -> torch.Tensor:
        """``(n_slots,)`` smoothed inverse document frequency ``log((1 + B) / (1 + df)) + 1`` of
        ``table``'s rows: highest for rows no background batch read."""
        df = self.batches[table].double()
        return torch.log((1 + self.n_batches) / (1 + df)) + 1

    def add(self, other: SlotStats) -> SlotStats:
        """The statistics of both data sets together (same model required)."""
        if self.tables != other.tables or any(self.reads[k].shape != other.reads[k].shape for k in self.reads):
            raise SlotStatsError("slot statistics of different memory layouts cannot be added")
        return SlotStats(
            reads={k: self.reads[k] + other.reads[k] for k in self.reads},
            batches={k: self.batches[k] + other.batches[k] for k in self.batches},
            tables=dict(self.tables),
            n_batches=self.n_batches + other.n_batches,
            n_tokens=self.n_tokens + other.n_tokens,
            metadata={**other.metadata, **self.metadata},
        )

    def save(self, path: str | Path) -> Path:
        """Write as safetensors (counts) with a JSON header (layout, totals, metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"reads/{k}": v.contiguous().cpu() for k, v in self.reads.items()}
        tensors.update({f"batches/{k}": v.contiguous().cpu() for k, v in self.batches.items()})
        header = {"format": FORMAT, "tables": json.dumps(self.tables), "n_batches": str(self.n_batches),
                  "n_tokens": str(self.n_tokens), "metadata": json.dumps(self.metadata)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            replace_atomic(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> SlotStats:
        """Read a file written by :meth:`save`; :class:`SlotStatsError` naming the problem otherwise."""
        path = Path(path)
        if not path.is_file():
            raise SlotStatsError(f"slot statistics {path} not found; write them with `memlayers slot-stats`")
        try:
            with safe_open(path, "pt") as file:
                header = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
            if header.get("format") != FORMAT:
                raise SlotStatsError(f"{path} is not a memlayers slot statistics file (format {header.get('format')!r})")
            tables = json.loads(header["tables"])
            stats = cls(
                reads={k.removeprefix("reads/"): v for k, v in tensors.items() if k.startswith("reads/")},
                batches={k.removeprefix("batches/"): v for k, v in tensors.items() if k.startswith("batches/")},
                tables=tables, n_batches=int(header["n_batches"]), n_tokens=int(header["n_tokens"]),
                metadata=json.loads(header.get("metadata", "{}")))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, SlotStatsError):
                raise
            raise SlotStatsError(f"slot statistics {path} are unreadable ({error}); write them again "
                                 "with `memlayers slot-stats`") from None
        if set(stats.reads) != set(tables) or set(stats.batches) != set(tables.values()):
            raise SlotStatsError(f"slot statistics {path} are incomplete: layers {sorted(stats.reads)} against "
                                 f"{sorted(tables)}; write them again with `memlayers slot-stats`")
        return stats

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`SlotStatsError` unless ``model`` has exactly these memory layers and tables."""
        layout = memory_layout(model)
        mine = {name: (table, tuple(self.reads[name].shape)) for name, table in self.tables.items()}
        theirs = {name: (table, (layer.config.heads, layer.config.n_slots)) for name, (layer, table) in layout.items()}
        if mine != theirs:
            raise SlotStatsError(f"these slot statistics describe memory layers {mine}, the model has {theirs}; "
                                 "collect them for this model with `memlayers slot-stats`")


def naming_root(model: nn.Module) -> nn.Module:
    """The module that layer and table names are relative to: the model a wrapper exposes as
    ``wrapped_model`` (``CausalLMAdapter``: the transformers model), else ``model``. Statistics
    and patches made through the wrapper then apply to the bare transformers model too."""
    return getattr(model, "wrapped_model", model)


def memory_layout(model: nn.Module) -> dict[str, tuple[MemoryLayer, str]]:
    """Every memory layer of ``model`` by module name, with the parameter name of its value table
    (names relative to :func:`naming_root`)."""
    model = naming_root(model)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, MemoryLayer):
            if id(module.pool.values) not in names:
                raise SlotStatsError(f"memory layer {name}'s value table is not a parameter of the model")
            layout[name] = (module, names[id(module.pool.values)])
    if not layout:
        raise SlotStatsError("the model has no memory layers: slot statistics and memory finetuning need a memory "
                             "model (train one with memory_layers set, or add them with `memlayers retrofit`)")
    return layout


class SlotStatsCollector:
    """Counts slot reads of every memory layer of ``model`` while it runs.

    Use as a context manager around forward passes; call :meth:`end_batch` after
    each batch (its tokens counted once)::

        with SlotStatsCollector(model) as collector:
            for batch in batches:
                model(batch)
                collector.end_batch(batch.numel())
        stats = collector.stats

    Counting stays on the model's device with no host synchronisation.
    """

    def __init__(self, model: nn.Module):
        self.layout = memory_layout(model)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        device = next(model.parameters()).device
        self.stats = SlotStats(
            reads={name: torch.zeros(layer.config.heads, layer.config.n_slots, dtype=torch.long, device=device)
                   for name, (layer, _) in self.layout.items()},
            batches={table: torch.zeros(layer.config.n_slots, dtype=torch.long, device=device)
                     for layer, table in self.layout.values()},
            tables={name: table for name, (_, table) in self.layout.items()},
        )
        self._in_batch = {table: torch.zeros_like(count, dtype=torch.bool) for table, count in self.stats.batches.items()}

    def __enter__(self) -> SlotStatsCollector:
        for name, (layer, table) in self.layout.items():
            self._hooks.append(layer.search.register_forward_hook(self._hook(name, table, layer.config.n_slots)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _hook(self, name: str, table: str, n_slots: int):
        reads, in_batch = self.stats.reads[name], self._in_batch[table]

        def count(module: nn.Module, inputs, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            indices = output[1].detach()  # (..., heads, knn)
            heads = indices.shape[-2]
            offsets = torch.arange(heads, device=indices.device).unsqueeze(-1) * n_slots  # (heads, 1)
            flat = (indices + offsets).reshape(-1)  # head h's slot s at h * n_slots + s
            reads.view(-1).index_add_(0, flat, torch.ones_like(flat))
            in_batch[indices.reshape(-1)] = True

        return count

    def end_batch(self, tokens: int) -> None:
        """Close one batch of ``tokens`` tokens: every row read since the last call counts once."""
        for table, seen in self._in_batch.items():
            self.stats.batches[table] += seen
            seen.zero_()
        self.stats.n_batches += 1
        self.stats.n_tokens += int(tokens)


def collect_slot_stats(model: nn.Module, batches: Iterable[torch.Tensor], total: int | None = None,
                       progress: bool = True, desc: str = "slot statistics") -> SlotStats:
    """Run ``model`` over ``batches`` (each ``(B, L)`` token ids) without gradients and count its
    memory's reads; each batch is one "document" of the document frequency."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), SlotStatsCollector(model) as collector:
            for batch in tqdm(batches, total=total, unit="batch", desc=desc, disable=not progress, dynamic_ncols=True):
                model(batch.to(device))
                collector.end_batch(batch.numel())
    finally:
        model.train(was_training)
    if collector.stats.n_batches == 0:
        raise DataError("no full sequence of tokens to read: give more text or a smaller --seq-len")
    return collector.stats
