"""Teaching a trained model new text: sparse memory finetuning, value finetuning, full finetuning, LoRA.

Every method trains on the same batches of the new text (packed rows, a fresh
order each epoch) and differs in what may change:

    sparse  per batch, the ``top_t`` value rows it reads most specifically
            (TF-IDF against background slot statistics; :mod:`.sparse`);
            everything else frozen. SGD by default, as the follow-up paper
            found best; AdamW on request. A row-sparse step: its cost is the
            batch's rows, never the table.
    values  every value row the batch reads; everything else frozen.
    full    every parameter (AdamW by default).
    lora    LoRA adapters of the ``peft`` library on the attention and dense
            FFN projections; the base weights frozen and untouched.

``sparse`` and ``values`` return a :class:`~memlayers.continual.patch.MemoryPatch`
of what they changed; ``lora`` the adapter weights; ``full`` changes the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from memlayers.config import check
from memlayers.continual.patch import MemoryPatch
from memlayers.continual.slot_stats import SlotStats
from memlayers.continual.sparse import (
    RANKINGS,
    RowSelector,
    sparse_step,
    train_values_only,
    value_tables,
)
from memlayers.data.packing import BatchIterator
from memlayers.memory.layer import MemoryLayer
from memlayers.train.row_optim import RowAdamW, RowSGD

METHODS = ("sparse", "values", "full", "lora")
DEFAULT_OPTIMIZER = {"sparse": "sgd", "values": "sgd", "full": "adamw", "lora": "adamw"}
# SGD on value rows wants rates in the thousands: a row's gradient is its share of the softmax
# weights of the few tokens that read it, averaged over the batch's tokens. These are the middle of
# demo --continual's grid (3 seeds, docs/continual): a third of new facts learned for a fifth
# (values) to a third (sparse) of the old EM lost; higher rates learn more and forget more.
DEFAULT_LR = {"sparse": 3e4, "values": 1e4, "full": 1e-3, "lora": 1e-3}


@dataclass
class LearnConfig:
    """How ``memlayers learn`` trains on new text (dotted overrides: ``learn.top_t=100``)."""

    method: str = "sparse"
    """sparse | values | full | lora"""
    lr: float | None = None
    """Learning rate; null: the method's default (SGD 3e4 for sparse, 1e4 for values, AdamW 1e-3 otherwise)."""
    optimizer: str | None = None
    """sgd | adamw; null: SGD for sparse and values, AdamW for full and lora."""
    top_t: int = 5000
    """Value rows per table that one batch may change (sparse). The follow-up paper's 500 (for a
    1M-slot memory) learned nothing on the demo's 65k-slot memory at any rate."""
    ranking: str = "tfidf"
    """How sparse ranks a batch's rows: tfidf (the paper's) or kl (its share of the batch's
    reads against the background's, :class:`~memlayers.continual.sparse.RowSelector`)."""
    epochs: int = 1
    """Passes over the new text (when ``steps`` is 0)."""
    steps: int = 0
    """Optimizer steps; 0: ``epochs`` passes."""
    batch_size: int = 8
    seq_len: int | None = None
    """Tokens per sequence; null: the model's training seq_len."""
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 0
    """Steps between evaluations of new and old knowledge (0: only before and after)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        check(self.optimizer in (None, "sgd", "adamw"), "optimizer", f"must be sgd or adamw, got {self.optimizer!r}")
        check(self.ranking in RANKINGS, "ranking", f"must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        for name in ("top_t", "epochs", "batch_size", "lora_rank"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every", "weight_decay"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.seq_len is None or self.seq_len >= 1, "seq_len", f"must be >= 1, got {self.seq_len}")

    @property
    def resolved_lr(self) -> float:
        """``lr``, or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def resolved_optimizer(self) -> str:
        """``optimizer``, or the method's default."""
        return self.optimizer or DEFAULT_OPTIMIZER[self.method]


