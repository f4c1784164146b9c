"""Memory parallelism (the paper's): the value table sharded along its columns over a group.

Each rank of a memory-parallel group of ``M`` ranks holds ``V[:, cols_c]``, a
DTensor ``Shard(1)`` of the ``(N, d)`` table. A read of ``B`` tokens per rank:

1. all-gather the group's lookups (ids and weights, ``K`` per token);
2. each rank computes its column slice of the bag for all of the group's
   tokens with the ordinary kernels: ``(sum B, d / M)``;
3. an all-to-all returns to each rank its own tokens at full width ``(B, d)``.

The backward mirrors it: an all-to-all sends each column slice of the output
gradient to the rank that owns those columns, which forms the row gradient of
its shard (for every token of the group) and partial weight gradients
``grad . V[slot]`` over its columns; a last all-to-all returns the partials,
summed over the group. Key search, and everything else, stays local.

PEER's expert input table ``up`` ``(N, dim)`` is sharded the same way; its
dots (:class:`MemoryParallelDot`) send each rank the column slice of the
group's inputs that it owns, and an all-to-all returns the partial dots,
summed over the group.

The gradient of a shard is the sum over the group's tokens of each token's
local loss; :func:`reduce_value_grads` sums it over the data-parallel
replicas of the shard and divides by the world size, so that it is the
gradient of the mean loss over all ranks, as FSDP makes it for the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from memlayers.config import ConfigError
from memlayers.distributed.comm import all_gather_rows, all_to_all_rows, collective, gather_sizes
from memlayers.kernels.backends import ops_for
from memlayers.kernels.embedding_bag import over_bags, read_table_grad, row_grad_of
from memlayers.kernels.lookups import fixed_offsets


def gather_ids(ids: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's lookup ids ``(sizes[r], K)`` in rank order, as int64; they travel as
    int32 (half the bytes; :func:`shard_values` checks a table has fewer than 2**31 rows)."""
    return all_gather_rows(ids.to(torch.int32), sizes, group).long()


