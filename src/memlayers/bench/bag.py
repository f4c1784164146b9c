"""Benchmarks (a) and (d): the embedding bag's backward against its forward, ours vs torch.

(a) ``fwd+bwd / fwd`` for ``F.embedding_bag`` (dense table gradient) and for
    :func:`memlayers.kernels.embedding_bag` with ``table_grad="rows"`` (weight
    gradient plus the table gradient sorted into row segments; the per-row sums
    are reduced inside the row-sparse optimizer step, benchmark (b)).
(d) on a GPU: bytes moved by the forward, the weight-gradient kernel, the
    row-gradient reduction and the forward over int8 and int4 tables (inference)
    as a fraction of the measured device-to-device copy bandwidth, and the
    fwd+bwd time against torch's.

The variants of (a) are timed in turns, and each ratio is the median over
rounds of the two times of that round.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from memlayers.bench.timing import round_ratios, time_ms, time_rounds
from memlayers.kernels import embedding_bag, row_grad_of
from memlayers.kernels.backends import OPS, resolve_backend
from memlayers.kernels.quantized import QuantizedTable, quantized_bag

TARGET_RATIO = 3.0
TARGET_BANDWIDTH = 0.7
QUANTIZED_BITS, QUANTIZED_GROUP = (8, 4), 32


@dataclass
class BagShape:
    """Table and batch of the bag benchmarks (the issue's: 1M x 256 rows, 16k bags of 128)."""

    n_rows: int = 1024**2
    dim: int = 256
    bags: int = 16384
    bag_size: int = 128
    dtype: str = "float32"


def make_inputs(shape: BagShape, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random table, lookups (uniform over rows), softmax-like weights and an output gradient."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.randn(shape.n_rows, shape.dim, generator=g).to(device=device, dtype=getattr(torch, shape.dtype))
    ids = torch.randint(0, shape.n_rows, (shape.bags, shape.bag_size), generator=g).to(device)  # (B, K)
    weights = torch.rand(shape.bags, shape.bag_size, generator=g).softmax(-1).to(device)  # (B, K)
    grad_out = torch.randn(shape.bags, shape.dim, generator=g).to(device=device, dtype=table.dtype)  # (B, d)
    return table, ids, weights, grad_out


def bench_bag_ratio(shape: BagShape, device: torch.device, repeat: int = 5) -> dict:
    """(a): forward and forward+backward times, ours and torch's, and their ratios."""
    table, ids, weights, grad_out = make_inputs(shape, device)
    torch_table = torch.nn.Parameter(table)
    ours_table = torch.nn.Parameter(table.clone())
    w = weights.clone().requires_grad_()
    backend = resolve_backend("auto", table, "rows")

    def torch_forward():
        with torch.no_grad():
            F.embedding_bag(ids, torch_table, per_sample_weights=weights.to(table.dtype), mode="sum")

    def torch_forward_backward():
        out = F.embedding_bag(ids, torch_table, per_sample_weights=w.to(table.dtype), mode="sum")
        out.backward(grad_out)
        torch_table.grad = w.grad = None

    def ours_forward():
        with torch.no_grad():
            embedding_bag(ids, weights, ours_table, backend)

    def ours_forward_backward():
        embedding_bag(ids, w, ours_table, backend, table_grad="rows").backward(grad_out)
        row_grad_of(ours_table).segments()  # the touched rows and their lookups, sorted
        ours_table.row_grad = w.grad = None

    def ours_rows():
        embedding_bag(ids, w, ours_table, backend, table_grad="rows").backward(grad_out)
        row_grad_of(ours_table).rows()  # every touched row's summed gradient, written out
        ours_table.row_grad = w.grad = None

    rounds = time_rounds({
        "torch_fwd": torch_forward, "torch_fwd_bwd": torch_forward_backward,
        "ours_fwd": ours_forward, "ours_fwd_bwd": ours_forward_backward, "ours_fwd_bwd_rows_written": ours_rows,
    }, device, repeat)
    result = {"shape": asdict(shape), "backend": backend}
    result.update({f"{name}_ms": statistics.median(times) for name, times in rounds.items()})
    for name in ("torch", "ours"):
        ratio = round_ratios(rounds[f"{name}_fwd_bwd"], rounds[f"{name}_fwd"])
        result[f"{name}_ratio"], result[f"{name}_ratio_quartiles"] = ratio["median"], [ratio["q1"], ratio["q3"]]
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = result["ours_ratio"] <= TARGET_RATIO
    speedup = round_ratios(rounds["torch_fwd_bwd"], rounds["ours_fwd_bwd"])
    result["speedup_fwd_bwd_vs_torch"], result["speedup_quartiles"] = speedup["median"], [speedup["q1"], speedup["q3"]]
    return result


def copy_bandwidth(n_bytes: int, device: torch.device, repeat: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeat)
    return 2 * src.numel() * 4 / (ms / 1e3)


def bench_bag_bandwidth(shape: BagShape, device: torch.device, repeat: int = 10) -> dict:
    """(d): achieved bandwidth of each kernel as a fraction of copy bandwidth (GPU)."""
    from memlayers.kernels.embedding_bag import RowGrad
    from memlayers.kernels.lookups import fixed_offsets

    table, ids, weights, grad_out = make_inputs(shape, device)
    backend = resolve_backend("auto", table, "rows")
    ops = OPS[backend]
    B, K, d, elem = shape.bags, shape.bag_size, shape.dim, table.element_size()
    M = B * K
    offsets = fixed_offsets(B, K, device)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    grad32 = grad_out.float()
    rows = RowGrad(shape.n_rows, d, ops)
    rows.add(ids, weights, grad32)
    seg = rows.segments()
    U = seg.rows.numel()
    lookup_bytes = M * (ids.element_size() + 4)
    kernels = {
        # rows read + output written + ids and weights read
        "forward": (lambda: ops.bag(table, flat_ids, flat_w, offsets), M * d * elem + B * d * 4 + lookup_bytes),
        # rows read + grad_out read + one float per lookup written
        "weight_grad": (lambda: ops.bag_dot(table, ids, grad32), M * d * elem + B * d * 4 + lookup_bytes + M * 4),
        # grad_out rows read per lookup + one row per touched row written
        "row_grad": (lambda: ops.bag(seg.grad_out, seg.bags, seg.weights, seg.offsets), M * d * 4 + U * d * 4 + lookup_bytes),
    }
    for bits in QUANTIZED_BITS:  # inference: the forward over int8 / int4 codes (and their scales)
        q = QuantizedTable.quantize(table, bits, QUANTIZED_GROUP)
        row_bytes = q.nbytes // shape.n_rows
        kernels[f"forward_int{bits}"] = (lambda q=q: quantized_bag(ids, weights, q), M * row_bytes + B * d * 4 + lookup_bytes)
    peak = copy_bandwidth(max(table.numel() * elem, 1 << 28), device, repeat)
    result = {"shape": asdict(shape), "backend": backend, "copy_bandwidth_gb_s": peak / 1e9, "touched_rows": U,
              "kernels": list(kernels), "bytes": {name: n_bytes for name, (_, n_bytes) in kernels.items()}}
    for name, (fn, n_bytes) in kernels.items():
        ms = time_ms(fn, device, repeat)
        result[f"{name}_ms"] = ms
        result[f"{name}_gb_s"] = n_bytes / (ms / 1e3) / 1e9
        result[f"{name}_fraction_of_copy"] = n_bytes / (ms / 1e3) / peak
    result["target_fraction"] = TARGET_BANDWIDTH
    result.update({k: v for k, v in bench_bag_ratio(shape, device, repeat).items() if k.endswith("_ms") or k.startswith("speedup")})
    return result
