"""Benchmarks of the memory kernels (``memlayers bench``), each measured side by side in one run.

- ``bag`` (a): embedding-bag fwd+bwd / fwd, ours vs torch, 1M x 256 rows, 16k bags of 128;
- ``step`` (b): a memory layer's training step at 1024**2 slots / at 256**2, per value optimizer;
- ``memory`` (c): peak bytes per value parameter while training, per optimizer and dtype;
- ``bandwidth`` (d, GPU only): kernel bandwidth as a fraction of device copy bandwidth;
- ``search`` (e): the product-key search, fused backend vs the torch reference, 256**2 and 1024**2 slots;
- ``lm`` (f): training-step tokens/s of the demo's memory and MoE LMs over its dense LM (equal FLOPs), and at dim 512;
- ``inference`` (g, CPU): KV-cached generation, memory vs dense, the table float32 / int8 / int4 / memory-mapped.

``run`` returns one JSON-ready dict; ``quick=True`` shrinks every shape (for tests).
"""

from __future__ import annotations

from memlayers.bench.bag import BagShape, bench_bag_bandwidth, bench_bag_ratio
from memlayers.bench.inference import InferenceShape, bench_inference
from memlayers.bench.lm import LMShape, bench_lm
from memlayers.bench.memory import MemoryShape, bench_memory
from memlayers.bench.report import render
from memlayers.bench.search import SearchShape, bench_search
from memlayers.bench.step import StepShape, bench_step
from memlayers.bench.timing import environment
from memlayers.config import ConfigError
from memlayers.device import pick_device

NAMES = ("bag", "step", "memory", "bandwidth", "search", "lm", "inference")
QUICK = {
    "bag": BagShape(n_rows=64**2, dim=32, bags=256, bag_size=16),
    "step": StepShape(small_keys=16, large_keys=64, dim=32, heads=2, knn=8, k_dim=16, tokens=128),
    "memory": MemoryShape(n_rows=256**2, dim=32, bags=256, bag_size=16, steps=2),
    "search": SearchShape(tokens=64, dim=32, heads=2, knn=8, k_dim=16, n_keys=(16, 64)),
    "lm": LMShape(settings={"demo (dim 64)": []}, batch_size=2),
    "inference": InferenceShape(overrides=("model.dim=32", "model.n_heads=2", "memory.k_dim=16", "memory.knn=4",
                                           "memory_sizes=[16]", "big_dim=80", "seq_len=64"), prompt_tokens=8, new_tokens=8),
}


def run(names: tuple[str, ...] = NAMES, device: str = "auto", quick: bool = False, repeat: int = 5) -> dict:
    """Run the named benchmarks; ``bandwidth`` is skipped without a GPU.

    An unknown name, or a device this machine does not have (``device`` is
    ``--device`` of ``memlayers bench``), raises :class:`ConfigError`.
    """
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ConfigError("", f"unknown benchmark(s) {unknown}; choose from {list(NAMES)}")
    dev = pick_device(device, "--device")
    results: dict = {"environment": environment(dev), "quick": quick}

    def shape(key, default):
        return QUICK[key] if quick else default

    if "bag" in names:
        results["bag"] = bench_bag_ratio(shape("bag", BagShape()), dev, repeat)
    if "step" in names:
        results["step"] = bench_step(shape("step", StepShape()), dev, repeat)
    if "memory" in names:
        results["memory"] = bench_memory(shape("memory", MemoryShape()), dev)
    if "bandwidth" in names:
        if dev.type == "cuda":
            results["bandwidth"] = bench_bag_bandwidth(shape("bag", BagShape()), dev, repeat)
        else:
            results["bandwidth"] = {"skipped": "needs a CUDA device"}
    if "search" in names:
        results["search"] = bench_search(shape("search", SearchShape()), dev, repeat)
    if "lm" in names:
        results["lm"] = bench_lm(shape("lm", LMShape()), dev, repeat)
    if "inference" in names:  # generation on the CPU, each variant in its own process
        results["inference"] = bench_inference(shape("inference", InferenceShape()))
    return results


__all__ = ["NAMES", "render", "run"]
