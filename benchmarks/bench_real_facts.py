"""The demo's comparison on real facts: python benchmarks/bench_real_facts.py [--quick] [--seeds N] [--out DIR].

Writes the airports of the airportsdata package as .jsonl text and QA files, trains every
model of the demo suite on them with `memlayers train` (one process per run and seed),
and prints a markdown table of extraction and recall EM (mean ± spread over seeds);
real_facts.json and real_facts.md go to --out.
"""

import argparse
from pathlib import Path

from memlayers.bench.real_facts import render, run_real_facts
from memlayers.data.airports import AirportFactsConfig


def main() -> None:
    """Parse the command line, run the comparison, print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo_quick preset's models and budget")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--airports", type=int, default=500)
    parser.add_argument("--docs", type=int, default=5, help="descriptions per airport")
    parser.add_argument("--kinds", default="dense,memory,moe,dense_big", help="comma-separated model kinds")
    parser.add_argument("--out", default="benchmarks/results/real_facts")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo preset, e.g. lrs.memory.value_lr=0.02")
    args = parser.parse_args()
    results = run_real_facts(Path(args.out), quick=args.quick, seeds=args.seeds, kinds=tuple(args.kinds.split(",")),
                             facts=AirportFactsConfig(n_airports=args.airports, docs_per_airport=args.docs),
                             overrides=args.overrides)
    print(render(results))
    print(f"wrote {args.out}/real_facts.json and real_facts.md in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":  # the runs train in spawned processes, which import this file again
    main()
