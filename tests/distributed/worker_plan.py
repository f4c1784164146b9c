"""torchrun worker for tests/distributed/test_plan.py: the bytes each rank really holds.

For every case (a JSON list of dotted-override lists of a RunConfig) every rank
builds the model, parallelizes it as the trainer does (FSDP2 + memory
parallelism over ``parallel.memory_parallel``), builds the optimizer, runs
one step and writes the bytes of its local parameter shards, gradients and
optimizer state to ``OUT/rank<r>.json``. The test compares them with the plan.

    torchrun --nproc-per-node N worker_plan.py OUT CASES_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from memlayers.config import load_config
from memlayers.distributed import (
    build_mesh,
    init_distributed,
    parallelize,
    shutdown,
    sync_value_grads,
)
from memlayers.kernels import row_grad_of
from memlayers.model.transformer import Transformer
from memlayers.train.config import RunConfig
from memlayers.train.optim import build_optimizer, uses_row_grads


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, of its local shard for a DTensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def measure(overrides: list[str], rank: int) -> dict:
    """Parallelize the config's model, step once, and count what this rank holds."""
    config = load_config(RunConfig, None, overrides)
    torch.manual_seed(0)
    model = Transformer(config.model)
    if uses_row_grads(config.optim):
        for layer in model.memory_layers():
            layer.table_grad = "rows"
    mesh = build_mesh(config.parallel, torch.device("cpu"))
    tables = {id(t) for t in parallelize(model, mesh, config.parallel)}
    optimizer = build_optimizer(model, config.optim)
    B, T = config.train.batch_size, config.data.seq_len
    tokens = torch.randint(0, config.model.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(rank))
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    sync_value_grads(model)
    optimizer.step()

    result = {"mp_index": mesh["mp"].get_local_rank(), "buffers": sum(nbytes(b) for b in model.buffers())}
    for kind in ("dense", "value"):
        params = [p for p in model.parameters() if (id(p) in tables) == (kind == "value")]
        result[f"{kind}_params"] = sum(nbytes(p) for p in params)
        grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
        for p in params:
            rows = row_grad_of(p)
            if rows is not None:
                grads += sum(nbytes(t) for part in rows.parts for t in part)
        result[f"{kind}_grads"] = grads
        state = [s for p in params for s in getattr(optimizer, "state", {}).get(p, {}).items()]
        # torch's AdamW keeps `step` as a 0-d float32 tensor, on the host on GPUs (not capturable)
        result[f"{kind}_optimizer"] = sum(nbytes(t) for name, t in state if name != "step")
        result[f"{kind}_adamw_steps"] = [nbytes(t) for name, t in state if name == "step"]
        result[f"{kind}_tensors"] = len(params)
    optimizer.zero_grad()
    return result


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = [measure(overrides, rank) for overrides in cases]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
