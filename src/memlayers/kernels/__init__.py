"""Kernels for the memory read: the embedding bag, its row gradient, row-sparse updates."""

from memlayers.kernels import cpu
from memlayers.kernels.embedding_bag import (
    BACKENDS,
    embedding_bag,
    embedding_bag_reference,
    embedding_dot,
)
from memlayers.kernels.row_grad import RowGrad, row_grad_of

__all__ = ["BACKENDS", "RowGrad", "cpu", "embedding_bag", "embedding_bag_reference", "embedding_dot", "row_grad_of"]
