"""Kernels for the memory read: the embedding bag and its implementations."""

from memlayers.kernels.embedding_bag import BACKENDS, embedding_bag, embedding_bag_reference

__all__ = ["BACKENDS", "embedding_bag", "embedding_bag_reference"]
