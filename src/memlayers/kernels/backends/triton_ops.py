"""The fast GPU backend: the Triton kernels of :mod:`memlayers.kernels.triton_bag` behind the seam.

The bags and their weight gradient run in Triton (on CUDA, or on the CPU
under ``TRITON_INTERPRET=1``); row updates are the reference's torch ops,
which on a GPU are already bandwidth-bound gathers and scatters of the
touched rows.
"""

from __future__ import annotations

import torch

from memlayers.kernels.backends.torch_ops import TorchOps


class TritonOps(TorchOps):
    """The Triton kernels (GPU, or the CPU through ``TRITON_INTERPRET=1``)."""

    @staticmethod
    def bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """CSR weighted bags, float32 ``(len(offsets) - 1, d)``."""
        from memlayers.kernels import triton_bag

        return triton_bag.bag(table, ids, weights.float(), offsets)

    @staticmethod
    def bag_dot(table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out[b] . table[ids[b, k]]``, float32 ``(B, K)``."""
        from memlayers.kernels import triton_bag

        return triton_bag.bag_dot(table, ids, grad_out)


class TritonAtomicOps(TritonOps):
    """The Triton kernels, with a one-pass atomic backward for dense table gradients
    (faster where many lookups share rows; the summation order is not fixed)."""

    @staticmethod
    def backward_atomic(
        table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weight gradient ``(B, K)``, unique rows ``(U,)`` and their gradients ``(U, d)``, in one pass."""
        from memlayers.kernels import triton_bag

        rows, inverse = torch.unique(ids, return_inverse=True)  # (U,), (B, K)
        grad_weights, row_grads = triton_bag.bag_backward_atomic(table, ids, weights.float(), grad_out, inverse, rows.numel())
        return grad_weights, rows.long(), row_grads  # int64 rows whatever the ids' dtype (index_copy_ takes int64)
