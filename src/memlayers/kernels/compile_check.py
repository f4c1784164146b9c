"""Compile every Triton kernel launch of memlayers for a GPU architecture, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not
that Triton's compiler accepts them, nor what they cost in registers. This module
calls the real launchers (:mod:`~memlayers.kernels.triton_bag`,
:mod:`~memlayers.kernels.triton_search`, :mod:`~memlayers.kernels.triton_quantized`)
on small CPU tensors with each kernel swapped for a recorder, so that it sees the
argument types, compile-time constants and warps of each launch at the shapes of
:func:`record_launches`. Each launch is then compiled for ``sm_<arch>`` by Triton's
compiler, down to a cubin by the ``ptxas`` that Triton ships, and ``cuobjdump``
reads back its registers, local memory (spills) and shared memory. No driver is
needed, so CI checks on a CPU machine that the kernels compile for the GPUs we
target. Run it with ``TRITON_INTERPRET`` unset (the interpreter replaces the
kernels when their modules are imported)::

    python -m memlayers.kernels.compile_check --arch 80 90 [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memlayers.kernels import triton_bag, triton_quantized, triton_search
from memlayers.kernels.quantized import QuantizedTable

MODULES = (triton_bag, triton_search, triton_quantized)
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}


@dataclass
class Launch:
    """One launch a launcher made: the kernel, its arguments by name, and its warps."""

    case: str
    kernel: object  # triton.JITFunction
    args: dict = field(default_factory=dict)
    num_warps: int = 4

    @property
    def name(self) -> str:
        """The kernel's function name."""
        return self.kernel.fn.__name__


def kernels() -> list[tuple[object, str, object]]:
    """Every Triton kernel of the modules as ``(module, name, kernel)``: the ``@triton.jit``
    functions that read ``tl.program_id`` (the others are device helpers inlined into them)."""
    import triton

    return [(module, name, value) for module in MODULES for name, value in vars(module).items()
            if isinstance(value, triton.runtime.jit.JITFunction) and "program_id" in value.src]


@contextlib.contextmanager
def _recording(launches: list[Launch], case: list[str]):
    """Swap every kernel for a recorder (``kernel[grid](*args, **constexprs)`` appends a
    :class:`Launch`) and let the launchers take CPU tensors; restore both after."""

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, **constexprs):
                names = self.kernel.arg_names
                launches.append(Launch(case[0], self.kernel, {**dict(zip(names[: len(args)], args, strict=True)), **constexprs}, num_warps))

            return launch

    saved = kernels()
    interpreted = triton_bag._INTERPRETED
    try:
        for module, name, value in saved:
            setattr(module, name, Recorder(value))
        triton_bag._INTERPRETED = True  # only so that the launchers accept CPU tensors: nothing runs
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        triton_bag._INTERPRETED = interpreted


def record_launches() -> list[Launch]:
    """The launches of every launcher at the shapes of a real model: value rows of 256 and
    1,024 (float32 and bfloat16 tables, int64 and int32 ids), 16 to 32 lookups a bag, the
    search at 256 and 1,024 sub-keys (knn 16, 32), quantized rows of 1,024 in 8 and 4 bits."""
    launches: list[Launch] = []
    case = [""]
    g = torch.Generator().manual_seed(0)
    with _recording(launches, case):
        for dtype in (torch.float32, torch.bfloat16):
            for d, k in ((256, 32), (1024, 16)):
                label = f"{_TYPES[dtype]} rows of {d}, {k} lookups"
                table = torch.randn(64, d, generator=g).to(dtype)
                ids = torch.randint(0, 64, (4, k), generator=g)
                weights, grad_out = torch.rand(4, k, generator=g), torch.randn(4, d, generator=g).to(dtype)
                offsets = torch.arange(0, ids.numel() + 1, k)
                case[0] = f"bag, {label}"
                triton_bag.bag(table, ids.reshape(-1), weights.reshape(-1), offsets)
                case[0] = f"bag_dot, {label}"
                triton_bag.bag_dot(table, ids.int(), grad_out)
                case[0] = f"bag_backward_atomic, {label}"
                triton_bag.bag_backward_atomic(table, ids, weights, grad_out, ids, 64)
                case[0] = f"bag_backward_atomic without a table, {label}"
                triton_bag.bag_backward_atomic(None, ids, weights, grad_out, ids, 64)
        for n_keys, knn in ((256, 16), (1024, 32)):
            case[0] = f"search, {n_keys} sub-keys, knn {knn}"
            triton_search.topk(torch.randn(2, 4, 2, n_keys, generator=g), knn, head_stride=2 * n_keys)
        for bits in (8, 4):
            case[0] = f"quantized bag, int{bits} rows of 1024"
            q = QuantizedTable.quantize(torch.randn(64, 1024, generator=g), bits, 32)
            triton_quantized.quantized_bag(q.codes, q.scales, 1024, bits, 32, torch.randint(0, 64, (4, 32)),
                                           torch.rand(4, 32))
    return launches


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def _resources(cubin: bytes) -> dict:
    """Registers, stack, shared and local (spilled) bytes per thread from ``cuobjdump -res-usage``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {report[:200]!r}")
    return dict(zip(("registers", "stack_bytes", "static_shared_bytes", "local_bytes"), map(int, found.groups()), strict=True))


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for ``sm_<arch>``: its PTX and cubin sizes, shared memory and resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, {}
    for param in launch.kernel.params:
        value = launch.args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = _type(value)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    return {"case": launch.case, "kernel": launch.name, "arch": f"sm_{arch}", "num_warps": launch.num_warps,
            "constexprs": constexprs, "shared_bytes": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]),
            **_resources(compiled.asm["cubin"])}


def check(archs: list[int]) -> list[dict]:
    """Record the launches, then compile each for every arch; one result dict per (launch, arch)."""
    if triton_bag._INTERPRETED:
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: run this with it unset")
    launches = record_launches()
    missed = {name for _, name, _ in kernels()} - {launch.name for launch in launches}
    if missed:
        raise RuntimeError(f"no launch of {sorted(missed)} was recorded: add a case to record_launches")
    return [compile_launch(launch, arch) for arch in archs for launch in launches]


def main(argv: list[str] | None = None) -> int:
    """Command line: compile for each ``--arch`` and print a table (and ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m memlayers.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: A100, 90: H100)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (it warns when unset)
    results = check(args.arch)
    print(f"{'arch':6} {'kernel':22} {'warps':>5} {'regs':>4} {'spill B':>7} {'shared B':>8}  case")
    for r in results:
        print(f"{r['arch']:6} {r['kernel']:22} {r['num_warps']:>5} {r['registers']:>4} {r['local_bytes']:>7} "
              f"{r['shared_bytes']:>8}  {r['case']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
