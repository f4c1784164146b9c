"""Lookups as every kernel reads them: row ids, CSR bag offsets, and their checks.

A bag read takes ``ids`` (which rows), ``weights`` (how much of each) and
``offsets`` (where each bag's lookups start and stop, CSR style). The kernels
read and write rows by address, so ids and offsets are checked before any
kernel sees them.
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int64, torch.int32)


def fixed_offsets(n_bags: int, bag_size: int, device: torch.device) -> torch.Tensor:
    """CSR offsets of ``n_bags`` bags of ``bag_size`` lookups, ``(n_bags + 1,)``."""
    return torch.arange(n_bags + 1, device=device) * bag_size  # also for bags of 0 lookups


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


def check_dense_grad(n_rows: int, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor,
                     table: torch.Tensor | None) -> None:
    """Refuse the arguments of a backend's one-pass ``dense_grad`` unless ``ids`` and ``weights``
    are ``(B, K)``, ``grad_out`` is ``(B, d)``, the ids lie in ``[0, n_rows)`` and the table, if
    given, is ``(n_rows, d)``."""
    if ids.dim() != 2 or weights.shape != ids.shape or grad_out.dim() != 2 or grad_out.shape[0] != ids.shape[0]:
        raise ValueError(f"dense_grad: ids {tuple(ids.shape)}, weights {tuple(weights.shape)} and grad_out "
                         f"{tuple(grad_out.shape)} must be (B, K), (B, K) and (B, d)")
    check_ids(ids, n_rows, "dense_grad")
    if table is not None and tuple(table.shape) != (n_rows, grad_out.shape[1]):
        raise ValueError(f"dense_grad: the table is {tuple(table.shape)}, the gradient ({n_rows}, {grad_out.shape[1]})")
