"""Sparse memory finetuning: per batch, only the value rows that matter most to it may change.

Lin et al. (*Continual Learning via Sparse Memory Finetuning*, arXiv 2510.15103)
learn new facts in a memory model by updating, for each batch, only the ``t``
value rows that batch reads most *specifically*: rows ranked by TF-IDF, the
row's reads in the batch (term frequency) times its inverse document frequency
over background batches (:meth:`SlotStats.idf`). Rows that every background
batch reads (general-purpose ones) rank low, so what the model already knows is
left alone. Every other parameter is frozen.

:class:`TfidfSelector` counts a batch's reads through hooks on the memory
layers' searches and, after the forward pass, names the rows of each value
table that may change; :func:`sparse_step` runs one such step with a row-sparse
optimizer, so its cost is the batch's rows, never the table.
"""

from __future__ import annotations

import torch
from torch import nn

from memlayers.continual.slot_stats import SlotStats, memory_layout, naming_root


class TfidfSelector:
    """Ranks the value rows a batch reads by TF-IDF against background statistics.

    Use as a context manager around the forward pass of a batch, then call
    :meth:`select`::

        with selector:
            loss = model(inputs, targets).loss
        rows = selector.select()  # {value table name: (<= top_t,) row ids}
    """

    def __init__(self, model: nn.Module, background: SlotStats, top_t: int):
        if top_t < 1:
            raise ValueError(f"top_t must be >= 1, got {top_t}")
        background.check_model(model)
        self.layout = memory_layout(model)
        self.tables = value_tables(model)  # the parameters whose rows it selects, by name
        self.top_t = top_t
        self.idf = {table: background.idf(table).float() for table in background.batches}
        device = next(model.parameters()).device
        self.tf = {table: torch.zeros(idf.numel(), device=device) for table, idf in self.idf.items()}
        self.idf = {table: idf.to(device) for table, idf in self.idf.items()}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TfidfSelector:
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
        """``(n_slots,)`` TF-IDF of ``table``'s rows in the current batch (0 for rows not read)."""
        return self.tf[table] * self.idf[table]

    def select(self) -> dict[str, torch.Tensor]:
        """Per value table, its ``top_t`` rows by TF-IDF among those the batch read (all of
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


def sparse_step(model: nn.Module, selector: TfidfSelector, optimizer: torch.optim.Optimizer,
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
