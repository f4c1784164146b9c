"""``memlayers demo --continual``: learning new facts against forgetting old ones, per method.

For each seed, a dense model and the largest memory model of the demo's suite
are pretrained on fact world A (the demo's, its tuned rates). World B holds new
people, none named as anyone of A, in groups: a validation group and
``rounds`` groups B1..Bn. Each group's learning text is its people's
biographies and question/answer pairs. Then, per model and method (memory:
sparse, values, full, lora; dense: full, lora):

    lr          every rate of the method's grid learns the validation group
                from the pretrained model; the one with the highest EM on the
                validation group's questions is kept (the test groups are
                never looked at);
    rounds      from the pretrained model, learn B1, B2, ... one after another;
                after each, EM on A's questions (what it knew), on every group
                learned so far (retention) and on the latest group's questions
                asked in a wording never trained on (paraphrased), and A's
                held-out perplexity.

The first round is the single-step comparison (learning against forgetting);
the rest, continual learning. Sparse memory finetuning reads background slot
statistics of world A's training text.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from memlayers.config import check, load_config, to_dict
from memlayers.continual.learn import METHODS, LearnConfig, learn
from memlayers.continual.slot_stats import collect_slot_stats
from memlayers.data.facts import FactWorld, FactWorldConfig, generate_world
from memlayers.data.packing import pack_documents
from memlayers.data.text import qa_text, read_documents
from memlayers.demo.continual_report import write_continual
from memlayers.demo.runner import demo_config, prepare_world, train_suite, with_seeds
from memlayers.demo.stats import estimate
from memlayers.demo.suite import build_runs, largest_of_each_kind
from memlayers.eval.perplexity import evaluate_perplexity
from memlayers.eval.qa import evaluate_qa
from memlayers.train.pretrained import load_pretrained


@dataclass
class ContinualConfig:
    """What a continual-learning run does (presets: configs/demo_continual*.yaml)."""

    preset: str = "demo"
    """The demo preset whose world (A), models and pretraining are used."""
    demo_overrides: tuple[str, ...] = ()
    seeds: int = 3
    new_people: int = 40
    """People per round of new facts."""
    rounds: int = 5
    validation_people: int = 20
    """People of world B whose facts choose each method's learning rate (never reported)."""
    bios_per_person: int = 2
    """Biographies per new person in its learning text (besides its question/answer pairs)."""
    memory_methods: tuple[str, ...] = ("sparse", "values", "full", "lora")
    dense_methods: tuple[str, ...] = ("full", "lora")
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {
        "sparse": [3e3, 1e4, 3e4, 1e5], "values": [1e3, 3e3, 1e4, 3e4], "full": [3e-4, 1e-3, 3e-3, 1e-2],
        "lora": [1e-3, 3e-3, 1e-2, 3e-2]})
    """Learning rates tried per method (on the validation group). SGD on value rows needs rates
    in the thousands: a row's gradient is its share of the softmax weights of the few tokens
    that read it, averaged over the batch's tokens (a grid of 3-30 learned nothing)."""
    epochs: int = 5
    batch_size: int = 8
    top_t: int = 500
    old_questions: int = 200
    """A's seen questions scored for forgetting (its first ones)."""
    background_batches: int = 64
    """Batches of A's training text counted for sparse finetuning's background statistics."""

    def __post_init__(self) -> None:
        check(1 <= self.seeds <= 100, "seeds", f"must be in [1, 100], got {self.seeds}")
        for name in ("new_people", "rounds", "validation_people", "bios_per_person", "epochs", "batch_size",
                     "top_t", "old_questions", "background_batches"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("memory_methods", "dense_methods"):
            for method in getattr(self, name):
                check(method in METHODS, name, f"{method!r} is not one of {', '.join(METHODS)}")
                check(bool(self.lr_grid.get(method)), "lr_grid", f"has no learning rates for {method}")
        for method in self.dense_methods:
            check(method in ("full", "lora"), "dense_methods", f"a dense model has no memory rows for {method}")


@dataclass
class Group:
    """People of world B learned together: their learning text and questions."""

    documents: list[str]
    qa: list[dict[str, str]]
    paraphrased: list[dict[str, str]]


def new_fact_groups(world_a: FactWorld, config: ContinualConfig, seed: int) -> dict[str, Group]:
    """World B (no name shared with ``world_a``) in groups: ``validation`` and ``round1``..``roundN``."""
    n = config.validation_people + config.rounds * config.new_people
    world_b = generate_world(FactWorldConfig(n_people=n, seed=1000 + seed, bios_per_person=config.bios_per_person,
                                             seen_fraction=1.0, heldout_people=0),
                             exclude={p.name for p in world_a.people})
    sizes = [("validation", config.validation_people)] + [(f"round{r + 1}", config.new_people)
                                                          for r in range(config.rounds)]
    groups, start = {}, 0
    for name, size in sizes:
        part = FactWorld(world_b.config, world_b.people[start : start + size])
        qa = part.qa_pairs()
        groups[name] = Group(part.biographies() + [qa_text(q["question"], q["answer"]) for q in qa], qa,
                             part.qa_pairs(paraphrased=True))
        start += size
    return groups


def _em(model, tokenizer, pairs: list[dict[str, str]]) -> float:
    return evaluate_qa(model, tokenizer, pairs).exact_match if pairs else float("nan")


def _learn_group(model, tokenizer, group: Group, method: str, lr: float, config: ContinualConfig, seq_len: int,
                 background, seed: int) -> dict[str, Any]:
    """Learn one group's text in place; the learn() result."""
    rows = pack_documents(tokenizer.encode_batch(group.documents), seq_len, tokenizer.bos_id, tokenizer.eos_id)
    learn_config = LearnConfig(method=method, lr=lr, epochs=config.epochs, batch_size=config.batch_size,
                               top_t=config.top_t, seed=seed)
    return learn(model, rows, learn_config, background if method == "sparse" else None, progress=False)


def method_runs(checkpoint: str, kind: str, method: str, groups: dict[str, Group], old_qa: list[dict[str, str]],
                heldout: torch.Tensor, config: ContinualConfig, seed: int) -> dict[str, Any]:
    """The lr selection and the rounds of one model and method (see the module docstring)."""
    base, tokenizer, run = load_pretrained(checkpoint)
    seq_len = run.data.seq_len
    background = None
    if method == "sparse":
        rows = pack_documents(tokenizer.encode_batch(read_documents(run.data.train)), seq_len,
                              tokenizer.bos_id, tokenizer.eos_id)[:, :-1]
        background = collect_slot_stats(base, rows.split(config.batch_size)[: config.background_batches],
                                        progress=False)
    trials = []
    for lr in config.lr_grid[method]:
        model = copy.deepcopy(base)
        _learn_group(model, tokenizer, groups["validation"], method, lr, config, seq_len, background, seed)
        trials.append({"lr": lr, "validation_em": _em(model, tokenizer, groups["validation"].qa),
                       "old_em": _em(model, tokenizer, old_qa)})
    best = max(trials, key=lambda t: (t["validation_em"], -t["lr"]))
    model = copy.deepcopy(base)
    old_before = _em(model, tokenizer, old_qa)
    ppl_before = evaluate_perplexity(model, heldout)["perplexity"]
    rounds = []
    for r in range(config.rounds):
        group = groups[f"round{r + 1}"]
        start = time.perf_counter()
        result = _learn_group(model, tokenizer, group, method, best["lr"], config, seq_len, background, seed)
        seconds = time.perf_counter() - start
        rounds.append({
            "round": r + 1, "seconds": seconds, "new_em": _em(model, tokenizer, group.qa),
            "paraphrased_em": _em(model, tokenizer, group.paraphrased),
            "old_em": _em(model, tokenizer, old_qa), "heldout_ppl": evaluate_perplexity(model, heldout)["perplexity"],
            "earlier_em": [_em(model, tokenizer, groups[f"round{k + 1}"].qa) for k in range(r)],
            "patch_bytes": result["patch"].nbytes if "patch" in result else None,
            "facts": len(group.qa)})
    return {"model": kind, "name": method, "lr": best["lr"], "lr_trials": trials, "old_em_before": old_before,
            "heldout_ppl_before": ppl_before, "rounds": rounds}


def _summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``methods`` row: means and spreads over seeds of the first round's numbers."""
    first = [run["rounds"][0] for run in per_seed]
    values = {
        "new_em": [f["new_em"] for f in first], "paraphrased_em": [f["paraphrased_em"] for f in first],
        "old_em_before": [run["old_em_before"] for run in per_seed], "old_em_after": [f["old_em"] for f in first],
        "heldout_ppl_before": [run["heldout_ppl_before"] for run in per_seed],
        "heldout_ppl_after": [f["heldout_ppl"] for f in first], "seconds": [f["seconds"] for f in first],
        "seconds_per_fact": [f["seconds"] / f["facts"] for f in first],
    }
    row: dict[str, Any] = {"name": per_seed[0]["name"], "model": per_seed[0]["model"], "seeds": len(per_seed),
                           "lr": [run["lr"] for run in per_seed]}
    for key, samples in values.items():
        e = estimate(samples)
        row[key], row[f"{key}_spread"] = e.mean, e.spread
    patches = [f["patch_bytes"] for f in first if f["patch_bytes"] is not None]
    row["patch_bytes"] = sum(patches) / len(patches) if patches else None
    row["bytes_per_fact"] = row["patch_bytes"] / first[0]["facts"] if patches else None
    return row


def run_continual(path: str | Path, out_dir: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Pretrain, then learn world B's groups with every method, over seeds; write results.json,
    continual.md and continual.png into ``out_dir`` and return the results."""
    start = time.perf_counter()
    config = load_config(ContinualConfig, path)
    demo = demo_config(False, [*config.demo_overrides, *overrides], preset=config.preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_world(demo, out_dir)
    chosen = largest_of_each_kind(build_runs(demo, data, str(out_dir), tokenizer.vocab_size))
    pretrain = [chosen["dense"], chosen["memory"]]
    summaries = train_suite(with_seeds(pretrain, config.seeds), demo.workers)
    world_a = generate_world(demo.facts)
    old_qa = world_a.qa_pairs("seen")[: config.old_questions]
    heldout = pack_documents(tokenizer.encode_batch(read_documents(data.heldout)), demo.seq_len,
                             tokenizer.bos_id, tokenizer.eos_id)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    total = config.seeds * (len(config.memory_methods) + len(config.dense_methods))
    with tqdm(total=total, unit="method", desc="continual", dynamic_ncols=True) as bar:
        for seed in range(config.seeds):
            groups = new_fact_groups(world_a, config, seed)
            for index, run in enumerate(pretrain):
                checkpoint = summaries[index * config.seeds + seed]["checkpoint"]
                methods = config.memory_methods if run.kind == "memory" else config.dense_methods
                for method in methods:
                    bar.set_postfix_str(f"seed {seed}, {run.kind} {method}")
                    torch.manual_seed(seed)
                    result = method_runs(checkpoint, run.kind, method, groups, old_qa, heldout, config, seed)
                    runs.setdefault((run.kind, method), []).append(result)
                    bar.update()
    results = {
        "methods": [_summary(per_seed) for per_seed in runs.values()],
        "rounds": [{"model": kind, "name": method, "per_seed": per_seed} for (kind, method), per_seed in runs.items()],
        "config": {"continual": to_dict(config), "demo": to_dict(demo)},
        "overrides": list(overrides),
        "seeds": config.seeds,
        "seconds": time.perf_counter() - start,
    }
    write_continual(results, out_dir, str(path))
    return results

