"""Evaluation of a model sharded over the ranks of a torchrun job, with the ranks in lockstep.

The forward of a sharded model is a collective: FSDP2 all-gathers each
block's parameters and a memory-parallel layer gathers the lookups of its
whole group. Every rank must therefore run the same number of forwards, or
the rank that stops first leaves the others waiting inside a collective until
the timeout kills the job (or, worse, pairs one rank's forward with another
forward of its peer). Batches by length, shares of uneven size and greedy
decoding that stops at EOS all make that count differ from rank to rank.

So the evaluation functions agree on it: every rank is given the same
batches and scores its share of them (:meth:`Ranks.rounds`), a rank with
fewer batches runs a placeholder forward per missing one
(:meth:`Ranks.idle_forward`), a generation batch stops only when it is done
on every rank (:meth:`Ranks.all`), and the results are gathered
(:meth:`Ranks.gather`) so that every rank returns those of the whole input,
from the same batches as one process would run. Bad input on one rank stops
them all (:meth:`Ranks.agree`). For a model in one process all of this
reduces to the plain loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from memlayers.distributed.comm import collective


class Ranks:
    """The ranks whose forwards ``model`` spans: every rank of the job when the model has
    sharded (DTensor) parameters in an initialised process group, else this process alone."""

    def __init__(self, model: nn.Module):
        self.rank, self.world = 0, 1
        if dist.is_available() and dist.is_initialized():
            if any(isinstance(p, DTensor) for p in model.parameters()):
                self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = next(model.parameters()).device

    def rounds(self, batches: list[Sized], bar: tqdm | None = None) -> Iterator[Sized | None]:
        """This rank's share of ``batches`` (the same list on every rank), one batch per round:
        batch ``round * world + rank``, or None once this rank has none left. Every rank
        runs the same number of rounds. ``bar`` advances by the items of the round's batches
        on all ranks."""
        for first in range(0, len(batches), self.world):
            together = batches[first : first + self.world]
            yield together[self.rank] if self.rank < len(together) else None
            if bar is not None:
                bar.update(sum(len(batch) for batch in together))

    def most(self, *values: int) -> list[int]:
        """Each of ``values`` maximised over the ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.long, device=self.device)  # (n,)
        with collective("all-reduce of an evaluation count"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` is True on every rank."""
        return not self.most(int(not flag))[0]

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (picklable), concatenated in rank order."""
        if self.world == 1:
            return list(items)
        parts: list[list | None] = [None] * self.world
        with collective("all-gather of evaluation results"):
            dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def agree(self, error: Exception | None, same: bytes = b"") -> None:
        """Raise on every rank when any rank met bad input, or when ``same`` (e.g. the
        inputs every rank must share, as bytes) differs between ranks; do nothing otherwise.

        ``error`` (this rank's, or None) is raised here; the other ranks raise a
        ValueError pointing to it, instead of waiting for this rank in a collective.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        digest = int.from_bytes(hashlib.sha256(same).digest()[:7], "big")  # 56 bits: fits an int64
        failed, most, least = self.most(error is not None, digest, -digest)
        if error is not None:
            raise error
        if failed:
            raise ValueError("evaluation refused on another rank (its error says why); every rank stops")
        if most != -least:
            raise ValueError("evaluation inputs differ between ranks; every rank must pass the same ones")

    def idle_forward(self, model: nn.Module) -> None:
        """A throwaway forward of one token: a rank with nothing left to score runs it
        while the others score a batch, so that their collectives meet."""
        if self.world > 1:
            model(torch.zeros((1, 1), dtype=torch.long, device=self.device))  # (1, 1)

    def progress(self, total: int, desc: str, enabled: bool) -> tqdm:
        """A progress bar (rate and ETA) over ``total`` questions, shown when ``enabled``
        and only by the job's rank 0."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return tqdm(total=total, desc=desc, unit="question", disable=not enabled or rank > 0, dynamic_ncols=True)

