"""A short demo: dense vs memory models learning a synthetic table of facts.

Each fact is ``subject (2 tokens), relation -> value``; a batch packs random
facts into sequences and the loss is on the value tokens only. After
training, accuracy is the fraction of all facts whose value the model
predicts (argmax) given subject and relation.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm import tqdm

from memlayers.memory.config import MemoryConfig
from memlayers.model.accounting import count_flops, count_parameters
from memlayers.model.config import ModelConfig
from memlayers.model.transformer import Transformer
from memlayers.train.optim import OptimConfig, build_optimizer, clip_gradients

SUBJECT_TOKENS = 96  # subjects are pairs of these
RELATIONS = 8
VALUES = 256


def make_facts(n_facts: int, generator: torch.Generator) -> torch.Tensor:
    """``(n_facts, 4)`` rows ``[subject_a, subject_b, relation, value]`` with distinct (subject, relation)."""
    keys = torch.randperm(SUBJECT_TOKENS * SUBJECT_TOKENS * RELATIONS, generator=generator)[:n_facts]
    subject, relation = keys // RELATIONS, keys % RELATIONS
    a = subject // SUBJECT_TOKENS
    b = subject % SUBJECT_TOKENS + SUBJECT_TOKENS
    relation = relation + 2 * SUBJECT_TOKENS
    value = torch.randint(0, VALUES, (n_facts,), generator=generator) + 2 * SUBJECT_TOKENS + RELATIONS
    return torch.stack([a, b, relation, value], dim=1)


def batch_of(facts: torch.Tensor, batch: int, per_sequence: int, generator: torch.Generator):
    """Tokens and targets ``(batch, 4 * per_sequence)``; only value positions have targets."""
    rows = facts[torch.randint(0, len(facts), (batch * per_sequence,), generator=generator)]  # (B*F, 4)
    tokens = rows.view(batch, -1)  # (B, 4F)
    targets = torch.full_like(tokens, -100)
    targets[:, 2::4] = tokens[:, 3::4]  # the relation position predicts the value
    return tokens, targets


@torch.no_grad()
def fact_accuracy(model: Transformer, facts: torch.Tensor) -> float:
    """Fraction of facts whose value is the argmax after subject and relation."""
    model.eval()
    hits = 0
    for chunk in facts.split(1024):
        logits = model(chunk[:, :3]).logits[:, -1]  # (n, vocab)
        hits += int((logits.argmax(-1) == chunk[:, 3]).sum())
    model.train()
    return hits / len(facts)


def train_one(name: str, config: ModelConfig, facts: torch.Tensor, steps: int, seed: int) -> dict:
    """Train one model on the facts and report its accuracy."""
    torch.manual_seed(seed)
    model = Transformer(config)
    optim_config = OptimConfig(lr=3e-3, weight_decay=0.0, value_lr=1e-2)
    optimizer = build_optimizer(model, optim_config)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{name:>8}", unit="step", dynamic_ncols=True)
    for step in bar:
        lr_scale = min(1.0, (step + 1) / 30)
        for group in optimizer.param_groups:
            group["lr"] = lr_scale * (optim_config.value_lr if group["name"] == "values" else optim_config.lr)
        tokens, targets = batch_of(facts, 32, 16, generator)
        loss = model(tokens, targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(optimizer, optim_config)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    params = count_parameters(config)
    return {
        "name": name,
        "params": params.total,
        "active_params": params.active,
        "flops_per_token": count_flops(config, 64).total,
        "seconds": seconds,
        "accuracy": fact_accuracy(model, facts),
    }


def run_smoke_demo(steps: int = 300, seed: int = 0, n_facts: int = 4000) -> list[dict]:
    """Train a dense and a memory model for ``steps`` steps and print a table."""
    generator = torch.Generator().manual_seed(seed)
    facts = make_facts(n_facts, generator)
    dense = ModelConfig(dim=64, n_layers=4, n_heads=4, vocab_size=2 * SUBJECT_TOKENS + RELATIONS + VALUES,
                        max_seq_len=64, multiple_of=32)
    memory = dataclasses.replace(
        dense, memory_layers=(2,), memory=MemoryConfig(n_keys=128, heads=4, knn=16, k_dim=64, qk_norm=True)
    )
    results = [train_one("dense", dense, facts, steps, seed), train_one("memory", memory, facts, steps, seed)]
    print(f"\n{n_facts} facts, {steps} steps of 512 sequences-tokens")
    print(f"{'model':>8} {'params':>10} {'active':>10} {'FLOPs/tok':>10} {'seconds':>8} {'accuracy':>9}")
    for r in results:
        print(f"{r['name']:>8} {r['params']:>10,} {r['active_params']:>10,} {r['flops_per_token']:>10,.0f} "
              f"{r['seconds']:>8.1f} {r['accuracy']:>9.1%}")
    return results
