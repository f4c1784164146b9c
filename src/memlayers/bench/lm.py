"""Benchmark (f): training-step throughput of the memory and MoE LMs against the dense LM.

The models are the demo's comparison (``configs/demo.yaml``: dense, the largest
memory, the MoE matched to it in total parameters and active FLOPs), built by
the same code as the demo, so their FLOPs per token match within the demo's
tolerance; a second setting scales the model to dim 512. A step is what the
trainer does: forward with the loss, backward, gradient clipping, the
optimizers' update, on random tokens of the demo's batch. Reported: tokens/s
of each and the ratio to dense measured in the same run (targets, issue 13:
memory >= 0.8, MoE >= 0.7).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from memlayers.bench.timing import round_ratios, time_rounds
from memlayers.demo.runner import demo_config
from memlayers.demo.suite import build_runs, largest_of_each_kind
from memlayers.model import Transformer
from memlayers.model.accounting import count_flops, count_parameters
from memlayers.train.config import DataConfig
from memlayers.train.optim import build_optimizer, clip_gradients, uses_row_grads

TARGETS = {"memory": 0.8, "moe": 0.7}
"""tokens/s of the kind over the dense LM's, at equal FLOPs per token."""
KINDS = ("dense", "memory", "moe")


@dataclass
class LMShape:
    """The settings compared: dotted overrides of the demo preset, per setting."""

    settings: dict[str, list[str]] = field(default_factory=lambda: {
        "demo (dim 64)": [],
        "dim 512": ["model.dim=512", "model.n_heads=8", "memory.k_dim=128", "big_dim=1024"],
    })
    batch_size: int | None = None
    """Rows per step (None: the preset's ``train.batch_size``)."""


def _step(run, vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> Callable[[], None]:
    """One training step of ``run``'s model on random tokens, as a function."""
    torch.manual_seed(0)
    config = run.config
    model = Transformer(config.model).to(device)
    if uses_row_grads(config.optim):
        for layer in model.memory_layers():
            layer.table_grad = "rows"
    optimizer = build_optimizer(model, config.optim)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=device)  # (B, L + 1)

    def step():
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        clip_gradients(optimizer, config.optim)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_lm(shape: LMShape, device: torch.device, repeat: int = 5) -> dict:
    """(f): tokens/s per kind and setting (the kinds' steps timed in turns), and each kind's ratio to dense."""
    settings = []
    for name, overrides in shape.settings.items():
        demo = demo_config(False, overrides)
        vocab_size = demo.vocab_size
        runs = largest_of_each_kind(build_runs(demo, DataConfig(), "unused", vocab_size))
        batch = shape.batch_size or demo.train.batch_size
        tokens = batch * demo.seq_len
        steps = {kind: _step(runs[kind], vocab_size, batch, demo.seq_len, device) for kind in KINDS}
        rounds = time_rounds(steps, device, repeat, warmup=2)
        rows = {}
        for kind in KINDS:
            model = runs[kind].config.model
            ms = statistics.median(rounds[kind])
            rows[kind] = {"run": runs[kind].name, "ms": ms, "tokens_per_s": tokens / (ms / 1e3),
                          "flops_per_token": count_flops(model).total, "params": count_parameters(model).total,
                          "value_optimizer": runs[kind].config.optim.value_optimizer}
        for kind, row in rows.items():
            # tokens/s over dense's = dense's step time over the kind's, round by round
            ratio = round_ratios(rounds["dense"], rounds[kind])
            row["vs_dense"], row["vs_dense_quartiles"] = ratio["median"], [ratio["q1"], ratio["q3"]]
            row["flops_vs_dense"] = row["flops_per_token"] / rows["dense"]["flops_per_token"]
            row["meets_target"] = row["vs_dense"] >= TARGETS[kind] if kind in TARGETS else None
        settings.append({"name": name, "overrides": overrides, "dim": demo.model.dim, "batch_size": batch,
                         "seq_len": demo.seq_len, "kinds": rows})
    return {"shape": asdict(shape), "targets": TARGETS, "settings": settings}
