"""The fast CPU backend: the C kernels of :mod:`memlayers.kernels.cpu` behind the seam.

Float32 and bfloat16 tables. The bags prefetch rows and accumulate in
float32; a ``RowGrad`` is reduced and applied to its rows in one fused pass
per row (the gradient rows are never written out). Whatever the fused
kernels do not take (explicit ``(rows, grads)``, a bfloat16 gradient, a
strided state) goes to the reference in :mod:`.torch_ops`. Every input is
checked first: the C code reads and writes rows by address.
"""

from __future__ import annotations

import torch

from memlayers.kernels import cpu
from memlayers.kernels.backends.torch_ops import TorchOps
from memlayers.kernels.lookups import check_dense_grad, check_ids, check_offsets


def _check_table(table: torch.Tensor, what: str) -> None:
    if table.dim() != 2 or table.device.type != "cpu":
        raise ValueError(f"{what}: the C kernels take a 2-D CPU table, got shape {tuple(table.shape)} on {table.device}")


def _fusable(table: torch.Tensor, grad, *states: torch.Tensor) -> bool:
    """True when the fused C kernel can apply ``grad`` (a ``RowGrad``) to ``table`` and ``states``."""
    if isinstance(grad, tuple) or not cpu.available():
        return False
    grad_out = grad.segments().grad_out
    return (
        all(t.device.type == "cpu" and t.is_contiguous() for t in (table, grad_out, *states))
        and table.dtype in cpu.DTYPE_SUFFIX
        and grad_out.dtype == torch.float32
        and all(s.dtype in (*cpu.DTYPE_SUFFIX, torch.int32) for s in states)
    )


def _launch(name: str, dtypes: tuple[torch.dtype, ...], grad, tensors: tuple, scalars: tuple) -> None:
    """Run the fused row update ``name`` over every row segment of ``grad``."""
    seg = grad.segments()
    table = tensors[0]
    args = [cpu.ptr(t) for t in tensors] + [table.shape[1]]
    args += [cpu.ptr(seg.rows), cpu.ptr(seg.offsets), cpu.ptr(seg.bags), cpu.ptr(seg.weights), cpu.ptr(seg.grad_out)]
    args += [grad.scale, *scalars]
    cpu.run(cpu.kernel(name, *dtypes), seg.rows.numel(), *args, grain=64)
    # written through raw pointers: tell autograd, so a graph that saved the old values fails loudly
    torch.autograd.graph.increment_version(list(tensors))


