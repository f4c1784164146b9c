"""The two raw operations every embedding-bag implementation provides.

``bag(table, ids, weights, offsets)``
    CSR bags: ``out[s] = sum_{j in [offsets[s], offsets[s+1])} weights[j] * table[ids[j]]``,
    float32 ``(S, d)``. With ``offsets = arange(0, B*K+1, K)`` it is the
    forward of ``B`` bags of ``K``; with the lookups sorted by row and
    ``table = grad_out`` it is the deterministic row-gradient reduction.
``bag_dot(table, ids, grad_out)``
    the weight gradient of fixed-size bags: ``out[b, k] = grad_out[b] . table[ids[b, k]]``,
    ``(B, K)`` in float32 (float64 for float64 tables).

:class:`TorchOps` builds them from torch ops (any device), :class:`CpuOps`
from the C kernels in :mod:`memlayers.kernels.cpu`, and :class:`TritonOps`
from the Triton kernels in :mod:`memlayers.kernels.triton_bag`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlayers.kernels import cpu

INDEX_DTYPES = (torch.int64, torch.int32)


def check_ids(ids: torch.Tensor, n_rows: int, what: str, name: str = "ids") -> None:
    """Refuse lookup ids that are not int64/int32 (ValueError) or not in ``[0, n_rows)`` (IndexError).

    Every kernel reads rows by address, so a bad id would read or write out of
    bounds. On the CPU the range check is one min/max pass (well under 1% of a
    bag's time). On CUDA reading the min and max back would cost a host sync on
    every call, so the check is a device-side assertion (``torch._assert_async``):
    a bad id stops the next synchronising CUDA call with this message.
    """
    if ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"{what}: {name} must be int64 or int32, got {ids.dtype}")
    if ids.numel() == 0:
        return
    expected = f"{what}: {name} must lie in [0, {n_rows}) (the table has {n_rows} rows)"
    if ids.device.type == "cuda":
        torch._assert_async(((ids >= 0) & (ids < n_rows)).all(), expected)
        return
    lo, hi = (int(v) for v in ids.aminmax())
    if lo < 0 or hi >= n_rows:
        raise IndexError(f"{expected}, got ids in [{lo}, {hi}]")


def check_offsets(offsets: torch.Tensor, n_ids: int, what: str) -> None:
    """Refuse CSR bag offsets that are not int64/int32, not 1-D, or (on the CPU) not
    non-decreasing within ``[0, n_ids]``; on CUDA the values are left to the caller
    (checking them would sync), which builds them (:func:`fixed_offsets`, row segments)."""
    if offsets.dtype not in INDEX_DTYPES:
        raise ValueError(f"{what}: offsets must be int64 or int32, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{what}: offsets must be 1-D with S + 1 >= 1 entries, got shape {tuple(offsets.shape)}")
    if offsets.device.type == "cuda":
        return
    if int(offsets[0]) < 0 or int(offsets[-1]) > n_ids or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{what}: offsets must rise from >= 0 to at most {n_ids} (the number of ids)")


class TorchOps:
    """``F.embedding_bag`` and its per-sample-weight backward (any device, any float dtype)."""

    @staticmethod
    def bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """CSR weighted bags, float32 ``(len(offsets) - 1, d)``."""
        out = F.embedding_bag(
            ids, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype), include_last_offset=True
        )  # (S, d)
        return out.to(torch.promote_types(table.dtype, torch.float32))

    @staticmethod
    def bag_dot(table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out[b] . table[ids[b, k]]``, float32 ``(B, K)``."""
        B, K = ids.shape
        offsets = fixed_offsets(B, K, ids.device)[:-1]  # (B,)
        offset2bag = torch.arange(B, device=ids.device).repeat_interleave(K)  # (B*K,)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out.to(table.dtype), table, ids.reshape(-1), offsets, offset2bag, 0, -1
        )  # (B*K,)
        return out.to(torch.promote_types(table.dtype, torch.float32)).view(B, K)


class CpuOps:
    """The C kernels (float32 or bfloat16 tables on the CPU)."""

    @staticmethod
    def bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """CSR weighted bags, float32 ``(len(offsets) - 1, d)``. Every input is checked:
        the C kernel reads rows by address."""
        _check_table(table, "bag")
        if ids.dim() != 1 or weights.shape != ids.shape:
            raise ValueError(f"bag: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be 1-D of the same length")
        check_ids(ids, table.shape[0], "bag")
        check_offsets(offsets, ids.numel(), "bag")
        table, weights = table.contiguous(), weights.float().contiguous()
        ids, offsets = ids.to(torch.int64).contiguous(), offsets.to(torch.int64).contiguous()  # the C kernel reads int64
        d = table.shape[1]
        out = torch.empty(offsets.numel() - 1, d)  # (S, d)
        fn = cpu.kernel("bag", table.dtype)
        cpu.parallel_for(fn, out.shape[0], cpu.ptr(table), d, cpu.ptr(ids), cpu.ptr(weights), cpu.ptr(offsets), cpu.ptr(out))
        return out

    @staticmethod
    def bag_dot(table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out[b] . table[ids[b, k]]``, float32 ``(B, K)``. Every input is checked:
        the C kernel reads rows by address."""
        _check_table(table, "bag_dot")
        if ids.dim() != 2 or grad_out.shape != (ids.shape[0], table.shape[1]):
            raise ValueError(
                f"bag_dot: ids {tuple(ids.shape)} and grad_out {tuple(grad_out.shape)} must be (B, K) and (B, {table.shape[1]})"
            )
        check_ids(ids, table.shape[0], "bag_dot")
        table, ids = table.contiguous(), ids.to(torch.int64).contiguous()  # the C kernel reads int64
        grad_out = grad_out.float().contiguous()
        B, K = ids.shape
        out = torch.empty(B, K)  # (B, K)
        fn = cpu.kernel("bag_dot", table.dtype)
        cpu.parallel_for(fn, B, cpu.ptr(table), table.shape[1], cpu.ptr(ids), K, cpu.ptr(grad_out), cpu.ptr(out), grain=16)
        return out


class TritonOps:
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


def _check_table(table: torch.Tensor, what: str) -> None:
    if table.dim() != 2 or table.device.type != "cpu":
        raise ValueError(f"{what}: the C kernels take a 2-D CPU table, got shape {tuple(table.shape)} on {table.device}")


def fixed_offsets(n_bags: int, bag_size: int, device: torch.device) -> torch.Tensor:
    """CSR offsets of ``n_bags`` bags of ``bag_size`` lookups, ``(n_bags + 1,)``."""
    return torch.arange(n_bags + 1, device=device) * bag_size  # also for bags of 0 lookups
