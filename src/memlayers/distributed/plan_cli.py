"""``memlayers plan``: does a configuration fit on its GPUs, how to split it, how long a step takes.

Exit code 0 when it fits, 1 when it does not (with the changes that make it
fit), 2 for bad input (one line on stderr, as every command).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from memlayers.config import ConfigError, load_config


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f}"


def _seconds(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def _cluster(args: argparse.Namespace):
    """The Cluster of the command's options (a GPU of the table, with any figure overridden)."""
    from memlayers.distributed.plan import GPUS, Cluster

    if args.gpu not in GPUS:
        raise ConfigError("--gpu", f"must be one of {', '.join(sorted(GPUS))}, got {args.gpu!r}")
    gpu = GPUS[args.gpu]
    figures = {"memory_gb": args.gpu_memory, "bf16_tflops": args.tflops, "hbm_tb_s": args.hbm_tb_s,
               "nvlink_gb_s": args.nvlink_gb_s}
    gpu = replace(gpu, **{name: value for name, value in figures.items() if value is not None})
    return Cluster(gpu=gpu, gpus_per_node=args.gpus, nodes=args.nodes, inter_node_gb_s=args.inter_node_gb_s,
                   mfu=args.mfu, reserve_gb=args.reserve_gb)


def render(name: str, cluster, result, found, combined) -> str:
    """The plan as the readable tables the other commands print."""
    from memlayers.cli import _human, _table
    from memlayers.distributed.plan import GB
    from memlayers.distributed.plan_report import verdict

    m, c, t, gpu = result.memory, result.communication, result.time, cluster.gpu
    tokens = result.micro_batch * result.seq_len
    nodes = f"{cluster.nodes} nodes of {cluster.gpus_per_node}" if cluster.nodes > 1 else "1 node"
    head = {
        "plan": f"{name} on {cluster.world} x {gpu.name} ({nodes}): dp {result.data_parallel} x mp {result.memory_parallel}",
        "batch": f"{result.micro_batch} x {result.seq_len} tokens per GPU per micro-batch, grad_accum "
                 f"{result.grad_accum}: {cluster.world * result.grad_accum * tokens:,} tokens per step",
        "values": f"value_optimizer {result.value_optimizer}, activation checkpointing "
                  f"{'on' if result.activation_checkpointing else 'off'}",
    }
    memory = {
        "memory per GPU (GB)": "",
        f"  dense parameters (FSDP2 over mp={result.memory_parallel})": _gb(m.dense_params),
        "  dense gradients": _gb(m.dense_grads),
        "  dense optimizer (AdamW)": _gb(m.dense_optimizer),
        "  buffers (rotary tables)": _gb(m.buffers),
        f"  value tables (1/{result.memory_parallel} of the columns)": _gb(m.value_params),
        "  value gradients" + (" (dense)" if result.value_optimizer == "adamw" else " (row factors)"): _gb(m.value_grads),
        f"  value optimizer ({result.value_optimizer})": _gb(m.value_optimizer),
        "  activations (estimate)": _gb(m.activations),
        "  transient buffers (estimate)": _gb(m.transient),
        "  reserve (--reserve-gb)": _gb(m.reserve),
        "  total": _gb(m.total),
    }
    comm = {
        "received per GPU per step (GB)": "",
        "  FSDP2 all-gather (parameters)": _gb(c.fsdp_all_gather),
        "  FSDP2 reduce-scatter (gradients)": _gb(c.fsdp_reduce_scatter),
        "  dense gradients all-reduce over dp": _gb(c.dense_all_reduce),
        "  memory-parallel reads": _gb(c.memory_reads),
        "  value gradients over dp": _gb(c.value_grad_sync),
        "  total": _gb(c.total),
    }
    time = {
        "step time (estimate)": "",
        "  FLOPs per token": f"{_human(result.flops_per_token)} forward, x{4 if result.activation_checkpointing else 3} to train",
        "  compute": _seconds(t.compute),
        "  value traffic (HBM)": _seconds(t.value_traffic),
        "  communication (not overlapped)": _seconds(t.communication),
        "  step": _seconds(t.step),
        "  tokens/s (whole job)": f"{result.tokens_per_second:,.0f}",
    }
    assumptions = {
        "assumptions": "",
        "  gpu": f"{gpu.name}: {gpu.memory_gb:g} GB (--gpu-memory), {gpu.bf16_tflops:g} TFLOP/s bf16 dense (--tflops), "
                 f"{gpu.hbm_tb_s:g} TB/s HBM (--hbm-tb-s), {gpu.nvlink_gb_s:g} GB/s NVLink per direction (--nvlink-gb-s)",
        "  inter-node link": f"{cluster.inter_node_gb_s:g} GB/s per GPU (--inter-node-gb-s)",
        "  MFU": f"{cluster.mfu:g} of peak (--mfu)",
        "  reserve": f"{cluster.reserve_gb:g} GB for the CUDA context and allocator (--reserve-gb)",
        "  units": "GB = 10^9 bytes; parameters, gradients and optimizer state exact, the rest estimated",
    }
    tail = [verdict(result) + ("; each of these alone makes it fit (re-planned):" if found else "")]
    for suggestion in found:
        tail.append(f"  {suggestion.change}: {suggestion.plan.memory.total / GB:,.1f} GB ({suggestion.why})")
    if combined is not None:
        state = "fits" if combined.plan.fits else "still does not fit: more GPUs or a smaller model"
        tail.append(f"  no single change makes it fit; all together ({combined.change}) need "
                    f"{combined.plan.memory.total / GB:,.1f} GB: {state}")
    return "\n\n".join(_table(section) for section in (head, memory, comm, time, assumptions)) + "\n\n" + "\n".join(tail)

