"""A memory layer against the naive MIT peer, lucidrains' `product-key-memory`, side by side in one run.

    pip install product-key-memory        # the peer (not a memlayers dependency)
    python benchmarks/bench_peer.py [--quick] [--repeat 5] [--out benchmarks/results/peer.json]

Shape (issue 13): dim 512, 4 heads, 256² slots, knn 32, sub-keys of 128 per half,
8 x 256 tokens, forward + backward of ``out.square().mean()`` (no optimizer
step). The peer reads its values with ``nn.EmbeddingBag`` (a dense table
gradient); memlayers is measured with its plain layer (the peer's computation:
query projection, product-key search, weighted bag) and with Memory+ (the
paper's layer, two more projections), each with the dense table gradient and
with ``table_grad="rows"``. Reported: tokens/s and the ratio to the peer
(median over rounds of the two times in a round, with quartiles).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from memlayers.bench.timing import (
    environment,
    format_table,
    round_ratios,
    source_commit,
    time_rounds,
)
from memlayers.host_memory import keep_freed_memory
from memlayers.memory import MemoryConfig, MemoryLayer

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"rows": 3.0, "dense": 1.5}
"""Issue 13: memlayers' layer against the peer, tokens/s ratio, per table gradient."""


def _step(layer: torch.nn.Module, x: torch.Tensor):
    """Forward and backward of ``layer`` on ``x``, gradients dropped after: a function to time."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(x).square().mean().backward()
        for p in params:
            p.grad = None
            if hasattr(p, "row_grad"):
                p.row_grad = None

    return step


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peer.json"))
    args = parser.parse_args(argv)
    try:
        from product_key_memory import PKM
    except ImportError:
        print("bench_peer: the peer is not installed; run `pip install product-key-memory`", file=sys.stderr)
        return 2
    keep_freed_memory()  # as the `memlayers` command does: both layers reuse their freed temporaries
    dim, heads, n_keys, knn, half, batch, seq = (64, 2, 32, 8, 16, 2, 32) if args.quick else (512, 4, 256, 32, 128, 8, 256)
    torch.manual_seed(0)
    x = torch.randn(batch, seq, dim)
    tokens = batch * seq
    peer = PKM(dim, heads=heads, num_keys=n_keys, topk=knn, dim_head=half)
    steps = {("product-key-memory (peer)", "dense"): _step(peer, x)}
    for variant in ("plain", "plus"):
        for table_grad in ("dense", "rows"):
            config = MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=2 * half, variant=variant)
            steps[f"memlayers {variant}", table_grad] = _step(MemoryLayer(dim, config, table_grad=table_grad), x)
    # in turns, so that the machine's drift during the run (20% here) moves every layer alike
    rounds = time_rounds(steps, torch.device("cpu"), args.repeat)
    peer_times = rounds[("product-key-memory (peer)", "dense")]
    rows = []
    for (layer, grad), times in rounds.items():
        ms = statistics.median(times)
        ratio = round_ratios(peer_times, times)  # the peer's time over ours, round by round
        rows.append({"layer": layer, "table gradient": grad, "ms": ms, "tokens/s": tokens / (ms / 1e3),
                     "vs peer": ratio["median"], "quartiles": f"{ratio['q1']:.2f}-{ratio['q3']:.2f}"})
    plain = {r["table gradient"]: r["vs peer"] for r in rows if r["layer"] == "memlayers plain"}
    result = {
        "environment": environment(torch.device("cpu")), "commit": source_commit(ROOT), "quick": args.quick,
        "shape": {"dim": dim, "heads": heads, "n_keys": n_keys, "knn": knn, "sub_key_dim": half, "tokens": tokens},
        "rows": rows, "targets": TARGETS,
        "meets_targets": {grad: plain[grad] >= target for grad, target in TARGETS.items()},
    }
    print(f"memory layer fwd+bwd, dim {dim}, {heads} heads, {n_keys}² slots, knn {knn}, {tokens} tokens "
          f"({result['environment']['device']})\n")
    print(format_table(rows, list(rows[0])))
    print(f"\nplain layer vs peer: {plain['rows']:.2f}x with table_grad=rows (target {TARGETS['rows']}x), "
          f"{plain['dense']:.2f}x dense (target {TARGETS['dense']}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
