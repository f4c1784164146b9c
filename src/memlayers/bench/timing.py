"""Timing and memory measurement shared by the benchmarks.

Timings are medians over repeats after warm-up, with the device synchronised
around each call; every benchmark compares variants measured in the same run,
so machine-to-machine speed cancels out of the ratios it reports.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable
from datetime import date
from pathlib import Path

import torch

from memlayers.host_memory import freed_memory_kept


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return time_interleaved({None: fn}, device, repeat, warmup)[None]


def time_rounds(fns: dict[Hashable, Callable[[], object]], device: torch.device, repeat: int = 5,
                warmup: int = 1) -> dict[Hashable, list[float]]:
    """Wall times in milliseconds of each of ``fns``, one call of each per round for ``repeat``
    rounds, so that a machine slowing down or speeding up during the run moves every variant
    alike: their ratios are best taken round by round (:func:`round_ratios`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def time_interleaved(fns: dict[Hashable, Callable[[], object]], device: torch.device, repeat: int = 5,
                     warmup: int = 1) -> dict[Hashable, float]:
    """Median wall time in milliseconds of each of ``fns``, timed in turns (:func:`time_rounds`)."""
    return {name: statistics.median(values) for name, values in time_rounds(fns, device, repeat, warmup).items()}


def round_ratios(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """The ratio of two variants timed in the same rounds: the median and quartiles over rounds
    of ``numerator[i] / denominator[i]`` (each round's pair ran back to back)."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    if len(ratios) == 1:
        return {"median": ratios[0], "q1": ratios[0], "q3": ratios[0]}
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def device_name(device: torch.device) -> str:
    """A readable name of the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict[str, str]:
    """Date, device, versions and whether freed host memory is kept (memlayers.host_memory), stored beside every result."""
    return {"date": date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
            "freed_memory_kept": freed_memory_kept()}


def source_commit(root: str | Path) -> str:
    """The short commit of the checkout at ``root``, with ``-dirty`` when its ``src`` or
    ``tests`` differ from it (what a stored result was measured on)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--", "src", "tests") else "")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (floats to 3 significant digits)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
