"""Benchmark (g): KV-cached generation of a memory model against dense, and its value table
in RAM (float32, int8, int4) or memory-mapped (cold and warm).

A dense model and a memory model with the same FLOPs per token (the memory in
place of one FFN, as the demo builds them) are written as checkpoints; the
memory one also quantized with ``memlayers quantize``. Each variant then runs
in a fresh process (so resident memory is its own): load, generate greedily
with the KV cache, and report time to first token (prompt prefill plus one
token), decode tokens/s, and resident memory after loading and after
generating. ``mmap cold`` first asks the OS to drop the file's cached pages
(``posix_fadvise``), so its first tokens read the table from disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memlayers.config import to_dict
from memlayers.data.tokenizer import Tokenizer
from memlayers.demo.runner import demo_config
from memlayers.demo.suite import build_runs, largest_of_each_kind
from memlayers.inference.quantize import quantize_checkpoint
from memlayers.model import Transformer
from memlayers.model.accounting import count_flops
from memlayers.train.checkpoint import save_checkpoint
from memlayers.train.config import DataConfig

TARGET = 0.9
"""Decode tokens/s of the memory model (float32 table in RAM) over dense's."""

PROBE = r"""
import json, os, sys, time, torch
from memlayers.eval.generate import generate
from memlayers.model import ModelConfig, Transformer
from memlayers.train.pretrained import load_pretrained
torch.set_num_threads(int(sys.argv[5]))
with torch.device("meta"):  # torch's one-time imports for the meta device, out of every variant's memory
    Transformer(ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, max_seq_len=4))
def rss():
    try:
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
    except OSError:
        return -1
path, how, prompt_len, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if how == "mmap_cold" and hasattr(os, "posix_fadvise"):
    fd = os.open(os.path.join(path, "model.safetensors"), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
before = rss()
start = time.perf_counter()
model, tokenizer, _ = load_pretrained(path, mmap=how.startswith("mmap"))
load_s = time.perf_counter() - start
loaded = rss()
prompt = [torch.randint(0, tokenizer.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()]
start = time.perf_counter()
generate(model, prompt, 1)
first_s = time.perf_counter() - start
start = time.perf_counter()
out = generate(model, prompt, new_tokens)
total_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "ttft_s": first_s, "decode_tokens_per_s": (len(out[0]) - 1) / max(total_s - first_s, 1e-9),
                  "rss_loaded": loaded - before, "rss_after": rss() - before, "new_tokens": len(out[0])}))
"""


@dataclass
class InferenceShape:
    """The models and the generation measured."""

    overrides: tuple[str, ...] = ("model.dim=512", "model.n_heads=8", "memory.k_dim=128", "big_dim=1024",
                                  "memory_sizes=[512]", "seq_len=256")
    """Dotted overrides of the demo preset: its dense and largest-memory models, at this size."""
    prompt_tokens: int = 64
    new_tokens: int = 64
    threads: int = 1
    group_size: int = 32
    """int4 columns per scale."""


def _probe(checkpoint: Path, how: str, shape: InferenceShape) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(checkpoint), how, str(shape.prompt_tokens),
                          str(shape.new_tokens), str(shape.threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"inference probe ({how}) failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_inference(shape: InferenceShape) -> dict:
    """(g): per variant, load time, time to first token, decode tokens/s and resident memory."""
    demo = demo_config(False, list(shape.overrides))
    runs = largest_of_each_kind(build_runs(demo, DataConfig(), "unused", demo.vocab_size))
    tokenizer = Tokenizer.train(["memory layers read a few rows of a large table"] * 8, demo.vocab_size)
    results: dict = {"shape": asdict(shape), "target": TARGET, "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer.save(root / "tokenizer.json")
        checkpoints = {}
        for kind in ("dense", "memory"):
            model_config = runs[kind].config.model
            torch.manual_seed(0)
            checkpoints[kind] = save_checkpoint(root / kind, 0, Transformer(model_config), None,
                                                {"config": to_dict(runs[kind].config)},
                                                tokenizer_path=root / "tokenizer.json")
            results[f"{kind}_flops_per_token"] = count_flops(model_config).total
        for bits in (8, 4):
            checkpoints[f"int{bits}"] = Path(quantize_checkpoint(checkpoints["memory"], root / f"int{bits}", bits,
                                                                 shape.group_size)["checkpoint"])
        variants = [("dense", "dense", "load"), ("memory, float32 in RAM", "memory", "load"),
                    ("memory, int8 in RAM", "int8", "load"), ("memory, int4 in RAM", "int4", "load"),
                    ("memory, float32 mmap cold", "memory", "mmap_cold"),
                    ("memory, float32 mmap warm", "memory", "mmap_warm")]
        for name, checkpoint, how in variants:
            row = {"variant": name, **_probe(checkpoints[checkpoint], how, shape),
                   "checkpoint_bytes": (checkpoints[checkpoint] / "model.safetensors").stat().st_size}
            results["variants"].append(row)
    dense = results["variants"][0]["decode_tokens_per_s"]
    for row in results["variants"]:
        row["decode_vs_dense"] = row["decode_tokens_per_s"] / dense
    memory = results["variants"][1]
    results["meets_target"] = memory["decode_vs_dense"] >= TARGET
    results["flops_vs_dense"] = results["memory_flops_per_token"] / results["dense_flops_per_token"]
    return results
