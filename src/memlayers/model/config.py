"""ModelConfig: a Llama-style decoder whose FFNs can be dense, memory, MoE or PEER."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memlayers.config import ConfigError, check, check_layers
from memlayers.memory.config import MemoryConfig

FFNKind = Literal["dense", "memory", "moe", "peer"]


MAX_LAYERS = 4096
"""A bound on depth: a model is built (and counted) layer by layer, so an absurd depth would
hang the process instead of failing."""


@dataclass
class MoEConfig:
    """Token-choice top-k routed SwiGLU experts (the paper's MoE baseline)."""

    n_experts: int = 8
    top_k: int = 2
    hidden_dim: int | None = None
    """Hidden size of each expert; None means the dense FFN's hidden size."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer form) in the total loss."""

    def __post_init__(self) -> None:
        check(self.n_experts >= 1, "n_experts", f"must be >= 1, got {self.n_experts}")
        check(1 <= self.top_k <= self.n_experts, "top_k", f"must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        check(self.hidden_dim is None or self.hidden_dim >= 1, "hidden_dim", f"must be >= 1 or null, got {self.hidden_dim}")
        check(self.aux_loss_weight >= 0, "aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")


@dataclass
class ModelConfig:
    """Shape of the decoder LM. Layer indices are 0-based.

    ``memory_layers`` lists the blocks whose FFN is a memory layer (PEER when
    ``memory.variant == "peer"``), or, with ``memory_mode="parallel"``, whose
    dense FFN gets a memory layer beside it (``ffn(x) + memory(x)``, as the
    retrofit's parallel mode and UltraMemV2 place it); ``moe_layers`` those whose
    FFN is a MoE. All other blocks keep a dense SwiGLU FFN.
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads."""
    vocab_size: int = 32000
    max_seq_len: int = 2048
    ffn_hidden_dim: int | None = None
    """Dense FFN hidden size; None uses Llama's rule (2/3 * 4 * dim, rounded up to multiple_of)."""
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    memory_layers: tuple[int, ...] = ()
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    memory_mode: Literal["replace", "parallel"] = "replace"
    """replace: the memory layer is the block's FFN (the paper); parallel: it is added beside
    the block's dense FFN, which stays."""
    moe_layers: tuple[int, ...] = ()
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        self.memory_layers = tuple(self.memory_layers)
        self.moe_layers = tuple(self.moe_layers)
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.n_layers <= MAX_LAYERS, "n_layers", f"must be <= {MAX_LAYERS} (deeper than any trained model), got {self.n_layers}")
        check(self.dim % self.n_heads == 0, "n_heads", f"must divide dim={self.dim}, got {self.n_heads}")
        check(self.head_dim % 2 == 0, "n_heads", f"dim / n_heads must be even for rotary embeddings, got {self.head_dim}")
        kv = self.kv_heads
        check(kv >= 1 and self.n_heads % kv == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}, got {kv}")
        check(self.ffn_hidden_dim is None or self.ffn_hidden_dim >= 1, "ffn_hidden_dim", "must be >= 1 or null")
        check(self.ffn_dim_multiplier is None or self.ffn_dim_multiplier > 0, "ffn_dim_multiplier",
              f"must be > 0 or null, got {self.ffn_dim_multiplier}")
        check(self.rope_theta > 0, "rope_theta", f"must be > 0 (the base of the rotary frequencies), got {self.rope_theta}")
        check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        for name in ("memory_layers", "moe_layers"):
            check_layers(getattr(self, name), name, self.n_layers)
        both = sorted(set(self.memory_layers) & set(self.moe_layers))
        if both:
            raise ConfigError("moe_layers", f"layers {both} are also memory layers; a block has one FFN")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_heads unless grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden(self) -> int:
        """Hidden size of a dense SwiGLU FFN."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def expert_hidden(self) -> int:
        """Hidden size of one MoE expert."""
        return self.ffn_hidden if self.moe.hidden_dim is None else self.moe.hidden_dim

    def ffn_kind(self, layer: int) -> FFNKind:
        """Which FFN block ``layer`` has."""
        if layer in self.memory_layers:
            return "peer" if self.memory.variant == "peer" else "memory"
        if layer in self.moe_layers:
            return "moe"
        return "dense"
