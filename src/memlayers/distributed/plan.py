"""Will a run fit on its GPUs, and how long will a step take: a per-GPU plan of FSDP2 + memory parallelism.

Everything is per rank, for the rank that holds the most (the first of its
shard group), in bytes, as :func:`memlayers.distributed.parallelize` lays the
model out over a ``("dp", "mp")`` mesh of ``world = dp * mp`` ranks:

- dense parameters are FSDP2-sharded over the ``mp`` dimension only and
  replicated over ``dp`` (hybrid sharding): with ``memory_parallel = 1`` every
  rank holds all of them. FSDP2 splits each parameter's dim 0 into chunks of
  ``ceil(rows / mp)`` (:func:`fsdp_shard_numel`); gradients are the same
  shards (float32), AdamW's two moments too (its ``step`` counter is a host
  scalar on GPUs, not counted);
- value tables (and PEER's ``up``) are column-sharded over ``mp``:
  ``rows x width / mp`` each, outside FSDP. Their gradient is a dense shard
  (``value_optimizer: adamw``) or the row-gradient factors of every read of
  the step, gathered from the ``dp`` replicas: per read ``world * tokens``
  rows of int64 ids, float32 weights (``heads * knn`` each) and float32
  output gradients (``width / mp``). Their optimizer state is what the chosen
  optimizer allocates: AdamW two moments of the shard in the table's dtype,
  ``row_adamw`` two moments in ``value_state_dtype`` plus an int32 step per
  row, ``row_adagrad`` a float32 per row, ``row_sgd`` nothing.

Those are exact (a multi-process test compares them with real shards).
Activations are an estimate per token, with ``p`` the bytes of an activation
(2 in bf16), ``d`` = dim, ``d_kv`` the key/value width, ``f`` the FFN hidden
size, ``K = heads * knn``, ``v`` the value width and ``M`` = memory_parallel:

    attention     p (5 d + 2 d_kv) + 4 n_heads   norm in/out, roped q, k, v,
                                                 output and its copy, logsumexp
    dense FFN     p (2 d + 4 f)                  norm in/out, w1 x, silu, w3 x, product
    MoE           p 2 d + 4 n_experts + top_k p (d + 4 h_expert)
    memory        p (2 d + H k_dim [x2 with qk_norm]) + 28 K + 12 M K + p 4 v (Memory+;
                  plain: p v when projected; PEER: 12 M K + 4 d + 8 K more; gate: 2 p)
                  norm in/out, queries, the search's sub-key and slot ids, softmax
                  weights, the group's gathered lookups, y, W_1 x, silu, product
    head          p 2 d + 4 V + 16                 final norm, log-softmax (float32), ids

summed over the blocks, or with activation checkpointing ``p d`` per block
(its input) plus one block's own. Transients (freed within a layer) are the
largest of: a memory layer's sub-key scores ``p H 2 n_keys`` and bag outputs
``8 v``, the head's logits and their float32 copy ``(p + 4) V``; plus
FSDP2's unsharded buffers (the root unit and two blocks' parameters in the
compute dtype, the root's and one block's gradients) and, with dense value
gradients, one read's fresh gradient shard. A reserve for the CUDA context
and allocator slack is added.

Communication is what each rank receives from other ranks per optimizer
step: FSDP2 all-gathers every block twice (forward, backward) and the root
once, reduce-scatters gradients in float32 within ``mp`` and all-reduces them
over ``dp``, every micro-batch; each memory read moves
:func:`memlayers.bench.comm.analytic_bytes` (its own share excepted: ``(M -
1) / M`` of it; PEER's input dots move the same bytes as a read of width
dim); value gradients are all-reduced (dense) or their factors all-gathered
(rows) over ``dp`` once a step. Groups within one node use NVLink, others the
inter-node link. The step time is ``max(compute, value traffic) +
communication`` (no overlap): compute is ``3x`` the forward FLOPs of
:func:`memlayers.model.accounting.count_flops` (``4x`` with checkpointing) at
``mfu`` of the GPU's peak; value traffic is the HBM bytes of the reads (the
bag forward, its backward, and a dense gradient's scatter) and of the value
optimizer's update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from memlayers.config import check
from memlayers.model.accounting import count_flops
from memlayers.model.config import ModelConfig
from memlayers.train.config import RunConfig

GB = 1e9
"""Memory, bandwidth and traffic are in GB = 10^9 bytes (as GPU datasheets count them)."""


@dataclass(frozen=True)
class GPU:
    """A GPU's assumed capabilities (datasheet numbers; each can be overridden)."""

    name: str
    memory_gb: float
    bf16_tflops: float
    """Peak dense bfloat16 throughput, 10^12 FLOP/s."""
    hbm_tb_s: float
    """Memory bandwidth, 10^12 bytes/s."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU and direction, 10^9 bytes/s."""