def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a config on ``--gpus`` GPUs (x ``--nodes``): 0 when it fits, 1 when it does not."""
    from memlayers.distributed.plan import model_shapes, plan
    from memlayers.distributed.plan_report import report, suggestions
    from memlayers.train.config import RunConfig

    cluster = _cluster(args)
    overrides = [*args.overrides, *([f"parallel.memory_parallel={args.mp}"] if args.mp is not None else []),
                 *(["parallel.activation_checkpointing=true"] if args.activation_checkpointing else [])]
    config = load_config(RunConfig, args.config, overrides)
    shapes = model_shapes(config.model)
    result = plan(config, cluster, shapes)
    found, combined = ([], None) if result.fits else suggestions(config, cluster, shapes)
    if args.json:
        print(json.dumps({"config": args.config, **report(config, cluster, result, found, combined)}, indent=2))
    else:
        print(render(args.config, cluster, result, found, combined))
    return 0 if result.fits else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``memlayers plan`` to the ``memlayers`` command line."""
    parser = sub.add_parser("plan", help="does a config fit on N GPUs: memory per GPU, communication and step "
                            "time under FSDP2 + memory parallelism; exit 0 if it fits, 1 if not (with what to change)")
    parser.add_argument("config", help="YAML preset, e.g. paper_373m_memory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=8 data.seq_len=2048")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--mp", type=int, help="memory-parallel ranks (default: the config's parallel.memory_parallel)")
    parser.add_argument("--gpu", default="h100", help="h100 (default), a100 or h200: the assumed figures")
    parser.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU instead of the GPU's")
    parser.add_argument("--tflops", type=float, help="peak dense bf16 TFLOP/s instead of the GPU's")
    parser.add_argument("--hbm-tb-s", type=float, help="HBM bandwidth in TB/s instead of the GPU's")
    parser.add_argument("--nvlink-gb-s", type=float, help="NVLink GB/s per GPU and direction instead of the GPU's")
    parser.add_argument("--inter-node-gb-s", type=float, default=50.0, help="link between nodes, GB/s per GPU (default 50)")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of peak FLOP/s reached (default 0.4)")
    parser.add_argument("--reserve-gb", type=float, default=2.0,
                        help="kept free for the CUDA context and allocator slack (default 2)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="plan with each block's activations recomputed in the backward "
                        "(the same as parallel.activation_checkpointing=true)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=cmd_plan)