class CpuOps(TorchOps):
    """The C kernels (float32 or bfloat16 tables on the CPU)."""

    @staticmethod
    def bag(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """CSR weighted bags, float32 ``(len(offsets) - 1, d)``."""
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
        cpu.run(fn, out.shape[0], cpu.ptr(table), d, cpu.ptr(ids), cpu.ptr(weights), cpu.ptr(offsets), cpu.ptr(out))
        return out

    @staticmethod
    def bag_dot(table: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out[b] . table[ids[b, k]]``, float32 ``(B, K)``."""
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
        cpu.run(fn, B, cpu.ptr(table), table.shape[1], cpu.ptr(ids), K, cpu.ptr(grad_out), cpu.ptr(out), grain=16)
        return out

    @staticmethod
    def one_pass_pays(n_rows: int, dim: int) -> bool:
        """Whether :meth:`dense_grad` beats the sorted route (row segments, each row written once)
        for a ``(n_rows, dim)`` gradient. Added up in place, each lookup reads and writes its row at
        random: cheap while the rows are narrow or the whole gradient stays in cache. Measured on a
        2-core CPU with the kernels on torch's threads (2026-12-03): one pass wins 1.4-4x up to
        32 MiB, and 1.05-1.24x for rows of 64 or 128 floats in tables of 64 to 256 MiB. Wider rows
        past 32 MiB break even or lose (0.87x at 512 floats), and the bag's backward, which also
        reads the table in that pass, loses 7% at 256 floats: both routes then mostly write zeros."""
        return dim <= 128 or n_rows * dim * 4 <= 32 * 2**20

    @staticmethod
    def dense_grad(
        n_rows: int, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, table: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense table gradient of fixed-size bags, float32 ``(n_rows, d)``: row ``r`` sums
        ``weights[b, k] * grad_out[b]`` over the lookups ``ids[b, k] == r``, in lookup order. With the
        ``table`` read, the same pass gives the weight gradient ``grad_out[b] . table[ids[b, k]]``,
        float32 ``(B, K)`` (else None)."""
        check_dense_grad(n_rows, ids, weights, grad_out, table)
        ids, weights = ids.to(torch.int64).contiguous(), weights.float().contiguous()  # the C kernel reads int64
        grad_out = grad_out.float().contiguous()
        d = grad_out.shape[1]
        out = torch.empty(n_rows, d)  # (N, d)
        dots = None
        if table is not None:
            _check_table(table, "dense_grad")
            table = table.contiguous()
            dots = torch.empty(ids.shape)  # (B, K)
        fn = cpu.kernel("dense_grad", torch.float32 if table is None else table.dtype)
        # split by rows, not lookups: threads never write the same row (grain: a thread scans every lookup)
        cpu.run(fn, n_rows, cpu.ptr(out), d, cpu.ptr(ids), cpu.ptr(weights), ids.numel(), ids.shape[1],
                         cpu.ptr(grad_out), None if table is None else cpu.ptr(table),
                         None if dots is None else cpu.ptr(dots), grain=1024)
        return out, dots

    @staticmethod
    def sq_norm(grad) -> float:
        """Squared norm of a ``RowGrad`` without writing its rows out (float32 CPU gradients)."""
        seg = grad.segments()
        if seg.grad_out.dtype != torch.float32 or seg.grad_out.device.type != "cpu" or not cpu.available():
            return TorchOps.sq_norm(grad)
        grad_out = seg.grad_out  # (B, d)
        bag_sq = torch.empty(grad_out.shape[0])  # (B,): each bag's |grad_out|^2, filled by the kernel
        total = cpu.run(
            cpu.library().row_grad_sq_norm, seg.rows.numel(), cpu.ptr(seg.offsets), cpu.ptr(seg.bags),
            cpu.ptr(seg.weights), cpu.ptr(grad_out), grad.dim, grad_out.shape[0], cpu.ptr(bag_sq), grain=64,
        )
        return total * grad.scale**2

    @staticmethod
    def sgd(table: torch.Tensor, grad, lr: float, weight_decay: float) -> None:
        """Row-sparse SGD, fused with the gradient's row reduction."""
        if _fusable(table, grad):
            _launch("sgd", (table.dtype,), grad, (table,), (lr, weight_decay))
        else:
            TorchOps.sgd(table, grad, lr, weight_decay)

    @staticmethod
    def adagrad(table: torch.Tensor, state_sum: torch.Tensor, grad, lr: float, eps: float, weight_decay: float) -> None:
        """Row-wise Adagrad, fused with the gradient's row reduction."""
        if _fusable(table, grad, state_sum):
            _launch("adagrad", (table.dtype,), grad, (table, state_sum), (lr, eps, weight_decay))
        else:
            TorchOps.adagrad(table, state_sum, grad, lr, eps, weight_decay)

    @staticmethod
    def adam(
        table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor, grad,
        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    ) -> None:
        """Row-sparse AdamW, fused with the gradient's row reduction."""
        if _fusable(table, grad, exp_avg, exp_avg_sq, steps):
            _launch("adam", (table.dtype, exp_avg.dtype), grad, (table, exp_avg, exp_avg_sq, steps),
                    (lr, beta1, beta2, eps, weight_decay))
        else:
            TorchOps.adam(table, exp_avg, exp_avg_sq, steps, grad, lr, beta1, beta2, eps, weight_decay)
