"""Command line of continual learning: ``memlayers slot-stats``, ``memlayers learn``, ``memlayers patch``."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any


def cmd_slot_stats(args: argparse.Namespace) -> int:
    """Count the memory reads of a model over background text; write them, report and plot them."""
    from memlayers.config import ConfigError
    from memlayers.continual.models import load_model
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

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--top", args.top)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if args.batches is not None and args.batches < 1:
        raise ConfigError("--batches", f"must be >= 1 (or left out for the whole file), got {args.batches}")
    iter_documents(args.data)  # a missing or wrong file is named before the model loads
    loaded = load_model(args.model, pick_device(args.device, "--device"))
    model, tokenizer = loaded.model, loaded.tokenizer
    memory_layout(model)  # a model without memory is named before any data is read
    seq_len = args.seq_len or loaded.seq_len

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


def _evaluator(model, tokenizer, seq_len: int, qa: dict[str, str], heldout: str | None, limit: int):
    """A function scoring ``model`` now: EM and answer NLL on each QA set, perplexity on held-out text."""
    from memlayers.data.packing import pack_documents
    from memlayers.data.text import read_documents, read_qa
    from memlayers.eval.perplexity import evaluate_perplexity
    from memlayers.eval.qa import evaluate_qa

    sets = {name: read_qa(path)[: limit or None] for name, path in qa.items()}
    rows = None
    if heldout is not None:
        rows = pack_documents(tokenizer.encode_batch(read_documents(heldout)), seq_len,
                              tokenizer.bos_id, tokenizer.eos_id)[:256]

    def evaluate() -> dict[str, float]:
        scores: dict[str, float] = {}
        for name, pairs in sets.items():
            result = evaluate_qa(model, tokenizer, pairs)
            scores.update({f"{name}_em": result.exact_match, f"{name}_answer_nll": result.answer_nll})
        if rows is not None:
            scores["heldout_ppl"] = evaluate_perplexity(model, rows.to(next(model.parameters()).device))["perplexity"]
        return scores

    return evaluate


def cmd_learn(args: argparse.Namespace) -> int:
    """Teach a checkpoint new text with one method; write a patch, adapters or a checkpoint."""
    from safetensors.torch import save_file

    from memlayers.cli import parse_qa_sets
    from memlayers.config import ConfigError, load_config, to_dict
    from memlayers.continual.learn import LearnConfig, learn
    from memlayers.continual.models import load_model
    from memlayers.continual.slot_report import top_readers
    from memlayers.continual.slot_stats import SlotStats, SlotStatsError
    from memlayers.data.packing import pack_documents
    from memlayers.data.text import read_documents, write_text_atomic
    from memlayers.device import pick_device
    from memlayers.train.run_dir import file_fingerprint

    config = load_config(LearnConfig, args.config, [*(["method=" + args.method] if args.method else []), *args.overrides])
    qa = parse_qa_sets(args.eval or [])
    documents = read_documents(args.data)  # a bad file is named before the model loads
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError("--out", f"{out} is not empty; choose a new directory or pass --overwrite")
    loaded = load_model(args.model, pick_device(args.device, "--device"))
    model, tokenizer, checkpoint = loaded.model, loaded.tokenizer, loaded.path
    background = None
    if config.method == "sparse":
        path = Path(args.background) if args.background else checkpoint / "slot_stats.safetensors"
        if not path.is_file():
            raise SlotStatsError(f"sparse memory finetuning needs background slot statistics; {path} is missing: "
                                 f"write them with `memlayers slot-stats {args.model} --data BACKGROUND --out {path}` "
                                 "(or train with train.slot_stats_batches) and pass --background")
        background = SlotStats.load(path)
    seq_len = config.seq_len or loaded.seq_len
    rows = pack_documents(tokenizer.encode_batch(documents), seq_len, tokenizer.bos_id, tokenizer.eos_id)
    evaluate = _evaluator(model, tokenizer, seq_len, qa, args.heldout, args.limit) if (qa or args.heldout) else None
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("w") as log:
        result = learn(model, rows, config, background, evaluate, progress=not args.json,
                       log=lambda record: log.write(json.dumps(record) + "\n"))
    summary = {"method": config.method, "steps": result["steps"], "seconds": result["seconds"], "loss": result["loss"],
               "before": result["before"], "after": result["after"], "config": to_dict(config),
               "model": str(checkpoint), "data": str(args.data), "data_sha256": file_fingerprint(args.data)}
    if "patch" in result:
        patch = result["patch"]
        patch.info.update(model=str(checkpoint), data=str(args.data), data_sha256=summary["data_sha256"])
        readers = top_readers(model, tokenizer.encode_batch(documents), patch.rows, seq_len)
        patch.info["readers"] = {table: {str(row): [[doc, n] for doc, n in found] for row, found in by_row.items()}
                                 for table, by_row in readers.items()}
        used = sorted({doc for by_row in readers.values() for found in by_row.values() for doc, _ in found})
        patch.info["examples"] = {str(doc): documents[doc][:200] for doc in used}
        patch.save(out)
        summary.update(rows_changed=patch.n_rows, patch_bytes=patch.nbytes)
    elif "adapter" in result:
        save_file({k: v.contiguous() for k, v in result["adapter"].items()}, out / "adapter_model.safetensors")
        adapter = {"peft_type": "LORA", "r": config.lora_rank, "lora_alpha": config.lora_alpha,
                   "target_modules": sorted({k.split(".lora_")[0] for k in result["adapter"]})}
        write_text_atomic(out / "adapter_config.json", json.dumps(adapter, indent=2) + "\n")
    else:
        summary["checkpoint"] = str(loaded.save(out / "model" if loaded.is_transformers else out, result["steps"]))
    write_text_atomic(out / "learn.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2) if args.json else _render_learn(summary))
    return 0


def _render_learn(summary: dict[str, Any]) -> str:
    """What was learned, before and after, in a few lines."""
    lines = [f"{summary['method']}: {summary['steps']} steps in {summary['seconds']:.1f} s, final loss {summary['loss']:.4f}"]
    for key in summary["after"]:
        lines.append(f"  {key:<24} {summary['before'].get(key, float('nan')):.4f} -> {summary['after'][key]:.4f}")
    if "rows_changed" in summary:
        lines.append(f"  patch: {summary['rows_changed']:,} rows, {summary['patch_bytes']:,} bytes")
    return "\n".join(lines)


def cmd_patch(args: argparse.Namespace) -> int:
    """info | apply | revert | merge of memory patches."""
    from memlayers.continual.patch import MemoryPatch, merge

    if args.action == "info":
        patch = MemoryPatch.load(args.patch)
        details = {k: v for k, v in patch.info.items() if k not in ("readers", "examples")}
        readers, examples = patch.info.get("readers", {}), patch.info.get("examples", {})
        rows = {table: [{"row": row, "read_most_by": [{"example": examples.get(str(doc), doc), "reads": n}
                                                      for doc, n in readers.get(table, {}).get(str(row), [])]}
                        for row in r.tolist()[: args.rows]] for table, r in patch.rows.items()}
        info = {"rows_changed": {t: r.numel() for t, r in patch.rows.items()}, "bytes": patch.nbytes,
                **details, "rows": rows}
        print(json.dumps(info, indent=2))
        return 0
    if args.action == "merge":
        merged = merge(MemoryPatch.load(args.first), MemoryPatch.load(args.second), args.policy)
        merged.save(args.out)
        print(f"merged patch: {merged.n_rows:,} rows, {merged.nbytes:,} bytes -> {args.out}")
        return 0
    return _patch_model(args)


def _patch_model(args: argparse.Namespace) -> int:
    """apply / revert a patch to a model, writing the result as the model was (checkpoint or transformers)."""
    from memlayers.continual.models import load_model
    from memlayers.continual.patch import MemoryPatch

    patch = MemoryPatch.load(args.patch)
    loaded = load_model(args.model)
    (patch.apply if args.action == "apply" else patch.revert)(loaded.model)
    saved = loaded.save(args.out)
    print(f"{'applied' if args.action == 'apply' else 'reverted'} {patch.n_rows:,} rows -> {saved}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the continual-learning commands to the ``memlayers`` command line."""
    stats = sub.add_parser("slot-stats", help="count which memory slots a model reads over background text "
                           "(for sparse memory finetuning), report dead slots and skew, plot them")
    stats.add_argument("model", help="a memlayers checkpoint or run directory, or a transformers directory "
                       "(a model retrofitted with memory)")
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

    learn_parser = sub.add_parser("learn", help="teach a model new text: sparse memory finetuning, value, full or "
                                  "LoRA finetuning; writes a memory patch (sparse, values), adapters or a checkpoint")
    learn_parser.add_argument("model", help="a memlayers checkpoint or run directory, or a transformers directory "
                              "(a model retrofitted with memory)")
    learn_parser.add_argument("--data", required=True, help="the new text (.txt or .jsonl)")
    learn_parser.add_argument("--out", required=True, help="output directory (patch, adapters or checkpoint, learn.json)")
    learn_parser.add_argument("--method", choices=("sparse", "values", "full", "lora"), help="default: sparse")
    learn_parser.add_argument("--config", help="a YAML file of learn settings (see LearnConfig)")
    learn_parser.add_argument("--background", help="slot statistics for sparse (default: MODEL/slot_stats.safetensors)")
    learn_parser.add_argument("--eval", action="append", metavar="NAME=FILE",
                              help="QA set to score before, during and after, e.g. --eval new=b.jsonl --eval old=a.jsonl")
    learn_parser.add_argument("--heldout", help="held-out text (.txt/.jsonl) whose perplexity is scored too")
    learn_parser.add_argument("--limit", type=int, default=0, help="first N pairs of each QA set (0: all)")
    learn_parser.add_argument("--device", default="auto")
    learn_parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    learn_parser.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    learn_parser.add_argument("overrides", nargs="*", help="learn settings, e.g. top_t=100 lr=5 steps=200")
    learn_parser.set_defaults(func=cmd_learn)

    patch = sub.add_parser("patch", help="inspect, apply, revert or merge memory patches")
    actions = patch.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="rows, bytes and provenance of a patch")
    info.add_argument("patch")
    info.add_argument("--rows", type=int, default=20,
                      help="rows to list per table, each with the training examples that read it most (default 20)")
    for name, text in (("apply", "write a patch's rows into a checkpoint"),
                       ("revert", "restore the rows a patch changed (bit for bit)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("model", help="a memlayers checkpoint or run directory, or a transformers directory")
        action.add_argument("patch", help="a patch directory (patch.safetensors + patch.json)")
        action.add_argument("--out", required=True,
                            help="where the result goes: a run directory (memlayers) or a transformers directory")
    combine = actions.add_parser("merge", help="one patch with the changes of two")
    combine.add_argument("first")
    combine.add_argument("second")
    combine.add_argument("--out", required=True)
    combine.add_argument("--policy", default="error", choices=("error", "first", "second", "add"),
                         help="rows both patches changed: refuse (default), keep first's or second's, or add both changes")
    patch.set_defaults(func=cmd_patch)
