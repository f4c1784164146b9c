"""Kernels for the memory read: the embedding bag and its row gradient (embedding_bag),
the backends behind them (backends/), row-sparse updates (row_update), product-key search."""

from memlayers.kernels import cpu
from memlayers.kernels.embedding_bag import (
    BACKENDS,
    RowGrad,
    embedding_bag,
    embedding_bag_reference,
    embedding_dot,
    row_grad_of,
)

__all__ = ["BACKENDS", "RowGrad", "cpu", "embedding_bag", "embedding_bag_reference", "embedding_dot", "row_grad_of"]
