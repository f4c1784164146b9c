"""torchrun worker for tests/distributed/test_memory_parallel.py.

Every rank builds the same model and the same global batch (same seeds), runs
the single-process reference on the whole batch itself, then the distributed
version on its own slice, and writes the largest differences to
``OUT/rank<r>.json``. The test reads them; nothing is asserted here, so a
failure shows its numbers.

    torchrun --nproc-per-node N worker_memory_parallel.py OUT MEMORY_PARALLEL TABLE_GRAD VARIANT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from memlayers.distributed import (
    ParallelConfig,
    build_mesh,
    init_distributed,
    parallelize,
    shard_values,
    shutdown,
)
from memlayers.distributed.memory_parallel import reduce_value_grads
from memlayers.kernels import row_grad_of
from memlayers.memory import MemoryConfig, MemoryLayer
from memlayers.model.config import ModelConfig
from memlayers.model.transformer import Transformer
from memlayers.train.optim import OptimConfig, build_optimizer

TOKENS_PER_RANK, DIM, STEPS = 6, 16, 3


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def table_grad_tensor(table: torch.Tensor) -> torch.Tensor:
    """A table's gradient as a dense local tensor, whichever form it has."""
    rows = row_grad_of(table)
    if rows is not None:
        return rows.to_dense()
    grad = table.grad
    return grad.to_local() if hasattr(grad, "to_local") else grad


def layer_check(rank: int, world: int, mesh, table_grad: str, variant: str) -> dict:
    """One memory layer: outputs and every gradient against the single-process layer."""
    torch.manual_seed(0)
    memory = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, qk_norm=True, variant=variant)
    reference = MemoryLayer(DIM, memory)
    layer = MemoryLayer(DIM, memory, table_grad=table_grad)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(world * TOKENS_PER_RANK, DIM)
    g = torch.randn(world * TOKENS_PER_RANK, DIM)
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

    (reference(x) * g).sum().backward()  # the loss summed over all ranks' tokens
    tables = shard_values(layer, mesh["mp"])
    out = layer(x[mine])
    (out * g[mine]).sum().backward()
    reduce_value_grads(tables, mesh["dp"].get_group(), world)
    sharded = {id(t) for t in tables}
    for p in layer.parameters():  # the rest: sum the local gradients over all ranks
        if p.grad is not None and id(p) not in sharded:
            dist.all_reduce(p.grad)
    mp_rank, M = mesh["mp"].get_local_rank(), mesh["mp"].size()
    ref_params = dict(reference.named_parameters())
    result = {"out": max_diff(out, reference(x)[mine])}
    for name, table in zip(("values", "up"), tables, strict=False):  # PEER shards its up table too
        full = ref_params[f"pool.{name}"].grad
        cols = slice(mp_rank * full.shape[1] // M, (mp_rank + 1) * full.shape[1] // M)
        result["table_grad" if name == "values" else f"table_grad/{name}"] = max_diff(table_grad_tensor(table) * world, full[:, cols])
    for name, p in layer.named_parameters():
        if id(p) not in sharded:
            result[f"grad/{name}"] = max_diff(p.grad, ref_params[name].grad)
    return result


def training_check(rank: int, world: int, config: ParallelConfig, value_optimizer: str, variant: str) -> dict:
    """A few steps of FSDP2 + memory parallelism against one process on the whole batch."""
    torch.manual_seed(1)
    model_config = ModelConfig(
        dim=DIM, n_layers=2, n_heads=2, vocab_size=40, multiple_of=16, max_seq_len=16, memory_layers=(1,),
        memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, qk_norm=True, variant=variant),
    )
    optim = OptimConfig(lr=1e-2, value_lr=3e-2, value_optimizer=value_optimizer, weight_decay=0.0)
    reference = Transformer(model_config)
    model = Transformer(model_config)
    model.load_state_dict(reference.state_dict())
    ref_opt = build_optimizer(reference, optim)
    device = torch.device("cpu")
    if value_optimizer != "adamw":
        for m in (reference, model):
            for layer in m.memory_layers():
                layer.table_grad = "rows"
    mesh = build_mesh(config, device)
    parallelize(model, mesh, config)
    opt = build_optimizer(model, optim)
    from memlayers.distributed import sync_value_grads

    losses, diffs = [], []
    for step in range(STEPS):
        tokens = torch.randint(0, 40, (world * 2, 9), generator=torch.Generator().manual_seed(step))
        ref_loss = reference(tokens[:, :-1], tokens[:, 1:]).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        mine = tokens[rank * 2 : (rank + 1) * 2]
        loss = model(mine[:, :-1], mine[:, 1:]).loss
        loss.backward()
        sync_value_grads(model)
        opt.step()
        opt.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append((float(mean_loss) / world, float(ref_loss.detach())))
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        diffs.append((name, max_diff(full, ref_params[name])))
    return {"losses": losses, "param_diffs": dict(diffs)}


def main() -> None:
    out_dir, memory_parallel, table_grad, variant = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ParallelConfig(memory_parallel=memory_parallel)
    mesh = build_mesh(config, torch.device("cpu"))
    result = {"rank": rank, "world": world, "layer": layer_check(rank, world, mesh, table_grad, variant)}
    result["training"] = training_check(rank, world, config, "row_adamw" if table_grad == "rows" else "adamw", variant)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
