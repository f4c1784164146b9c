"""Streaming training from token shards: start-up time and peak memory do not grow with the corpus.

    python benchmarks/bench_stream.py [--tokens 1100000000] [--ratio 10] [--out benchmarks/results/stream.json]

Writes two shard directories in the format of ``memlayers tokenize`` (random
tokens of a real BPE vocabulary): a large corpus (default 1.1B uint16 tokens,
2.2 GB) and one ``--ratio`` times smaller. Each is trained on by a fresh process
(a tiny memory model, ``data.shards=DIR``, a few steps): its start-up time (from
the process's first line to a constructed Trainer, imports included) and its
peak resident memory are measured, and the large/small ratios reported (goal:
both <= 1.2). Each corpus is run twice, alternating, and the faster run kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memlayers.bench.timing import environment, format_table, source_commit
from memlayers.data.stream import FORMAT, INDEX, VERSION
from memlayers.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.2
PART_TOKENS = 1 << 27  # 256 MB of uint16 per shard file, as `memlayers tokenize` writes by default

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from memlayers.config import apply_overrides, from_dict
from memlayers.bench.reliability import TINY_RUN
from memlayers.train.config import RunConfig
from memlayers.train.trainer import Trainer
shards, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = apply_overrides(dict(TINY_RUN), [f"data.shards={shards}", f"train.out_dir={out_dir}", f"train.steps={steps}",
                                        "train.eval_every=0", "train.eval_qa=0", "train.eval_batches=2",
                                        "train.checkpoint_every=0", "data.seq_len=128", "model.max_seq_len=128", "train.batch_size=8"])
trainer = Trainer(from_dict(RunConfig, data))
startup = time.perf_counter() - start
trainer.fit(progress=False)
print(json.dumps({"startup_s": startup, "total_s": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "windows": trainer.batches.windows}))
"""


def write_corpus(directory: Path, tokens: int, tokenizer_file: Path, vocab_size: int, seed: int) -> None:
    """Random tokens below ``vocab_size`` as shard parts of ``PART_TOKENS`` plus a 1M-token heldout split."""
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    rng = np.random.default_rng(seed)
    splits = {}
    for split, total in (("train", tokens), ("heldout", 1 << 20)):
        entries, done = [], 0
        with tqdm(total=total, unit="tok", unit_scale=True, desc=f"{directory.name} {split}", leave=False) as bar:
            while done < total:
                n = min(PART_TOKENS, total - done)
                name = f"{split}-00000-{len(entries):05d}.bin"
                rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(directory / name)
                entries.append({"file": name, "tokens": n, "documents": 0})
                done += n
                bar.update(n)
        splits[split] = {"tokens": total, "documents": 0, "shards": entries}
    index = {"format": FORMAT, "version": VERSION, "dtype": "uint16", "vocab_size": vocab_size,
             "tokenizer": {"file": "tokenizer.json", "sha256": ""}, "bos_id": None, "eos_id": None,
             "splits": splits, "sources": []}
    (directory / INDEX).write_text(json.dumps(index))


def run_child(shards: Path, out_dir: Path, steps: int) -> dict:
    """Train on ``shards`` in a fresh process; its start-up time, total time and peak RSS."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(shards), str(out_dir), str(steps)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench_stream: the training process failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Write both corpora, train on each in fresh processes, print the ratios and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_100_000_000, help="tokens of the large corpus")
    parser.add_argument("--ratio", type=int, default=10, help="how many times smaller the small corpus is")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work", help="where to write the corpora (default: a temporary directory)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        texts = [f"person {i} was born in city {i % 97} in {1900 + i % 120} and works as job {i % 31}." for i in range(3000)]
        tokenizer = Tokenizer.train(texts, 2048)
        tokenizer_file = tokenizer.save(work / "tokenizer.json")
        corpora = {"small": args.tokens // args.ratio, "large": args.tokens}
        for seed, (name, tokens) in enumerate(corpora.items()):
            write_corpus(work / name, tokens, tokenizer_file, tokenizer.vocab_size, seed)
        runs: dict[str, list[dict]] = {name: [] for name in corpora}
        for repeat in range(2):
            for name in corpora:
                runs[name].append(run_child(work / name, work / f"run-{name}-{repeat}", args.steps))
    best = {name: min(r, key=lambda x: x["startup_s"]) for name, r in runs.items()}
    rows = [{"corpus": name, "tokens": corpora[name], "GB": corpora[name] * 2 / 1e9, **best[name]} for name in corpora]
    ratios = {key: best["large"][key] / best["small"][key] for key in ("startup_s", "peak_rss_mib")}
    print(format_table(rows, ["corpus", "tokens", "GB", "windows", "startup_s", "total_s", "peak_rss_mib"]))
    print(f"large / small: start-up {ratios['startup_s']:.2f}x, peak RSS {ratios['peak_rss_mib']:.2f}x (goal <= {GOAL})")
    result = {**environment(torch.device("cpu")), "commit": source_commit(ROOT), "goal": GOAL, "rows": rows,
              "runs": runs, "ratios": ratios, "meets_goal": all(v <= GOAL for v in ratios.values())}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
