"""The fast GPU backend: the Triton kernels of :mod:`memlayers.kernels.triton_bag` behind the seam.

The bags and their weight gradient run in Triton (on CUDA, or on the CPU
under ``TRITON_INTERPRET=1``); row updates are the reference's torch ops,
which on a GPU are already bandwidth-bound gathers and scatters of the
touched rows.
"""

from __future__ import annotations

import torch

from memlayers.kernels.backends.torch_ops import TorchOps
from memlayers.kernels.lookups import check_dense_grad


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
    def one_pass_pays(n_rows: int, dim: int) -> bool:
        """Always: the one-pass backward is what this backend is chosen for."""
        return True

    @staticmethod
    def dense_grad(
        n_rows: int, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, table: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense table gradient ``(n_rows, d)``, each lookup's ``weights[b, k] * grad_out[b]`` added
        to its row by atomics; with the ``table``, the weight gradient ``(B, K)`` in the same pass
        (else None). Both float32."""
        from memlayers.kernels import triton_bag

        check_dense_grad(n_rows, ids, weights, grad_out, table)
        dots, grad = triton_bag.bag_backward_atomic(table, ids, weights.float(), grad_out, ids, n_rows)  # inverse = ids
        return grad, dots
