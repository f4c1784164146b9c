"""The fast CPU path: C kernels (``csrc/*.c``) compiled on first use, called through ctypes.

Why C: torch's CPU gather ops (``index_select``, advanced indexing, the
per-sample-weight backward of ``embedding_bag``) read random rows at a few
GB/s, several times slower than its forward bag. These kernels prefetch rows
ahead, accumulate in float32, and fuse the row-gradient reduction with the
optimizer update so that the gradient rows are never written out.

The library is built once per machine with the system C compiler (``$CC``,
else ``cc``) into ``$MEMLAYERS_CACHE`` (default ``~/.cache/memlayers``), keyed
by a hash of the source, the flags and the CPU, and written atomically so that
concurrent processes never load a half-written file. Without a compiler,
:func:`library` returns None and callers fall back to torch ops.

Each kernel splits its outer loop over OpenMP threads itself (``csrc/parallel.h``).
The library links the ``libgomp`` that torch's CPU build has loaded already,
so the kernels run on torch's own OpenMP threads, ``torch.get_num_threads()``
of them, which are still awake from torch's last op. (A pool of Python
threads calling in through ctypes, as before, competed with torch's spinning
OpenMP threads for the cores: the demo's search took 14 ms inside a training
step against 7 ms on torch's threads.) Without OpenMP the kernels run in the
calling thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("bag.c", "search.c", "quantized.c")]
HEADERS = [CSRC / "parallel.h"]
FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno"]
"""-fno-math-errno: a sqrtf that may set errno keeps a loop scalar (the row AdamW update was)."""
OPTIONAL = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
"""Extra flags, tried in turn: -march=native is not known to every compiler, OpenMP not to every install."""

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# argument types of every exported function (the trailing total, grain are int64)
SIGNATURES: dict[str, list] = {
    "bag": [_P, _I64, _P, _P, _P, _P, _I64, _I64],
    "bag_dot": [_P, _I64, _P, _I64, _P, _P, _I64, _I64],
    "row_grad_sq_norm": [_P, _P, _P, _P, _I64, _I64, _P, _I64, _I64],
    "dense_grad": [_P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I64, _I64],
    "sgd": [_P, _I64, _P, _P, _P, _P, _P, _F32, _F32, _F32, _I64, _I64],
    "adagrad": [_P, _P, _I64, _P, _P, _P, _P, _P, _F32, _F32, _F32, _F32, _I64, _I64],
    "adam": [_P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _F32, _F32, _F32, _F32, _F32, _F32, _I64, _I64],
    "product_key_topk": [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64],
    "product_key_search": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64],
    "search_backward": [_P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _I64, _I64],
    "bag_q8": [_P, _P, _I64, _P, _P, _P, _P, _I64, _I64],
    "bag_q4": [_P, _P, _I64, _I64, _P, _P, _P, _P, _I64, _I64],
    "max_threads": [],
}
# what the functions that return something return (the others return nothing)
RESTYPES = {"row_grad_sq_norm": ctypes.c_double, "product_key_topk": ctypes.c_int, "product_key_search": ctypes.c_int,
            "search_backward": ctypes.c_int, "max_threads": ctypes.c_int}
# dtype suffixes each function is compiled for (table, then state): bag_f32, adam_bf16_f32, ...
VARIANTS: dict[str, tuple[str, ...]] = {
    "bag": ("_f32", "_bf16"),
    "bag_dot": ("_f32", "_bf16"),
    "row_grad_sq_norm": ("",),
    "dense_grad": ("_f32", "_bf16"),
    "sgd": ("_f32", "_bf16"),
    "adagrad": ("_f32", "_bf16"),
    "adam": ("_f32_f32", "_f32_bf16", "_bf16_f32", "_bf16_bf16"),
    "product_key_topk": ("",),
    "product_key_search": ("",),
    "search_backward": ("",),
    "bag_q8": ("",),
    "bag_q4": ("",),
    "max_threads": ("",),
}
DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$MEMLAYERS_CACHE`` or ``~/.cache/memlayers``)."""
    return Path(os.environ.get("MEMLAYERS_CACHE", Path.home() / ".cache" / "memlayers"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    """Build the shared library into ``target`` atomically; raise on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for extra in OPTIONAL:
            result = subprocess.run(
                [compiler, *FLAGS, *extra, *map(str, SOURCES), "-o", str(out), "-lm"], capture_output=True, text=True
            )
            if result.returncode == 0:
                os.replace(out, target)
                return
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "compiler failed")


def _declare(lib: ctypes.CDLL) -> None:
    for base, args in SIGNATURES.items():
        for suffix in VARIANTS[base]:
            fn = getattr(lib, base + suffix)
            fn.argtypes = args
            fn.restype = RESTYPES.get(base)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None without a working C compiler."""
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("MEMLAYERS_NO_CPU_KERNELS"):
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            warnings.warn("memlayers: no C compiler found; the CPU memory kernels fall back to slower torch ops", stacklevel=2)
            return None
        sources = [path.read_text() for path in (*SOURCES, *HEADERS)]
        key = hashlib.sha256("\n".join([*sources, compiler, *FLAGS, _cpu_name()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"memlayers_bag_{key}.so"
        try:
            if not target.is_file():
                _compile(compiler, target)
            lib = ctypes.CDLL(str(target))
            _declare(lib)
        except (OSError, RuntimeError) as error:
            warnings.warn(f"memlayers: could not build the CPU memory kernels ({error}); using slower torch ops", stacklevel=2)
            return None
        _library = lib
        return lib


def available() -> bool:
    """True when the C kernels are built and loadable."""
    return library() is not None


def run(fn, total: int, *args, grain: int = 256):
    """``fn(*args, total, grain)``: the kernel over ``total`` items of its outer loop, split over
    torch's threads in parts of at least ``grain`` items; returns what the kernel returns."""
    return fn(*args, total, grain)


def ptr(tensor: torch.Tensor) -> int:
    """Address of a contiguous CPU tensor's data (anything else is refused: the C code
    would read a GPU address or past the end of a strided view)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"the C kernels take contiguous CPU tensors, got a {tuple(tensor.shape)} tensor on {tensor.device}"
                         f"{'' if tensor.is_contiguous() else ' (not contiguous)'}")
    return tensor.data_ptr()


def ptr_strided(tensor: torch.Tensor) -> int:
    """Address of a CPU tensor whose strides the C kernel is told (no contiguity needed)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"the C kernels take CPU tensors, got a {tuple(tensor.shape)} tensor on {tensor.device}")
    return tensor.data_ptr()


def kernel(name: str, *dtypes: torch.dtype):
    """The C function ``name`` specialised for ``dtypes`` (e.g. ``kernel("adam", torch.float32, torch.bfloat16)``)."""
    lib = library()
    if lib is None:
        raise RuntimeError("memlayers CPU kernels are not available (no C compiler)")
    try:
        suffix = "_".join(DTYPE_SUFFIX[d] for d in dtypes)
    except KeyError as error:
        raise TypeError(f"{name}: unsupported dtype {error.args[0]}; use float32 or bfloat16") from None
    return getattr(lib, f"{name}_{suffix}" if suffix else name)
