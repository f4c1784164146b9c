"""MemoryConfig: the hyperparameters of a product-key memory layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memlayers.config import check


@dataclass
class MemoryConfig:
    """Shape and options of a memory layer (names follow the paper).

    The memory has ``n_keys**2`` slots. Each of ``heads`` query heads selects
    the exact top-``knn`` slots by product-key search over sub-keys of size
    ``k_dim // 2`` and reads a softmax-weighted sum of their values.
    """

    n_keys: int = 1024
    """Sub-keys per half; the memory has n_keys**2 slots (value rows)."""
    heads: int = 4
    """Independent query heads; their reads are summed."""
    knn: int = 32
    """Slots selected per head (top-k of the product-key search)."""
    k_dim: int = 512
    """Query/key size; each half is k_dim // 2."""
    value_dim: int | None = None
    """Size of a value row; None means the model dimension."""
    variant: Literal["plus", "plain", "peer"] = "plus"
    """plus: Memory+ output W2(y * silu(W1 x)); plain: y (projected if value_dim != dim);
    peer: each slot is a one-neuron expert, out = sum w * gelu(u . x) * v."""
    qk_norm: bool = False
    """L2-normalise query halves and sub-keys before the dot products."""
    temperature: float = 1.0
    """Softmax temperature of the selected scores (selection itself is unaffected).
    With qk_norm the scores lie in [-2, 2], so a temperature below 1 sharpens the read."""
    gated: bool = False
    """Multiply the output by a scalar input-dependent gate sigmoid(w . x)."""
    query_bias: bool = True
    """Bias in the query projection (q = W_q x + b)."""
    shared_values: bool = True
    """All memory layers of a model read one value pool (the paper's default)."""
    output_init: Literal["paper", "model"] = "model"
    """How W_2 (the output projection) starts: ``model``, like the host model's other outputs
    into the residual stream (init_std / sqrt(2 n_layers)), which a memlayers Transformer sets
    (a layer used on its own, or retrofitted, keeps the paper's); ``paper``, normal(0,
    value_dim^-1/2). ``model`` is the default because under the GPT-2 init of our models the
    paper's scale makes each memory read start several times louder than any other write into
    the residual stream, and two shared memory layers then fail to learn (3 seeds,
    docs/evidence/log.md)."""
    value_dtype: Literal["float32", "bfloat16", "int8", "int4"] = "float32"
    """Storage dtype of the value pool; bfloat16 halves it (reads and updates
    compute in float32, see memlayers.kernels). int8 (a scale per row) and int4 (a
    scale per ``value_group_size`` columns) are for inference: a checkpoint gets them
    from ``memlayers quantize``, and the bag dequantizes the rows it reads."""
    value_group_size: int = 32
    """Columns that share a scale in an int4 table (even, dividing the value size)."""

    @property
    def quantized(self) -> bool:
        """True for int8 / int4 value tables (inference only)."""
        return self.value_dtype in ("int8", "int4")

    def __post_init__(self) -> None:
        check(self.n_keys >= 1, "n_keys", f"must be >= 1, got {self.n_keys}")
        check(self.heads >= 1, "heads", f"must be >= 1, got {self.heads}")
        check(self.knn >= 1, "knn", f"must be >= 1, got {self.knn}")
        check(
            self.knn <= self.n_keys,
            "knn",
            f"must be <= n_keys ({self.n_keys}): each half keeps its top-knn sub-keys, got {self.knn}",
        )
        check(self.k_dim >= 2, "k_dim", f"must be >= 2, got {self.k_dim}")
        check(self.value_group_size >= 2 and self.value_group_size % 2 == 0, "value_group_size",
              f"must be even and >= 2, got {self.value_group_size}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.k_dim % 2 == 0, "k_dim", f"must be even (it is split into two halves), got {self.k_dim}")
        check(
            self.value_dim is None or self.value_dim >= 1,
            "value_dim",
            f"must be >= 1 or null (= model dim), got {self.value_dim}",
        )
        check(
            not (self.variant == "peer" and self.value_dim is not None),
            "value_dim",
            "must be null for the peer variant (its experts map dim -> dim)",
        )

    @property
    def n_slots(self) -> int:
        """Number of memory slots (value rows), n_keys**2."""
        return self.n_keys * self.n_keys

    def resolved_value_dim(self, dim: int) -> int:
        """The value row size for a model of dimension ``dim``."""
        return dim if self.value_dim is None else self.value_dim
