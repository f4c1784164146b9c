"""The seam between the memory read's math and the hardware: one interface, one file per backend.

The read, its gradient and the row-sparse optimizer updates
(:mod:`memlayers.kernels.embedding_bag`, :mod:`memlayers.kernels.row_update`)
are written once against a small set of operations. A backend is a class
whose static methods provide them:

``bag(table, ids, weights, offsets)``
    CSR bags: ``out[s] = sum_{j in [offsets[s], offsets[s+1])} weights[j] * table[ids[j]]``,
    float32 ``(S, d)``. With ``offsets = arange(0, B*K+1, K)`` it is the
    forward of ``B`` bags of ``K``; with the lookups sorted by row and
    ``table = grad_out`` it is the deterministic row-gradient reduction.
``bag_dot(table, ids, grad_out)``
    the weight gradient of fixed-size bags: ``out[b, k] = grad_out[b] . table[ids[b, k]]``,
    ``(B, K)`` in float32 (float64 for float64 tables).
``sq_norm(row_grad)``
    the squared norm of a :class:`~memlayers.kernels.embedding_bag.RowGrad` (for clipping).
``sgd``, ``adagrad``, ``adam``
    the row-sparse optimizer updates of a table from a ``RowGrad`` or ``(rows, grads)``.
``dense_grad(n_rows, ids, weights, grad_out, table=None)`` and ``one_pass_pays(n_rows, dim)`` (optional)
    a fixed-size read's dense table gradient ``(n_rows, d)`` in one pass over the lookups,
    and with the ``table`` its weight gradient (as ``bag_dot``) in the same pass; used where
    ``one_pass_pays`` says it beats the sorted route (a ``RowGrad`` sorted into row segments,
    then one bag per row), which backends without it always take.

Backends (``table_grad="rows"`` reads record which one made the gradient, and
the optimizer step uses the same one):

- :class:`~.torch_ops.TorchOps` (``torch_rows``): plain torch ops on any device;
  the reference every other backend is tested against;
- :class:`~.cpu_ops.CpuOps` (``cpu``): the C kernels, with row updates fused
  with the gradient's reduction;
- :class:`~.triton_ops.TritonOps` (``triton``): Triton bags on the GPU;
  :class:`~.triton_ops.TritonAtomicOps` (``triton_atomic``) adds the one-pass
  dense gradient, by atomics.

Two more names need no ops: ``reference`` (gather, scale, sum with autograd)
and ``torch`` (``F.embedding_bag``, dense table gradient only).
"""

from __future__ import annotations

import torch

from memlayers.kernels import cpu
from memlayers.kernels.backends.cpu_ops import CpuOps
from memlayers.kernels.backends.torch_ops import TorchOps
from memlayers.kernels.backends.triton_ops import TritonAtomicOps, TritonOps

OPS = {"torch_rows": TorchOps, "cpu": CpuOps, "triton": TritonOps, "triton_atomic": TritonAtomicOps}
"""The ops behind each backend name that has them."""

BACKENDS = ("reference", "torch", *OPS)


def triton_available() -> bool:
    """True when Triton imports (it runs on CUDA, or anywhere with ``TRITON_INTERPRET=1``)."""
    from memlayers.kernels import triton_bag

    return triton_bag.AVAILABLE


def resolve_backend(backend: str, table: torch.Tensor, table_grad: str = "dense") -> str:
    """The concrete backend ``auto`` stands for, given the table's device: ``triton`` for CUDA
    tables when Triton is installed, ``cpu`` for CPU tables when the C kernels build, else torch."""
    if backend != "auto":
        return backend
    if table.device.type == "cuda" and table.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available():
        return "triton"
    if table.device.type == "cpu" and table.dtype in cpu.DTYPE_SUFFIX and cpu.available():
        return "cpu"
    return "torch_rows" if table_grad == "rows" else "torch"


def ops_for(backend: str, table: torch.Tensor, table_grad: str = "dense") -> type[TorchOps]:
    """The ops of ``backend`` (``auto`` resolved for ``table``); the reference for names without ops."""
    return OPS.get(resolve_backend(backend, table, table_grad), TorchOps)


__all__ = ["BACKENDS", "OPS", "CpuOps", "TorchOps", "TritonAtomicOps", "TritonOps", "ops_for", "resolve_backend", "triton_available"]