GPUS = {
    "h100": GPU("h100", 80, 989, 3.35, 450),
    "a100": GPU("a100", 80, 312, 2.0, 300),
    "h200": GPU("h200", 141, 989, 4.8, 450),
}


@dataclass(frozen=True)
class Cluster:
    """The machines a run is planned for, and the assumptions of its step time."""

    gpu: GPU
    gpus_per_node: int
    nodes: int = 1
    inter_node_gb_s: float = 50.0
    """Bandwidth between nodes per GPU and direction, 10^9 bytes/s."""
    mfu: float = 0.4
    """Fraction of the peak FLOP/s a step reaches."""
    reserve_gb: float = 2.0
    """Kept free for the CUDA context, the allocator's slack and kernel workspaces."""

    def __post_init__(self) -> None:
        check(self.gpus_per_node >= 1, "--gpus", f"must be >= 1, got {self.gpus_per_node}")
        check(self.nodes >= 1, "--nodes", f"must be >= 1, got {self.nodes}")
        check(0 < self.mfu <= 1, "--mfu", f"must be in (0, 1], got {self.mfu}")
        check(self.reserve_gb >= 0, "--reserve-gb", f"must be >= 0, got {self.reserve_gb}")
        for flag, value in (("--gpu-memory", self.gpu.memory_gb), ("--tflops", self.gpu.bf16_tflops),
                            ("--hbm-tb-s", self.gpu.hbm_tb_s), ("--nvlink-gb-s", self.gpu.nvlink_gb_s),
                            ("--inter-node-gb-s", self.inter_node_gb_s)):
            check(value > 0, flag, f"must be > 0, got {value}")

    @property
    def world(self) -> int:
        """All ranks: one per GPU."""
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class ParamShape:
    """One parameter: its shape and bytes per element."""

    shape: tuple[int, ...]
    element_size: int


@dataclass(frozen=True)
class ModelShapes:
    """A model's parameters as :func:`parallelize` splits them."""

    blocks: tuple[tuple[ParamShape, ...], ...]
    """One FSDP unit per transformer block."""
    root: tuple[ParamShape, ...]
    """The root FSDP unit: embeddings, final norm, output head."""
    tables: tuple[ParamShape, ...]
    """Value tables (and PEER's ``up`` tables): column-sharded, outside FSDP."""
    reads: tuple[int, ...]
    """The table (index into ``tables``) of every read of one forward pass."""
    buffer_bytes: int
    """Buffers every rank holds whole (the rotary tables)."""


def model_shapes(config: ModelConfig) -> ModelShapes:
    """The parameter shapes of the model ``config`` builds (built on the meta device: no memory)."""
    from memlayers.distributed.memory_parallel import value_pools
    from memlayers.model.transformer import Transformer

    check(not config.memory.quantized, "model.memory.value_dtype",
          "int8 and int4 value tables are for inference: train in float32 or bfloat16")
    with torch.device("meta"):
        model = Transformer(config)
    pools = value_pools(model)
    tables = [t for pool in pools for t in (pool.values, pool.up) if t is not None]
    index = {id(t): i for i, t in enumerate(tables)}

    def shapes(params) -> tuple[ParamShape, ...]:
        return tuple(ParamShape(tuple(p.shape), p.element_size()) for p in params if id(p) not in index)

    in_blocks = {id(p) for block in model.layers for p in block.parameters()}
    reads = tuple(index[id(t)] for layer in model.memory_layers() for t in (layer.pool.values, layer.pool.up)
                  if t is not None)
    return ModelShapes(
        blocks=tuple(shapes(block.parameters()) for block in model.layers),
        root=shapes(p for p in model.parameters() if id(p) not in in_blocks),
        tables=tuple(ParamShape(tuple(t.shape), t.element_size()) for t in tables),
        reads=reads,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
    )


