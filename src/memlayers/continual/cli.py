"""Command line of continual learning: ``memlayers slot-stats`` (and its diagnostics)."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any


def cmd_slot_stats(args: argparse.Namespace) -> int:
    """Count the memory reads of a model over background text; write them, report and plot them."""
    from memlayers.config import ConfigError
    from memlayers.continual.slot_report import (
        collect_from_file,
        diagnostics,
        plot_slot_stats,
        text_batches,
        tokens_reading,
    )
    from memlayers.continual.slot_stats import memory_layout
    from memlayers.data.text import iter_documents
    from memlayers.device import pick_device
    from memlayers.train.pretrained import load_pretrained

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--top", args.top)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if args.batches is not None and args.batches < 1:
        raise ConfigError("--batches", f"must be >= 1 (or left out for the whole file), got {args.batches}")
    iter_documents(args.data)  # a missing or wrong file is named before the model loads
    model, tokenizer, config = load_pretrained(args.model, pick_device(args.device, "--device"))
    memory_layout(model)  # a model without memory is named before any data is read
    seq_len = args.seq_len or config.data.seq_len

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text)

    stats = collect_from_file(model, args.data, encode, tokenizer.bos_id, tokenizer.eos_id, seq_len,
                              args.batch_size, max_batches=args.batches, progress=not args.json)
    stats.metadata["model"] = str(args.model)
    stats.save(args.out)
    report = diagnostics(stats, top=args.top)
    # the tokens that read each layer's most-read slots, from the first batches of the same data
    first = itertools.islice(
        text_batches(args.data, encode, tokenizer.bos_id, tokenizer.eos_id, seq_len, args.batch_size), args.token_batches)
    readers = tokens_reading(model, first,
                             {name: [s["slot"] for s in layer["top_slots"]] for name, layer in report.items()})
    for name, layer in report.items():
        for slot in layer["top_slots"]:
            slot["tokens"] = [{"token": tokenizer.decode([t]), "count": n} for t, n in readers[name][slot["slot"]]]
    plot = plot_slot_stats(stats, args.plot or Path(args.out).with_suffix(".png"))
    summary = {"out": str(args.out), "plot": str(plot), "batches": stats.n_batches, "tokens": stats.n_tokens,
               "layers": report}
    print(json.dumps(summary, indent=2) if args.json else _render(summary))
    return 0


def _render(summary: dict[str, Any]) -> str:
    """The diagnostics as a few readable lines per memory layer."""
    lines = [f"{summary['batches']} batches, {summary['tokens']:,} tokens -> {summary['out']} (plot {summary['plot']})"]
    for name, layer in summary["layers"].items():
        lines.append(f"{name}  ({layer['slots']:,} slots, table {layer['table']}): {layer['dead_fraction']:.1%} dead, "
                     f"KL from uniform {layer['kl_uniform']:.3f} nats (per head "
                     + ", ".join(f"{kl:.2f}" for kl in layer["kl_uniform_per_head"]) + ")")
        for slot in layer["top_slots"]:
            tokens = ", ".join(f"{t['token']!r} x{t['count']}" for t in slot.get("tokens", [])[:5])
            lines.append(f"  slot {slot['slot']:>9,}: {slot['reads']:,} reads  {tokens}")
    return "\n".join(lines)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the continual-learning commands to the ``memlayers`` command line."""
    stats = sub.add_parser("slot-stats", help="count which memory slots a model reads over background text "
                           "(for sparse memory finetuning), report dead slots and skew, plot them")
    stats.add_argument("model", help="a memlayers checkpoint directory, or a run directory (its latest)")
    stats.add_argument("--data", required=True, help="background text (.txt or .jsonl), streamed")
    stats.add_argument("--out", required=True, help="where to write the statistics (.safetensors)")
    stats.add_argument("--batches", type=int, help="read at most this many batches (default: the whole file)")
    stats.add_argument("--batch-size", type=int, default=8, help="sequences per batch; each batch is one "
                       "'document' of the document frequency (default 8)")
    stats.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's training seq_len)")
    stats.add_argument("--top", type=int, default=5, help="most-read slots to show per layer (default 5)")
    stats.add_argument("--token-batches", type=int, default=16,
                       help="batches read again to find the tokens behind the top slots (default 16)")
    stats.add_argument("--plot", help="PNG of the read distribution (default: OUT with .png)")
    stats.add_argument("--device", default="auto")
    stats.add_argument("--json", action="store_true", help="print the diagnostics as JSON (no progress bar)")
    stats.set_defaults(func=cmd_slot_stats)