def _train_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Freeze every parameter of ``model`` except ``params``."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _memory_layers(model: nn.Module) -> dict[str, MemoryLayer]:
    """The memory layers of ``model`` by module name (none for a dense model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MemoryLayer)}


def _lora_targets(model: nn.Module) -> list[str]:
    """Names of the attention and dense FFN projections: every ``nn.Linear`` outside the memory
    layers, but the output head."""
    memory = tuple(name + "." for name in _memory_layers(model))
    heads = ("output", "lm_head")  # memlayers' and transformers' output heads
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and name.rsplit(".", 1)[-1] not in heads and not name.startswith(memory)]


def _optimizer(config: LearnConfig, params: list[nn.Parameter], row_sparse: bool) -> torch.optim.Optimizer:
    lr, wd = config.resolved_lr, config.weight_decay
    if row_sparse:
        return RowSGD(params, lr=lr, weight_decay=wd) if config.resolved_optimizer == "sgd" else RowAdamW(
            params, lr=lr, weight_decay=wd)
    if config.resolved_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def learn(model: nn.Module, rows: torch.Tensor, config: LearnConfig, background: SlotStats | None = None,
          evaluate: Callable[[], dict[str, float]] | None = None, progress: bool = True,
          log: Callable[[dict[str, Any]], None] = lambda record: None) -> dict[str, Any]:
    """Train ``model`` (in place) on ``rows`` ``(n, L + 1)`` of new text with ``config.method``.

    ``background`` (slot statistics of the model over background data) is needed by
    ``sparse``. ``evaluate()`` is called before, every ``eval_every`` steps and after;
    every record (losses, evaluations) goes to ``log``. Returns ``steps``, ``seconds``,
    ``loss`` (the last), the evaluations ``before`` and ``after``, and per method
    ``patch`` (sparse, values) or ``adapter`` (lora: its state dict).
    """
    if config.method == "sparse" and background is None:
        raise ValueError("sparse memory finetuning needs background slot statistics (memlayers slot-stats)")
    if config.method in ("sparse", "values") and not _memory_layers(model):
        raise ValueError(f"method {config.method} changes memory value rows: the model has no memory layers")
    device = next(model.parameters()).device
    row_sparse = config.method in ("sparse", "values")
    if row_sparse:
        params = list(train_values_only(model).values())
    else:
        if config.method == "lora":
            from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

            # a model that learned with LoRA before (an earlier round) keeps training its adapters
            if not any("lora_" in name for name, _ in model.named_parameters()):
                model = inject_adapter_in_model(LoraConfig(
                    r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                    target_modules=_lora_targets(model)), model).to(device)
            params = [p for name, p in model.named_parameters() if "lora_" in name]
        else:
            params = list(model.parameters())
        _train_only(model, params)
        for layer in _memory_layers(model).values():
            layer.table_grad = "dense"
    before = {name: t.detach().clone() for name, t in value_tables(model).items()} if row_sparse else {}
    optimizer = _optimizer(config, params, row_sparse)
    selector = RowSelector(model, background, config.top_t, config.ranking) if config.method == "sparse" else None
    batches = BatchIterator(rows, config.batch_size, config.seed)
    steps = config.steps or config.epochs * (rows.shape[0] // config.batch_size)
    result: dict[str, Any] = {"before": evaluate() if evaluate else {}}
    log({"step": 0, **result["before"]})
    model.train()
    start, loss = time.perf_counter(), float("nan")
    for step in tqdm(range(1, steps + 1), unit="step", desc=f"learn ({config.method})", disable=not progress,
                     dynamic_ncols=True):
        inputs, targets = (t.to(device) for t in next(batches))
        if selector is not None:
            loss, _ = sparse_step(model, selector, optimizer, inputs, targets)
        else:
            optimizer.zero_grad()
            out = model(inputs, targets).loss
            out.backward()
            optimizer.step()
            loss = float(out.detach())
        log({"step": step, "loss": loss})
        if config.eval_every and evaluate and step % config.eval_every == 0 and step < steps:
            model.eval()
            log({"step": step, **evaluate()})
            model.train()
    model.eval()
    optimizer.zero_grad()
    result.update(steps=steps, seconds=time.perf_counter() - start, loss=loss)
    result["after"] = evaluate() if evaluate else {}
    log({"step": steps, **result["after"]})
    if row_sparse:
        result["patch"] = MemoryPatch.between(before, model, {
            "method": config.method, "top_t": config.top_t if config.method == "sparse" else None,
            "ranking": config.ranking if config.method == "sparse" else None, "steps": steps,
            "lr": config.resolved_lr, "optimizer": config.resolved_optimizer})
    if config.method == "lora":
        result["adapter"] = get_peft_model_state_dict(model)
    return result
