"""Factual QA of a demo run's largest memory with its value table in float32, int8 and int4.

    python benchmarks/bench_quantized_qa.py CLAIMS_OR_DEMO_OUT [--run memory-256] [--out DIR]

For every seed of the run (``OUT/runs/RUN/seed*``, as `memlayers demo --seeds N` or
`--claims` leave them), the checkpoint is quantized with `memlayers quantize`
(int8; int4 with 32 columns per scale) and each version answers the world's test
(extraction) and seen (recall) questions. Writes ``quantized_qa.json`` and
``quantized_qa.md``: exact match per seed and format, and each format's mean
difference to float32 (issue 13: within 1 point).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from memlayers.bench.timing import environment, format_table
from memlayers.data.text import read_qa
from memlayers.eval.qa import evaluate_qa
from memlayers.inference.quantize import quantize_checkpoint
from memlayers.train.checkpoint import resolve_checkpoint
from memlayers.train.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
FORMATS = (("float32", None), ("int8", 8), ("int4", 4))
SCORES = (("extraction", "qa_test.jsonl"), ("recall", "qa_seen.jsonl"))


def main(argv: list[str] | None = None) -> int:
    """Quantize, evaluate, write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a `memlayers demo` / `--claims` output directory")
    parser.add_argument("--run", default="memory-256", help="run name under OUT/runs (default memory-256)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantized_qa"))
    args = parser.parse_args(argv)
    source = Path(args.out_dir)
    seeds = sorted((source / "runs" / args.run).glob("seed*"))
    if not seeds:
        print(f"bench_quantized_qa: no {source}/runs/{args.run}/seed* runs; run `memlayers demo --claims` first",
              file=sys.stderr)
        return 2
    questions = {score: read_qa(source / "data" / name) for score, name in SCORES}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(seeds) * len(FORMATS), unit="eval") as bar:
        for seed_dir in seeds:
            checkpoint = resolve_checkpoint(seed_dir)
            for name, bits in FORMATS:
                path = checkpoint if bits is None else quantize_checkpoint(
                    checkpoint, Path(tmp) / f"{seed_dir.name}-{name}", bits)["checkpoint"]
                model, tokenizer, _ = load_pretrained(path)
                row = {"seed": seed_dir.name, "format": name}
                for score, pairs in questions.items():
                    row[f"{score} EM"] = evaluate_qa(model, tokenizer, pairs).exact_match
                rows.append(row)
                bar.update(1)
    summary = []
    for name, _ in FORMATS:
        mine = [r for r in rows if r["format"] == name]
        line = {"format": name}
        for score, _ in SCORES:
            mean = sum(r[f"{score} EM"] for r in mine) / len(mine)
            base = sum(r[f"{score} EM"] for r in rows if r["format"] == "float32") / len(mine)
            line[f"{score} EM"] = mean
            line[f"{score} vs float32 (points)"] = 100 * (mean - base)
        summary.append(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(__import__("torch").device("cpu")), "source": str(source), "run": args.run,
              "per_seed": rows, "summary": summary}
    (out / "quantized_qa.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(summary, list(summary[0]))
    (out / "quantized_qa.md").write_text(
        f"# {args.run}: factual QA with the value table in float32, int8 and int4\n\n"
        f"Mean over {len(seeds)} seeds (the runs of `{source}`); per seed in quantized_qa.json.\n\n{table}\n\n"
        f"Reproduce: `python benchmarks/bench_quantized_qa.py {source} --run {args.run}`\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