class MemoryParallelRead(torch.autograd.Function):
    """A fixed-size weighted bag over a column-sharded table (see the module docstring)."""

    @staticmethod
    def forward(ctx, indices, weights, local_table, table_ref, group, ops, table_grad):  # noqa: D102 (autograd hook)
        M = dist.get_world_size(group)
        B, K = indices.shape
        sizes = gather_sizes(B, group, indices.device)  # tokens of every rank of the group
        all_ids = gather_ids(indices, sizes, group)  # (sum B, K)
        all_weights = all_gather_rows(weights.float(), sizes, group)  # (sum B, K)
        total = sum(sizes)
        cols = ops.bag(local_table, all_ids.reshape(-1), all_weights.reshape(-1), fixed_offsets(total, K, indices.device))
        mine = all_to_all_rows(cols, send=sizes, recv=[B] * M, group=group)  # (M * B, d/M), by column shard
        out = mine.view(M, B, -1).transpose(0, 1).reshape(B, -1)  # (B, d)
        ctx.save_for_backward(all_ids, all_weights, local_table)
        ctx.sizes, ctx.group, ctx.ops, ctx.table_grad, ctx.table_ref = sizes, group, ops, table_grad, table_ref
        return out.to(local_table.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 (autograd hook)
        all_ids, all_weights, local_table = ctx.saved_tensors
        group, sizes, ops = ctx.group, ctx.sizes, ctx.ops
        M, B = len(sizes), grad_out.shape[0]
        grad_out = grad_out.float()
        # column slice c of my tokens' gradient goes to rank c
        send = grad_out.view(B, M, -1).transpose(0, 1).reshape(M * B, -1)  # (M * B, d/M)
        grad_cols = all_to_all_rows(send, send=[B] * M, recv=sizes, group=group)  # (sum B, d/M): all tokens, my columns
        grad_weights = grad_table = None
        if ctx.needs_input_grad[1]:
            partial = ops.bag_dot(local_table, all_ids, grad_cols)  # (sum B, K) over my columns
            back = all_to_all_rows(partial, send=sizes, recv=[B] * M, group=group)  # (M * B, K)
            grad_weights = back.view(M, B, -1).sum(0)  # (B, K)
        if ctx.table_grad == "rows" or ctx.needs_input_grad[2]:
            grad_table = read_table_grad(
                ctx.table_grad, ctx.table_ref[0], local_table.shape[0], all_ids, all_weights, grad_cols, ops, local_table.dtype
            )  # (N, d/M) or None (rows)
        return None, grad_weights, grad_table, None, None, None, None


class MemoryParallelDot(torch.autograd.Function):
    """PEER's input projections over a column-sharded ``up`` table:
    ``out[b, k] = up[ids[b, k]] . x[b]``, each rank dotting its columns."""

    @staticmethod
    def forward(ctx, indices, x, local_up, table_ref, group, ops, table_grad):  # noqa: D102 (autograd hook)
        M = dist.get_world_size(group)
        B, _ = indices.shape
        sizes = gather_sizes(B, group, indices.device)
        all_ids = gather_ids(indices, sizes, group)  # (sum B, K)
        # column slice c of my tokens' inputs goes to rank c, which owns those columns of up
        send = x.float().view(B, M, -1).transpose(0, 1).reshape(M * B, -1)  # (M * B, dim/M)
        x_cols = all_to_all_rows(send, send=[B] * M, recv=sizes, group=group)  # (sum B, dim/M)
        partial = ops.bag_dot(local_up, all_ids, x_cols)  # (sum B, K) over my columns
        back = all_to_all_rows(partial, send=sizes, recv=[B] * M, group=group)  # (M * B, K)
        ctx.save_for_backward(all_ids, x_cols, local_up)
        ctx.sizes, ctx.group, ctx.ops, ctx.table_grad, ctx.table_ref = sizes, group, ops, table_grad, table_ref
        ctx.x_dtype = x.dtype
        return back.view(M, B, -1).sum(0)  # (B, K)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 (autograd hook)
        all_ids, x_cols, local_up = ctx.saved_tensors
        group, sizes, ops = ctx.group, ctx.sizes, ctx.ops
        M, (B, K) = len(sizes), grad_out.shape
        all_grad = all_gather_rows(grad_out.float().contiguous(), sizes, group)  # (sum B, K): every token's
        grad_x = grad_up = None
        if ctx.needs_input_grad[1]:  # dx[b, my cols] = sum_k grad[b, k] * up[ids[b, k], my cols]
            offsets = fixed_offsets(sum(sizes), K, all_ids.device)
            cols = ops.bag(local_up, all_ids.reshape(-1), all_grad.reshape(-1), offsets)  # (sum B, dim/M)
            mine = all_to_all_rows(cols.float(), send=sizes, recv=[B] * M, group=group)  # (M * B, dim/M)
            grad_x = mine.view(M, B, -1).transpose(0, 1).reshape(B, -1).to(ctx.x_dtype)  # (B, dim)
        if ctx.needs_input_grad[2]:
            grad_up = read_table_grad(
                ctx.table_grad, ctx.table_ref[0], local_up.shape[0], all_ids, all_grad, x_cols, ops, local_up.dtype
            )  # (N, dim/M) or None (rows)
        return None, grad_x, grad_up, None, None, None, None


def _local_ops(table: torch.Tensor, backend: str, table_grad: str, detach_rows: bool = True) -> tuple[torch.Tensor, type]:
    """The local shard of a DTensor table and the kernels for it. With ``detach_rows``
    a table whose gradient is kept as rows is passed detached: its gradient comes from
    ``table_ref``, never through autograd."""
    if not isinstance(table, DTensor):
        raise TypeError("a memory-parallel read needs the table as a DTensor (see shard_values)")
    local = table.to_local().detach() if table_grad == "rows" and detach_rows else table.to_local()  # (N, d/M)
    return local, ops_for(backend, local, table_grad)


class MemoryParallelReader:
    """Reads a ``Shard(1)`` DTensor table over its mesh's group; a drop-in for
    :func:`memlayers.kernels.embedding_bag` as a memory layer's ``value_reader``."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(
        self,
        indices: torch.Tensor,
        weights: torch.Tensor,
        table: torch.Tensor,
        backend: str = "auto",
        table_grad: str = "dense",
    ) -> torch.Tensor:
        """``(..., K)`` lookups into the sharded ``table`` -> ``(..., d)`` full-width rows."""
        local, ops = _local_ops(table, backend, table_grad)
        return over_bags(MemoryParallelRead.apply, indices, weights, local, (table,), self.group, ops, table_grad)

    def dot(
        self,
        indices: torch.Tensor,
        table: torch.Tensor,
        x: torch.Tensor,
        backend: str = "auto",
        table_grad: str = "dense",
    ) -> torch.Tensor:
        """``(..., K)`` lookups into the sharded PEER ``table`` dotted with ``x`` ``(..., dim)`` -> ``(..., K)``;
        a drop-in for :func:`memlayers.kernels.embedding_dot` as a layer's ``dot_reader``."""
        # attached even for row gradients: the dot's backward must run when x needs no gradient
        local, ops = _local_ops(table, backend, table_grad, detach_rows=False)
        lead, K = indices.shape[:-1], indices.shape[-1]
        out = MemoryParallelDot.apply(
            indices.reshape(-1, K), x.reshape(-1, x.shape[-1]), local, (table,), self.group, ops, table_grad
        )  # (B, K)
        return out.reshape(*lead, K)


def value_pools(model: nn.Module) -> list[nn.Module]:
    """The distinct value pools read by the model's memory layers."""
    from memlayers.memory import MemoryLayer

    pools = {id(layer.pool): layer.pool for layer in model.modules() if isinstance(layer, MemoryLayer)}
    return list(pools.values())


def shard_values(model: nn.Module, mesh: DeviceMesh, scatter: bool = True) -> list[nn.Parameter]:
    """Shard every value table of ``model`` (and PEER's ``up`` tables) along its columns over
    ``mesh`` (1-D, the memory-parallel group) and make its memory layers read through
    them; returns the tables. ``scatter``: the group's first rank sends each rank its
    columns; else each rank keeps its columns of its own table (which may be on the meta
    device, to be filled later: :mod:`~memlayers.distributed.rank0_init`)."""
    from memlayers.memory import MemoryLayer

    M = mesh.size()
    tables = []
    for pool in value_pools(model):
        if pool.values.shape[0] >= 2**31:
            raise ConfigError("model.memory.n_keys", f"a memory-parallel table needs fewer than 2**31 rows (ids travel as int32), got {pool.values.shape[0]}")
        for name in ("values", "up"):  # PEER's pool has its input projections as a second table
            table = getattr(pool, name)
            if table is None:
                continue
            if table.shape[1] % M:
                raise ConfigError("parallel.memory_parallel", f"must divide the width {table.shape[1]} of the {name} table, got {M}")
            sharded = distribute_tensor(table.detach(), mesh, [Shard(1)], src_data_rank=0 if scatter else None)
            setattr(pool, name, nn.Parameter(sharded))
            tables.append(getattr(pool, name))
    reader = MemoryParallelReader(mesh.get_group())
    for layer in model.modules():
        if isinstance(layer, MemoryLayer):
            layer.value_reader = reader
            layer.dot_reader = reader.dot
    return tables


@torch.no_grad()
def reduce_value_grads(tables: list[nn.Parameter], replicas: dist.ProcessGroup | None, world_size: int) -> None:
    """Sum each shard's gradient over its data-parallel ``replicas`` and divide by ``world_size``.

    Row gradients are reduced by gathering their factors (lookups, weights,
    output-gradient slices) from every replica, so nothing dense is formed.
    """
    replicated = replicas is not None and dist.get_world_size(replicas) > 1
    for table in tables:
        rows = row_grad_of(table)
        if rows is not None:
            if replicated:
                gathered = []
                for ids, weights, grad_out in rows.parts:
                    sizes = gather_sizes(ids.shape[0], replicas, ids.device)
                    all_ids = gather_ids(ids, sizes, replicas)
                    gathered.append((all_ids, *(all_gather_rows(t, sizes, replicas) for t in (weights, grad_out))))
                rows.replace_parts(gathered)
            rows.scale /= world_size
        elif table.grad is not None:
            local = table.grad.to_local() if isinstance(table.grad, DTensor) else table.grad
            if replicated:
                with collective("all-reduce of value-table gradients"):
                    dist.all_reduce(local, group=replicas)
            local.div_(world_size)
