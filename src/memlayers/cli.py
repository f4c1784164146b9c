"""The ``memlayers`` command line: ``memlayers info | demo``."""

from __future__ import annotations

import argparse
import json
import sys

from memlayers.config import ConfigError, load_config, to_dict


def _human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def cmd_info(args: argparse.Namespace) -> int:
    """Print a config's parameter and FLOP counts."""
    from memlayers.model.accounting import count_flops, count_parameters
    from memlayers.train.config import RunConfig

    config = load_config(RunConfig, args.config, args.overrides)
    params = count_parameters(config.model)
    flops = count_flops(config.model, args.seq_len)
    if args.json:
        print(json.dumps({"config": to_dict(config), "params": params.__dict__, "flops_per_token": flops.as_dict()}, indent=2))
        return 0
    model = config.model
    letters = {"dense": "D", "memory": "M", "peer": "P", "moe": "E"}
    layout = " ".join(letters[model.ffn_kind(i)] for i in range(model.n_layers))
    print(f"layers       {layout}  (D dense, M memory, P PEER, E MoE)")
    print(f"params       total {_human(params.total)}, memory {_human(params.memory)}, "
          f"embedding {_human(params.embedding)}, active/token {_human(params.active)}")
    print(f"FLOPs/token  {_human(flops.total)} forward: matmul {_human(flops.matmul)}, attention {_human(flops.attention)}, "
          f"key search {_human(flops.key_search)}, value read {_human(flops.value_read)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train dense and memory models on a synthetic fact table and compare."""
    from memlayers.demo import run_smoke_demo

    run_smoke_demo(steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``memlayers`` command."""
    parser = argparse.ArgumentParser(prog="memlayers", description="Language models with product-key memory layers.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter and FLOP counts of a config")
    info.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.memory.n_keys=256")
    info.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs (default max_seq_len)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="short training of dense vs memory models on a synthetic fact table")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; a config problem is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"memlayers: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
