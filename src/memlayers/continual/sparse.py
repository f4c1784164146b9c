"""Sparse memory finetuning: per batch, only the value rows that matter most to it may change.

Lin et al. (*Continual Learning via Sparse Memory Finetuning*, arXiv 2510.15103)
learn new facts in a memory model by updating, for each batch, only the ``t``
value rows that batch reads most *specifically*: rows ranked by TF-IDF, the
row's reads in the batch (term frequency) times its inverse document frequency
over background batches (:meth:`SlotStats.idf`). Rows that every background
batch reads (general-purpose ones) rank low, so what the model already knows is
left alone. Every other parameter is frozen.

:class:`RowSelector` counts a batch's reads through hooks on the memory
layers' searches and, after the forward pass, names the rows of each value
table that may change, ranked by TF-IDF or, as an alternative, by each row's
term of the KL divergence of the batch's read distribution from the
background's (rows the batch reads much more often than the background does
rank first); :func:`sparse_step` runs one such step with a row-sparse
optimizer, so its cost is the batch's rows, never the table.
"""

from __future__ import annotations

import torch
from torch import nn

from memlayers.continual.slot_stats import SlotStats, memory_layout, naming_root

RANKINGS = ("tfidf", "kl")


class RowSelector:
    """Ranks the value rows a batch reads against background statistics (``ranking``:
    ``tfidf``, the paper's, or ``kl``: ``p log(p / q)`` of the row's share ``p`` of the
    batch's reads against its share ``q`` of the background's, add-one smoothed).

    Use as a context manager around the forward pass of a batch, then call
    :meth:`select`::

        with selector:
            loss = model(inputs, targets).loss
        rows = selector.select()  # {value table name: (<= top_t,) row ids}
    """

    def __init__(self, model: nn.Module, background: SlotStats, top_t: int, ranking: str = "tfidf"):
        if top_t < 1:
            raise ValueError(f"top_t must be >= 1, got {top_t}")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {list(RANKINGS)}, got {ranking!r}")
        background.check_model(model)
        self.layout = memory_layout(model)
        self.tables = value_tables(model)  # the parameters whose rows it selects, by name
        self.top_t, self.ranking = top_t, ranking
        device = next(model.parameters()).device
        if ranking == "tfidf":
            weight = {table: background.idf(table) for table in background.batches}
        else:  # log of the background's share of reads, smoothed so that unread rows stay finite
            weight = {}
            for table in background.batches:
                reads = background.table_reads(table).double() + 1  # (n_slots,)
                weight[table] = (reads / reads.sum()).log()
        self.weight = {table: w.float().to(device) for table, w in weight.items()}  # (n_slots,) each
        self.tf = {table: torch.zeros(w.numel(), device=device) for table, w in self.weight.items()}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RowSelector:
        for layer, table in self.layout.values():
            self._hooks.append(layer.search.register_forward_hook(self._hook(table)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _hook(self, table: str):
        tf = self.tf[table]

        def count(module: nn.Module, inputs, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            flat = output[1].detach().reshape(-1)  # every (position, head, k) read
            tf.index_add_(0, flat, torch.ones_like(flat, dtype=tf.dtype))

        return count

    def scores(self, table: str) -> torch.Tensor:
        """``(n_slots,)`` rank score of ``table``'s rows in the current batch (0 for rows not read)."""
        tf = self.tf[table]
        if self.ranking == "tfidf":
            return tf * self.weight[table]
        p = tf / tf.sum().clamp_min(1)  # the batch's share of reads
        return torch.where(tf > 0, p * (p.clamp_min(1e-30).log() - self.weight[table]), torch.zeros_like(p))

    def select(self) -> dict[str, torch.Tensor]:
        """Per value table, its ``top_t`` rows by score among those the batch read (all of
        them when it read fewer), ascending; the batch's counts are then cleared."""
        chosen = {}
        for table, tf in self.tf.items():
            scores = self.scores(table)
            k = min(self.top_t, int((tf > 0).sum()))
            chosen[table] = scores.topk(k).indices.sort().values  # (k,)
            tf.zero_()
        return chosen


def value_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """The value table parameters of ``model``'s memory, by parameter name."""
    params = dict(naming_root(model).named_parameters(remove_duplicate=False))
    return {table: params[table] for _, table in memory_layout(model).values()}


def train_values_only(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze every parameter but the value tables, whose layers then leave row gradients
    (``table_grad="rows"``, what the row-sparse optimizers read); returns the tables."""
    tables = value_tables(model)
    keep = {id(p) for p in tables.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for layer, _ in memory_layout(model).values():
        layer.table_grad = "rows"
    return tables


def sparse_step(model: nn.Module, selector: RowSelector, optimizer: torch.optim.Optimizer,
                inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One step of sparse memory finetuning on ``(inputs, targets)`` ``(B, L)``.

    ``optimizer`` is a row-sparse one (:mod:`memlayers.train.row_optim`) over the value
    tables, the only trainable parameters (their layers reading with ``table_grad="rows"``
    keeps the step's cost to the batch's rows). Returns the loss and, per table, the rows
    allowed to change.
    """
    optimizer.zero_grad()
    with selector:
        loss = model(inputs, targets).loss
    chosen = selector.select()
    loss.backward()
    optimizer.step(only_rows={id(selector.tables[name]): rows for name, rows in chosen.items()})
    return float(loss.detach()), chosen
