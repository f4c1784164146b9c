"""Benchmark (c): peak bytes per value parameter while training a value table.

Each configuration trains the table for a few steps in a fresh process, so
the peak is its own: on the CPU the growth of the process's peak resident
memory (Linux's VmHWM, reset just before the table is made) over what it held
then, on a GPU the peak of torch's allocator. Everything a step needs counts: the table, its gradient
(dense, or the factored rows), the optimizer state and the temporaries of the
update. Divided by the table's element count it is bytes per value parameter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from memlayers.kernels import embedding_bag
from memlayers.train.row_optim import RowAdagrad, RowAdamW, RowSGD


@dataclass
class MemoryCase:
    """One way of training a table: optimizer, table dtype, state dtype."""

    name: str
    optimizer: str
    table_dtype: str = "float32"
    state_dtype: str = "float32"
    target: float | None = None


CASES = (
    MemoryCase("dense AdamW, fp32", "adamw"),
    MemoryCase("row AdamW, fp32", "row_adamw"),
    MemoryCase("row AdamW, bf16 table + state", "row_adamw", "bfloat16", "bfloat16", target=6.0),
    MemoryCase("row Adagrad, fp32", "row_adagrad"),
    MemoryCase("row Adagrad, bf16 table", "row_adagrad", "bfloat16", target=2.5),
    MemoryCase("row SGD, bf16 table", "row_sgd", "bfloat16"),
)


@dataclass
class MemoryShape:
    """Table and batch: a step of 4096 tokens x 128 lookups touches ~40% of 1M rows."""

    n_rows: int = 1024**2
    dim: int = 256
    bags: int = 4096
    bag_size: int = 128
    steps: int = 3


def _reset_peak(device: torch.device) -> int:
    """Start a new peak from the current usage; returns that usage in bytes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM)
        f.write("5")
    return _status_bytes("VmRSS")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _train(case: MemoryCase, table: torch.nn.Parameter, batches: list[tuple[torch.Tensor, ...]]) -> None:
    """A few steps of reading ``table`` and updating it as ``case`` says."""
    if case.optimizer == "adamw":
        optimizer, table_grad = torch.optim.AdamW([table], lr=1e-3), "dense"
    else:
        kwargs = {"state_dtype": getattr(torch, case.state_dtype)} if case.optimizer == "row_adamw" else {}
        cls = {"row_adamw": RowAdamW, "row_adagrad": RowAdagrad, "row_sgd": RowSGD}[case.optimizer]
        optimizer, table_grad = cls([table], lr=1e-3, **kwargs), "rows"
    backend = "torch" if table_grad == "dense" else "auto"
    for ids, weights, grad_out in batches:
        ids = ids.remainder(table.shape[0])
        embedding_bag(ids, weights, table, backend, table_grad).backward(grad_out.to(table.dtype))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(case: MemoryCase, shape: MemoryShape, device: torch.device) -> dict:
    """Train one table in this process; returns its peak bytes per value parameter."""
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, shape.n_rows, (shape.bags, shape.bag_size), generator=g).to(device),
         torch.rand(shape.bags, shape.bag_size, generator=g).softmax(-1).to(device),
         torch.randn(shape.bags, shape.dim, generator=g).to(device))
        for _ in range(shape.steps)
    ]
    dtype = getattr(torch, case.table_dtype)

    def new_table(rows: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.empty(rows, shape.dim, dtype=dtype, device=device).normal_())

    _train(case, new_table(64), batches[:1])  # lazy imports, kernel loading, thread pools: not the table's cost
    baseline = _reset_peak(device)
    table = new_table(shape.n_rows)
    _train(case, table, batches)
    peak = _peak_bytes(device) - baseline
    touched = batches[0][0].unique().numel()
    return {
        **asdict(case),
        "bytes_per_param": peak / table.numel(),
        "table_bytes_per_param": table.element_size(),
        "rows_touched_per_step": touched / shape.n_rows,
        "meets_target": None if case.target is None else peak / table.numel() <= case.target,
    }


def bench_memory(shape: MemoryShape, device: torch.device, cases: tuple[MemoryCase, ...] = CASES) -> dict:
    """Measure every case in its own process (see :func:`child`)."""
    rows = []
    for case in cases:
        payload = json.dumps({"case": asdict(case), "shape": asdict(shape), "device": str(device)})
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from memlayers.bench.memory import child; child(sys.argv[1])", payload],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory benchmark {case.name!r} failed: {out.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"shape": asdict(shape), "cases": rows}


def child(payload: str) -> None:
    """Entry point of a measuring process: run :func:`measure` and print its result as JSON."""
    args = json.loads(payload)
    print(json.dumps(measure(MemoryCase(**args["case"]), MemoryShape(**args["shape"]), torch.device(args["device"]))))
