"""Parameter and FLOP accounting from a ModelConfig, to match variants fairly.

Parameters:
    total     every parameter (a tied embedding counted once);
    embedding the token embedding and, when untied, the output head;
    memory    everything inside memory layers: value pools, sub-keys, query,
              W_1, W_2 and gate projections;
    active    parameters used to compute one token: total minus the value
              rows a token does not read, the experts it is not routed to,
              and the input-embedding rows of other tokens.

FLOPs are forward FLOPs per token (a multiply-add counts 2), split into:
    matmul      every weight matrix applied to the token (projections, FFNs,
                experts and router, memory W_q/W_1/W_2/gate, output head);
    attention   q.k scores and the weighted sum of values, against the mean
                causal context (seq_len + 1) / 2;
    key_search  sub-key scores of both halves (2 * n_keys * k_dim per head)
                plus the knn**2 candidate sums;
    value_read  the embedding bag, 2 * heads * knn * value_dim (PEER also
                counts the 2 * heads * knn * dim expert input dot products).
Element-wise work (norms, activations, softmax, top-k) is left out. A training
step costs about 3x the forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memlayers.model.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model (see the module docstring)."""

    total: int
    embedding: int
    memory: int
    active: int


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs per token by kind (see the module docstring)."""

    matmul: int
    attention: float
    key_search: int
    value_read: int

    @property
    def total(self) -> float:
        """All forward FLOPs per token."""
        return self.matmul + self.attention + self.key_search + self.value_read

    def as_dict(self) -> dict[str, float]:
        """The counts and their total as a dict."""
        return {**asdict(self), "total": self.total}


def _attention_params(c: ModelConfig) -> int:
    return c.dim * c.head_dim * (2 * c.n_heads + 2 * c.kv_heads)


def _memory_layer_params(c: ModelConfig) -> int:
    """Parameters of one memory layer excluding its value pool."""
    m = c.memory
    value_dim = m.resolved_value_dim(c.dim)
    n = c.dim * m.heads * m.k_dim + (m.heads * m.k_dim if m.query_bias else 0)  # W_q, b
    n += m.heads * m.n_keys * m.k_dim  # two halves of n_keys sub-keys of k_dim/2
    if m.variant == "plus":
        n += 2 * c.dim * value_dim  # W_1, W_2
    elif m.variant == "plain" and value_dim != c.dim:
        n += value_dim * c.dim  # W_2
    if m.gated:
        n += c.dim + 1
    return n


def _pool_row_size(c: ModelConfig) -> int:
    """Parameters in one memory slot (a value row, plus the PEER input vector)."""
    return c.memory.resolved_value_dim(c.dim) + (c.dim if c.memory.variant == "peer" else 0)


def _pools(c: ModelConfig) -> list[int]:
    """Number of memory layers reading each value pool."""
    n_memory = len(c.memory_layers)
    if n_memory == 0:
        return []
    return [n_memory] if c.memory.shared_values else [1] * n_memory


def count_parameters(config: ModelConfig) -> ParamCounts:
    """Total, embedding, memory and active-per-token parameter counts."""
    c = config
    embedding = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    expert = 3 * c.dim * c.expert_hidden
    total = embedding + c.dim  # final norm
    inactive = 0 if c.tie_embeddings else (c.vocab_size - 1) * c.dim
    memory = 0
    for layer in range(c.n_layers):
        total += _attention_params(c) + 2 * c.dim  # attention and two norms
        kind = c.ffn_kind(layer)
        if kind == "dense":
            total += 3 * c.dim * c.ffn_hidden
        elif kind == "moe":
            total += c.dim * c.moe.n_experts + c.moe.n_experts * expert
            inactive += (c.moe.n_experts - c.moe.top_k) * expert
        else:
            total += _memory_layer_params(c)
            memory += _memory_layer_params(c)
            if c.memory_mode == "parallel":  # the dense FFN stays beside the memory
                total += 3 * c.dim * c.ffn_hidden
    row = _pool_row_size(c)
    reads_per_layer = c.memory.heads * c.memory.knn
    for readers in _pools(c):
        pool = c.memory.n_slots * row
        total += pool
        memory += pool
        inactive += pool - min(c.memory.n_slots, readers * reads_per_layer) * row
    return ParamCounts(total=total, embedding=embedding, memory=memory, active=total - inactive)


def count_flops(config: ModelConfig, seq_len: int | None = None) -> FlopCounts:
    """Forward FLOPs per token for sequences of ``seq_len`` (default max_seq_len)."""
    c = config
    seq_len = c.max_seq_len if seq_len is None else seq_len
    m = c.memory
    value_dim = m.resolved_value_dim(c.dim)
    matmul = 2 * c.dim * c.vocab_size  # output head
    attention = 0.0
    key_search = 0
    value_read = 0
    for layer in range(c.n_layers):
        matmul += 2 * _attention_params(c)
        attention += 2 * 2 * c.n_heads * c.head_dim * (seq_len + 1) / 2
        kind = c.ffn_kind(layer)
        if kind == "dense":
            matmul += 2 * 3 * c.dim * c.ffn_hidden
        elif kind == "moe":
            matmul += 2 * c.dim * c.moe.n_experts + c.moe.top_k * 2 * 3 * c.dim * c.expert_hidden
        else:
            if c.memory_mode == "parallel":
                matmul += 2 * 3 * c.dim * c.ffn_hidden
            matmul += 2 * c.dim * m.heads * m.k_dim  # query projection
            if m.variant == "plus":
                matmul += 2 * 2 * c.dim * value_dim
            elif m.variant == "plain" and value_dim != c.dim:
                matmul += 2 * value_dim * c.dim
            if m.gated:
                matmul += 2 * c.dim
            key_search += m.heads * (2 * m.n_keys * m.k_dim + m.knn * m.knn)
            value_read += 2 * m.heads * m.knn * value_dim
            if kind == "peer":
                value_read += 2 * m.heads * m.knn * c.dim
    return FlopCounts(matmul=matmul, attention=attention, key_search=key_search, value_read=value_read)


def size_fields(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """The sizes a run summary reports: ``params``, ``memory_params``, ``active_params`` and
    ``flops_per_token`` (forward, for sequences of ``seq_len``)."""
    params = count_parameters(config)
    return {"params": params.total, "memory_params": params.memory, "active_params": params.active,
            "flops_per_token": count_flops(config, seq_len).total}