def fsdp_shard_numel(shape: tuple[int, ...], shards: int, index: int) -> int:
    """Elements of a parameter that rank ``index`` of an FSDP2 group of ``shards`` ranks holds.

    FSDP2 splits dim 0 as ``torch.chunk`` does, into chunks of ``ceil(rows / shards)``
    rows: the last ranks get fewer rows or none (its all-gathers pad every shard to
    the first's size, so index 0 is also what each rank sends).
    """
    rows = shape[0]
    chunk = -(-rows // shards)
    return max(0, min(chunk, rows - index * chunk)) * math.prod(shape[1:])


def dense_shard_bytes(shapes: ModelShapes, shards: int, index: int) -> int:
    """Bytes of rank ``index``'s shard of all FSDP-sharded (dense) parameters."""
    units = (*shapes.blocks, shapes.root)
    return sum(fsdp_shard_numel(p.shape, shards, index) * p.element_size for unit in units for p in unit)


def _unit_numel(unit: tuple[ParamShape, ...], shards: int) -> int:
    """Elements of a unit all-gathered (padded shards)."""
    return shards * sum(fsdp_shard_numel(p.shape, shards, 0) for p in unit)


class _Summed:
    """A dataclass of byte (or second) counts whose ``total`` is the sum of its fields."""

    @property
    def total(self) -> float:
        """All of it."""
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class MemoryBytes(_Summed):
    """Bytes per GPU (the fullest rank); the first seven are exact, the rest estimates;
    ``total`` is the peak a step reaches."""

    dense_params: int
    dense_grads: int
    dense_optimizer: int
    buffers: int
    value_params: int
    value_grads: int
    value_optimizer: int
    activations: float
    transient: float
    reserve: float


@dataclass(frozen=True)
class Communication(_Summed):
    """Bytes each rank receives from other ranks per optimizer step."""

    fsdp_all_gather: float
    fsdp_reduce_scatter: float
    dense_all_reduce: float
    """Dense gradients over the ``dp`` replicas (hybrid sharding), once per optimizer step."""
    memory_reads: float
    """Memory-parallel reads: lookups all-gathered, rows all-to-all (bench/comm.py)."""
    value_grad_sync: float
    """Value gradients over the ``dp`` replicas."""


@dataclass(frozen=True)
class StepTime:
    """Estimated seconds of one optimizer step (see the module docstring)."""

    compute: float
    value_traffic: float
    communication: float

    @property
    def step(self) -> float:
        """max(compute, value traffic) + communication."""
        return max(self.compute, self.value_traffic) + self.communication


@dataclass(frozen=True)
class Plan:
    """The per-GPU plan of one layout."""

    world: int
    memory_parallel: int
    data_parallel: int
    micro_batch: int
    """Sequences per micro-batch per GPU."""
    seq_len: int
    grad_accum: int
    value_optimizer: str
    activation_checkpointing: bool
    memory: MemoryBytes
    communication: Communication
    flops_per_token: float
    """Forward FLOPs per token."""
    time: StepTime
    gpu_bytes: float

    @property
    def fits(self) -> bool:
        """True when the peak fits in the GPU's memory."""
        return self.memory.total <= self.gpu_bytes

    @property
    def tokens_per_second(self) -> float:
        """Tokens the whole job trains on per second."""
        return self.world * self.grad_accum * self.micro_batch * self.seq_len / self.time.step


def check_layout(shapes: ModelShapes, world: int, memory_parallel: int) -> None:
    """Raise ConfigError unless ``memory_parallel`` can shard ``world`` ranks and every table."""
    key = "parallel.memory_parallel"
    check(memory_parallel >= 1, key, f"must be >= 1, got {memory_parallel}")
    check(world % memory_parallel == 0, key, f"must divide the number of ranks {world}, got {memory_parallel}")
    for table in shapes.tables:
        check(table.shape[1] % memory_parallel == 0, key,
              f"must divide the width {table.shape[1]} of the value tables, got {memory_parallel}")


def _activation_bytes(c: ModelConfig, layer: int, p: int, M: int) -> tuple[float, float]:
    """``(saved, transient)`` bytes per token of block ``layer`` (module docstring)."""
    d, f, m = c.dim, c.ffn_hidden, c.memory
    saved = p * (5 * d + 2 * c.kv_heads * c.head_dim) + 4 * c.n_heads
    dense_ffn = p * (2 * d + 4 * f)
    kind = c.ffn_kind(layer)
    if kind == "dense":
        return saved + dense_ffn, 0.0
    if kind == "moe":
        return saved + p * 2 * d + 4 * c.moe.n_experts + c.moe.top_k * p * (d + 4 * c.expert_hidden), 0.0
    K, v = m.heads * m.knn, m.resolved_value_dim(d)
    memory = p * (2 * d + m.heads * m.k_dim * (2 if m.qk_norm else 1)) + 28 * K + 12 * M * K
    if m.variant == "plus":
        memory += 4 * p * v
    elif m.variant == "plain" and v != d:
        memory += p * v
    elif m.variant == "peer":
        memory += 12 * M * K + 4 * d + 8 * K
    if m.gated:
        memory += 2 * p
    if c.memory_mode == "parallel":  # beside the dense FFN, sharing its norm
        memory += dense_ffn - p * 2 * d
    return saved + memory, p * m.heads * 2 * m.n_keys + 8 * v


def _activations(config: RunConfig, p: int, checkpointing: bool) -> tuple[float, float]:
    """``(saved, transient)`` activation bytes of one micro-batch per GPU."""
    c = config.model
    tokens = config.train.batch_size * config.data.seq_len
    layers = [_activation_bytes(c, i, p, config.parallel.memory_parallel) for i in range(c.n_layers)]
    head_saved, head_transient = p * 2 * c.dim + 4 * c.vocab_size + 16, (p + 4) * c.vocab_size
    blocks = c.n_layers * p * c.dim + max(s for s, _ in layers) if checkpointing else sum(s for s, _ in layers)
    return tokens * (blocks + head_saved), tokens * max(head_transient, *(t for _, t in layers))


def _value_state_bytes(config: RunConfig, table: ParamShape, M: int) -> int:
    """Bytes of the value optimizer's state for one table's shard."""
    rows, shard = table.shape[0], table.shape[0] * table.shape[1] // M
    optimizer = config.optim.value_optimizer
    if optimizer == "adamw":
        return 2 * shard * table.element_size
    if optimizer == "row_adamw":
        state = 2 if config.optim.value_state_dtype == "bfloat16" else 4
        return 2 * shard * state + 4 * rows
    return 4 * rows if optimizer == "row_adagrad" else 0


def plan(config: RunConfig, cluster: Cluster, shapes: ModelShapes | None = None) -> Plan:
    """The plan of ``config`` on ``cluster``, with ``config.parallel.memory_parallel`` ranks per table
    and activation checkpointing as ``config.parallel.activation_checkpointing`` says.

    ``shapes`` (from :func:`model_shapes` of ``config.model``) saves building the model again.
    """
    # memlayers.bench's package imports the demo, which imports the trainer, which imports GPUS from here
    from memlayers.bench.comm import CommShape, analytic_bytes

    shapes = model_shapes(config.model) if shapes is None else shapes
    activation_checkpointing = config.parallel.activation_checkpointing
    world, M = cluster.world, config.parallel.memory_parallel
    check_layout(shapes, world, M)
    R, A = world // M, config.train.grad_accum
    tokens = config.train.batch_size * config.data.seq_len  # per micro-batch per GPU
    m = config.model.memory
    K = m.heads * m.knn
    mixed = config.parallel.mixed_precision
    p = 4 if config.train.precision == "float32" and not mixed else 2  # an activation's bytes
    c = 2 if mixed else 4  # FSDP2's compute dtype (bfloat16 parameters on GPUs)
    dense = dense_shard_bytes(shapes, M, 0)
    dense_numel = sum(fsdp_shard_numel(q.shape, M, 0) for unit in (*shapes.blocks, shapes.root) for q in unit)
    rows_grads = config.optim.value_optimizer != "adamw"
    value_params = sum(t.shape[0] * t.shape[1] // M * t.element_size for t in shapes.tables)
    factor_row = [12 * K + 4 * shapes.tables[i].shape[1] // M for i in shapes.reads]  # bytes per gathered row
    value_grads = A * world * tokens * sum(factor_row) if rows_grads else value_params

    saved, transient = _activations(config, p, activation_checkpointing)
    root = _unit_numel(shapes.root, M)
    block = max((_unit_numel(b, M) for b in shapes.blocks), default=0)
    # the root's and two blocks' gathered parameters, the root's gradients, and one block's
    # gradients plus, when they are bfloat16, their float32 copy for the reduce-scatter
    fsdp_buffers = c * (2 * root + 2 * block) + (c + 4 if mixed else 4) * block
    fresh_grad = max((t.shape[0] * t.shape[1] // M * t.element_size for t in shapes.tables), default=0)
    memory = MemoryBytes(
        dense_params=dense, dense_grads=dense, dense_optimizer=2 * dense, buffers=shapes.buffer_bytes,
        value_params=value_params, value_grads=value_grads,
        value_optimizer=sum(_value_state_bytes(config, t, M) for t in shapes.tables),
        activations=saved, transient=transient + fsdp_buffers + (0 if rows_grads else fresh_grad),
        reserve=cluster.reserve_gb * GB,
    )

    reads = sum(analytic_bytes(CommShape(n_keys=m.n_keys, dim=shapes.tables[i].shape[1], heads=m.heads, knn=m.knn,
                                         k_dim=m.k_dim, tokens=tokens), M) for i in shapes.reads)
    if R == 1:
        value_sync = 0.0
    elif rows_grads:  # ids travel as int32
        value_sync = A * (R - 1) * sum(8 + M * tokens * (8 * K + 4 * shapes.tables[i].shape[1] // M) for i in shapes.reads)
    else:
        value_sync = 2 * (R - 1) / R * value_params
    gathers = shapes.root, *shapes.blocks, *shapes.blocks  # blocks twice: resharded after the forward
    comm = Communication(
        fsdp_all_gather=A * (M - 1) * c * sum(_unit_numel(u, M) // M for u in gathers),
        fsdp_reduce_scatter=A * (M - 1) * 4 * dense_numel,
        dense_all_reduce=2 * (R - 1) / R * 4 * dense_numel,  # once per step, after the last micro-batch
        memory_reads=A * reads * (M - 1) / M,
        value_grad_sync=value_sync,
    )

    nvlink, inter = cluster.gpu.nvlink_gb_s * GB, cluster.inter_node_gb_s * GB
    mp_link = nvlink if cluster.nodes == 1 or cluster.gpus_per_node % M == 0 else inter
    dp_link = nvlink if cluster.nodes == 1 else inter
    forward = count_flops(config.model, config.data.seq_len).total
    compute = (4 if activation_checkpointing else 3) * forward * A * tokens / (cluster.mfu * cluster.gpu.bf16_tflops * 1e12)
    time = StepTime(
        compute=compute,
        value_traffic=_value_traffic(config, shapes, world, tokens) / (cluster.gpu.hbm_tb_s * 1e12),
        communication=(comm.fsdp_all_gather + comm.fsdp_reduce_scatter + comm.memory_reads) / mp_link
        + (comm.dense_all_reduce + comm.value_grad_sync) / dp_link,
    )
    return Plan(world=world, memory_parallel=M, data_parallel=R, micro_batch=config.train.batch_size,
                seq_len=config.data.seq_len, grad_accum=A, value_optimizer=config.optim.value_optimizer,
                activation_checkpointing=activation_checkpointing, memory=memory, communication=comm,
                flops_per_token=forward, time=time, gpu_bytes=cluster.gpu.memory_gb * GB)


def _value_traffic(config: RunConfig, shapes: ModelShapes, world: int, tokens: int) -> float:
    """HBM bytes per step per GPU of the value tables: each read's rows (forward, backward,
    and a dense gradient's scatter) and the value optimizer's update."""
    M, A, m, optim = config.parallel.memory_parallel, config.train.grad_accum, config.model.memory, config.optim
    K = m.heads * m.knn
    passes = 2 if optim.value_optimizer != "adamw" else 3
    total = 0.0
    for i, table in enumerate(shapes.tables):
        rows, width, e = table.shape[0], table.shape[1] // M, table.element_size
        readers = shapes.reads.count(i)
        total += A * readers * M * tokens * K * width * e * passes  # the group's tokens, my columns
        if optim.value_optimizer == "adamw":  # every element: parameter, gradient and two moments
            total += rows * width * 7 * e
        else:  # touched rows only: parameter read and written, state likewise
            touched = min(rows, A * readers * world * tokens * K)
            state = 4 * (2 if optim.value_state_dtype == "bfloat16" else 4) if optim.value_optimizer == "row_adamw" else 0
            total += touched * width * (2 * e + state)
    return total

