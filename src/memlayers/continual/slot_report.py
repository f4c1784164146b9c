"""Slot statistics of a model over a text file, and what they say about its memory.

:func:`collect_slot_stats` streams a ``.txt``/``.jsonl`` file through the
model (documents packed into rows as they are read, one batch in memory) and
counts what every memory layer reads (:mod:`memlayers.continual.slot_stats`).
:func:`diagnostics` turns the counts into the numbers a researcher checks
(dead slots, skew, the most-read slots and the tokens that read them) and
:func:`plot_slot_stats` draws the read distribution of every layer (PNG).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memlayers.continual.slot_stats import SlotStats, collect_slot_stats, memory_layout  # noqa: E402
from memlayers.data.packing import iter_packed_rows  # noqa: E402
from memlayers.data.text import iter_documents  # noqa: E402
from memlayers.memory.usage import kl_from_uniform  # noqa: E402
from memlayers.train.run_dir import file_fingerprint  # noqa: E402


def text_batches(path: str | Path, encode: Callable[[str], list[int]], bos_id: int | None, eos_id: int | None,
                 seq_len: int, batch_size: int, on_document: Callable[[str], None] = lambda doc: None,
                 ) -> Iterator[torch.Tensor]:
    """``(batch_size, seq_len)`` input batches of a text file, packed as training packs it (the
    last batch may be smaller); ``on_document`` sees each document as it is read."""

    def documents() -> Iterator[list[int]]:
        for doc in iter_documents(path):
            on_document(doc)
            yield encode(doc)

    rows = iter_packed_rows(documents(), seq_len, bos_id, eos_id)
    while batch := list(itertools.islice(rows, batch_size)):
        yield torch.stack(batch)[:, :-1]  # (B, L): the inputs of each row


def collect_from_file(model: nn.Module, path: str | Path, encode: Callable[[str], list[int]], bos_id: int | None,
                      eos_id: int | None, seq_len: int, batch_size: int, max_batches: int | None = None,
                      progress: bool = True) -> SlotStats:
    """:func:`collect_slot_stats` over a text file (at most ``max_batches`` batches), recording
    the file and its hash in the statistics' metadata. The bar counts the file's bytes."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else None
    with tqdm(total=size, unit="B", unit_scale=True, desc="slot statistics", disable=not progress,
              dynamic_ncols=True) as bar:
        batches = text_batches(path, encode, bos_id, eos_id, seq_len, batch_size,
                               on_document=lambda doc: bar.update(len(doc.encode("utf-8")) + 1))
        stats = collect_slot_stats(model, itertools.islice(batches, max_batches), progress=False)
    stats.metadata.update({"data": str(path), "data_sha256": file_fingerprint(path), "seq_len": str(seq_len),
                           "batch_size": str(batch_size)})
    return stats


def diagnostics(stats: SlotStats, top: int = 5) -> dict[str, dict[str, Any]]:
    """Per memory layer: slots, reads, the fraction of dead slots (never read), KL from uniform
    of its reads (all heads, and per head), and its ``top`` most-read slots with their reads."""
    report = {}
    for name, reads in stats.reads.items():
        total = reads.sum(0)  # (n_slots,)
        counts, slots = total.topk(min(top, total.numel()))
        report[name] = {
            "table": stats.tables[name],
            "slots": total.numel(),
            "reads": int(total.sum()),
            "dead_fraction": float((total == 0).double().mean()),
            "kl_uniform": kl_from_uniform(total),
            "kl_uniform_per_head": [kl_from_uniform(head) for head in reads],
            "top_slots": [{"slot": int(s), "reads": int(c)} for s, c in zip(slots, counts, strict=True)],
        }
    return report


def tokens_reading(model: nn.Module, batches: Iterable[torch.Tensor], slots: dict[str, list[int]],
                   top: int = 5) -> dict[str, dict[int, list[tuple[int, int]]]]:
    """For each layer's ``slots``, the ``top`` token ids whose positions read the slot most
    (any head), with their counts, over ``batches``."""
    layout = memory_layout(model)
    counters = {name: {slot: Counter() for slot in wanted} for name, wanted in slots.items()}
    current: list[torch.Tensor] = []
    device = next(model.parameters()).device

    def hook(name: str):
        wanted = torch.tensor(slots[name], device=device)

        def count(module, inputs, output) -> None:
            indices = output[1]  # (B, L, heads, knn)
            hits = (indices.unsqueeze(-1) == wanted).any(-2).any(-2)  # (B, L, n_wanted)
            for k, slot in enumerate(slots[name]):
                counters[name][slot].update(current[0][hits[..., k]].tolist())

        return count

    hooks = [layout[name][0].search.register_forward_hook(hook(name)) for name in slots]
    try:
        with torch.no_grad():
            for batch in batches:
                current[:] = [batch.to(device)]
                model(current[0])
    finally:
        for handle in hooks:
            handle.remove()
    return {name: {slot: counter.most_common(top) for slot, counter in by_slot.items()}
            for name, by_slot in counters.items()}


def plot_slot_stats(stats: SlotStats, path: str | Path) -> Path:
    """One panel per memory layer: reads per slot against rank (log-log), with dead slots and
    KL from uniform in the title; saved as PNG."""
    names = list(stats.reads)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        total = stats.reads[name].sum(0)
        ranked = total.sort(descending=True).values.double()
        ranks = torch.arange(1, ranked.numel() + 1)
        used = ranked > 0
        ax.loglog(ranks[used], ranked[used], lw=1.5)
        even = float(total.sum()) / total.numel()
        ax.axhline(even, ls="--", color="grey", lw=1, label="uniform")
        ax.set_xlabel("slot rank")
        ax.set_ylabel("reads")
        ax.set_title(f"{name}\n{float((total == 0).double().mean()):.1%} dead, KL {kl_from_uniform(total):.2f} nats",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"memory reads over {stats.n_batches} batches ({stats.n_tokens:,} tokens)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def top_readers(model: nn.Module, documents: list[list[int]], rows: dict[str, torch.Tensor], seq_len: int,
                top: int = 3) -> dict[str, dict[int, list[tuple[int, int]]]]:
    """For each value table's ``rows``, the ``top`` documents (by index) whose tokens read the row
    most, with their read counts: which examples a learned row came from. Each document is read
    alone, cut to ``seq_len`` tokens."""
    layout = memory_layout(model)
    wanted = {table: set(r.tolist()) for table, r in rows.items()}
    reads: dict[str, dict[int, list[tuple[int, int]]]] = {table: {} for table in rows}
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [layer.search.register_forward_hook(lambda m, i, out, table=table: seen.append((table, out[1])))
             for layer, table in layout.values() if table in rows]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for index, ids in enumerate(documents):
                if not ids:
                    continue
                seen.clear()
                model(torch.tensor([ids[:seq_len]], device=device))
                counts: dict[tuple[str, int], int] = Counter()
                for table, indices in seen:
                    slots, n = indices.reshape(-1).unique(return_counts=True)
                    for slot, count in zip(slots.tolist(), n.tolist(), strict=True):
                        if slot in wanted[table]:
                            counts[table, slot] += count
                for (table, slot), count in counts.items():
                    reads[table].setdefault(slot, []).append((index, count))
    finally:
        for hook in hooks:
            hook.remove()
    return {table: {slot: sorted(found, key=lambda x: (-x[1], x[0]))[:top] for slot, found in by_slot.items()}
            for table, by_slot in reads.items()}
