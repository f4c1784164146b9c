"""Benchmark (b): a memory layer's whole training step at 1024**2 slots against 256**2.

One step is forward, backward, clipping and optimizer update of a standalone
:class:`~memlayers.memory.MemoryLayer` (Memory+, qk-norm). With dense AdamW on
the values, the update reads and writes every row, so the step grows with the
table; with a row-sparse optimizer it grows only with the rows a step touches.

The product-key search itself grows with ``n_keys`` (sqrt of the slots: 4x from
256**2 to 1024**2), so the step is also timed without it: the value-table part
alone (bag forward and backward on the layer's own lookups, clipping, update).
Both sizes are timed in turns, and each ratio is the median over rounds of the
two times in a round (with quartiles), so the machine's drift cancels out.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from memlayers.bench.timing import round_ratios, time_rounds
from memlayers.kernels import embedding_bag
from memlayers.memory import MemoryConfig, MemoryLayer
from memlayers.train.optim import OptimConfig, build_optimizer, clip_gradients, uses_row_grads

TARGET_RATIO = 1.5
OPTIMIZERS = ("adamw", "row_adamw", "row_adagrad")


@dataclass
class StepShape:
    """The memory layer and batch of the step benchmark."""

    small_keys: int = 256
    large_keys: int = 1024
    dim: int = 256
    heads: int = 4
    knn: int = 32
    k_dim: int = 256
    tokens: int = 2048


def layer_steps(shape: StepShape, n_keys: int, value_optimizer: str, device: torch.device) -> tuple:
    """One training step and its value-table part, as functions to time, and the rows the batch touches."""
    torch.manual_seed(0)
    memory = MemoryConfig(n_keys=n_keys, heads=shape.heads, knn=shape.knn, k_dim=shape.k_dim, qk_norm=True)
    config = OptimConfig(value_optimizer=value_optimizer)
    layer = MemoryLayer(shape.dim, memory, table_grad="rows" if uses_row_grads(config) else "dense").to(device)
    optimizer = build_optimizer(layer, config)
    x = torch.randn(shape.tokens, shape.dim, device=device)

    def step():
        layer(x).square().mean().backward()
        clip_gradients(optimizer, config)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():
        scores, indices = layer.lookup(x)  # (tokens, heads, knn)
    weights = scores.softmax(-1).flatten(-2)  # (tokens, heads * knn)
    indices = indices.flatten(-2)
    values = layer.pool.values
    value_groups = [g for g in optimizer.param_groups if g["name"] == "values"]

    def values_step():
        embedding_bag(indices, weights, values, layer.bag_backend, layer.table_grad).square().mean().backward()
        clip_gradients(optimizer, config)
        for child in getattr(optimizer, "optimizers", [optimizer]):
            if any(g in value_groups for g in child.param_groups):
                child.step()
        optimizer.zero_grad(set_to_none=True)

    return step, values_step, int(indices.unique().numel())


def bench_step(shape: StepShape, device: torch.device, repeat: int = 5, optimizers: tuple[str, ...] = OPTIMIZERS) -> dict:
    """Step time at both sizes for each value optimizer (timed in turns), and the large/small ratio."""
    result: dict = {"shape": asdict(shape), "target_ratio": TARGET_RATIO, "optimizers": {}}
    for name in optimizers:
        small, values_small, touched_small = layer_steps(shape, shape.small_keys, name, device)
        large, values_large, touched_large = layer_steps(shape, shape.large_keys, name, device)
        rounds = time_rounds({"small": small, "large": large, "values_small": values_small, "values_large": values_large},
                             device, repeat)
        ratio, values_ratio = round_ratios(rounds["large"], rounds["small"]), round_ratios(rounds["values_large"], rounds["values_small"])
        result["optimizers"][name] = {
            **{f"{part}_ms": statistics.median(times) for part, times in rounds.items()},
            "ratio": ratio["median"],
            "ratio_quartiles": [ratio["q1"], ratio["q3"]],
            "meets_target": ratio["median"] <= TARGET_RATIO,
            "values_ratio": values_ratio["median"],
            "touched_rows_small": touched_small,
            "touched_rows_large": touched_large,
        }
        del small, large, values_small, values_large  # the large tables (up to 3 GB) before the next optimizer's
    dense = result["optimizers"].get("adamw")
    if dense is not None:
        for row in result["optimizers"].values():
            row["large_speedup_vs_adamw"] = dense["large_ms"] / row["large_ms"]
    return result
