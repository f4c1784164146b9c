"""A short streamed training of the paper's 134M memory model from token shards, beside the planner's estimate.

    python benchmarks/gpu_train_stream.py [--device cuda] [--steps 40] [--quick] [--out benchmarks/results/train_stream.json]

Issue 14's GPU check, through the command line as a user runs it: a corpus of
fact-world biographies is written as text, a byte-level BPE tokenizer is
trained on it, ``memlayers tokenize`` writes the token shards, and
``memlayers train paper_134m_memory data.shards=...`` trains from them (bf16
autocast on a GPU), logging tokens/s per device, MFU and peak memory. The
same config and overrides go to ``memlayers plan --json`` for one GPU.
Reported: the run's median over its logged steps (the first left out: warm-up)
against the planner's step time, tokens/s and peak bytes. ``--quick`` shrinks
everything to a CPU smoke run of seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from memlayers.bench.timing import environment, format_table, source_commit
from memlayers.data.facts import FactWorldConfig, generate_world
from memlayers.data.tokenizer import Tokenizer
from memlayers.device import pick_device
from memlayers.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "paper_134m_memory"
MODEL = ["model.memory.n_keys=256"]
"""The paper's 134M base with a 256² pool (50M values): a model of about 0.2B parameters."""
QUICK = ["model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.multiple_of=32", "model.memory_layers=[1]",
         "model.memory.n_keys=32", "model.memory.k_dim=32", "model.memory.heads=2", "model.memory.knn=8"]


def memlayers(*args: str) -> str:
    """Run the ``memlayers`` command in a fresh process; its stdout (exits with its stderr when it fails)."""
    result = subprocess.run([sys.executable, "-m", "memlayers.cli", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"gpu_train_stream: memlayers {args[0]} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def write_shards(work: Path, people: int, vocab_size: int) -> Path:
    """Biographies as a text file, a tokenizer trained on them, and their shards by ``memlayers tokenize``."""
    documents = generate_world(FactWorldConfig(n_people=people, bios_per_person=5, heldout_people=0)).biographies()
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(documents) + "\n")
    tokenizer = Tokenizer.train(documents, vocab_size).save(work / "tokenizer.json")
    shards = work / "shards"
    memlayers("tokenize", str(corpus), "--tokenizer", str(tokenizer), "--out", str(shards), "--heldout-fraction", "0.01")
    return shards


def main(argv: list[str] | None = None) -> int:
    """Write the shards, train, plan; print both side by side and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="a tiny model on a tiny corpus (seconds, any device)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_stream.json"))
    args = parser.parse_args(argv)
    device = pick_device(args.device, "--device")
    steps, batch, seq = (6, 4, 64) if args.quick else (args.steps, args.batch_size, args.seq_len)
    log_every = 2 if args.quick else 5
    overrides = [*(QUICK if args.quick else MODEL), f"train.batch_size={batch}", "train.grad_accum=1",
                 f"data.seq_len={seq}", f"model.max_seq_len={seq}"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shards = write_shards(work, 300 if args.quick else 4000, 1024 if args.quick else 16384)
        run_dir = work / "run"
        memlayers("train", CONFIG, *overrides, f"data.shards={shards}", f"train.device={device}",
                  f"train.steps={steps}", f"train.log_every={log_every}", "train.eval_every=0", "train.eval_qa=0",
                  "train.checkpoint_every=0", "train.warmup_steps=2", f"train.out_dir={run_dir}", "--overwrite")
        logged = [r for r in read_metrics(run_dir) if "tokens_per_s" in r][1:]  # the first includes warm-up
        vocab = json.loads((shards / "index.json").read_text())["vocab_size"]
    if not logged:
        raise SystemExit("gpu_train_stream: the run logged no step after its first; raise --steps")
    plan_args = [f"model.vocab_size={vocab}", *overrides]
    report = json.loads(memlayers("plan", CONFIG, *plan_args, "--gpus", "1", "--gpu", "h200", "--json"))
    plan = report["plan"]
    measured = {key: statistics.median(r[key] for r in logged)
                for key in ("tokens_per_s_per_device", "peak_memory_mib", "mfu", "loss") if key in logged[0]}
    tokens_per_step = batch * seq
    rows = [
        {"": "measured", "tokens/s": measured["tokens_per_s_per_device"],
         "step s": tokens_per_step / measured["tokens_per_s_per_device"], "MFU": measured.get("mfu", "-"),
         "peak GB": measured["peak_memory_mib"] * 2**20 / 1e9},
        {"": "planner", "tokens/s": plan["tokens_per_second"], "step s": plan["time"]["step"],
         "MFU": report["cluster"]["mfu"],
         "peak GB": (plan["memory"]["total"] - plan["memory"]["reserve"]) / 1e9},  # without its slack for CUDA
    ]
    print(f"{CONFIG} {' '.join(overrides)} on {device} ({len(logged)} logged steps, vocab {vocab})\n")
    print(format_table(rows, list(rows[0])))
    result = {"environment": environment(device), "commit": source_commit(ROOT), "quick": args.quick,
              "config": CONFIG, "overrides": overrides, "vocab_size": vocab, "steps": steps,
              "measured": measured, "logged": logged, "plan": plan, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
