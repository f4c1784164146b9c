"""Command line of ``memlayers tokenize``: a corpus -> token shards for streaming training."""

from __future__ import annotations

import argparse

from memlayers.data.shards_write import DEFAULT_SHARD_TOKENS, write_shards


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Tokenise the inputs into shards in ``--out`` (resuming an interrupted run); print one summary line."""
    summary = write_shards(args.inputs, args.tokenizer, args.out, text_field=args.text_field,
                           workers=args.workers, heldout_fraction=args.heldout_fraction,
                           shard_tokens=args.shard_tokens, seed=args.seed)
    print(summary.line())
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``tokenize`` to the ``memlayers`` command line."""
    tokenize = sub.add_parser(
        "tokenize", help="tokenise a corpus (text, JSONL, compressed, parquet, datasets) into token shards; "
        "rerun with the same arguments to resume")
    tokenize.add_argument("inputs", nargs="+", metavar="INPUT",
                          help=".txt (documents separated by blank lines) or .jsonl files, plain or compressed "
                          "(.gz, .bz2, .xz, .zst), .parquet files, datasets directories (save_to_disk), or folders "
                          "of such files (read in path order)")
    tokenize.add_argument("--tokenizer", required=True, help="a tokenizer.json (or its folder)")
    tokenize.add_argument("--out", required=True, help="the shard directory (index.json, tokenizer.json, *.bin)")
    tokenize.add_argument("--text-field", default="text",
                          help="JSONL field / parquet or datasets column holding the text (default: text)")
    tokenize.add_argument("--workers", type=int, help="tokenising processes (default: one per CPU; 1: no "
                          "worker processes); the output is the same for any number")
    tokenize.add_argument("--heldout-fraction", type=float, default=0.0,
                          help="fraction of documents, drawn by a hash of the seed, source and document, "
                          "written to a 'heldout' split (default 0: none)")
    tokenize.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                          help=f"tokens after which a shard file is closed and the next begins (default {DEFAULT_SHARD_TOKENS})")
    tokenize.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
    tokenize.set_defaults(func=cmd_tokenize)
