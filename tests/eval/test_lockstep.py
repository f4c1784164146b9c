"""Ranks: how the batches are shared out, and that one process needs no collective."""

import pytest
from torch import nn

from memlayers.eval.lockstep import Ranks


class CountingBar:
    """What Ranks.rounds needs of a tqdm bar."""

    def __init__(self):
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def _ranks(rank: int, world: int) -> Ranks:
    ranks = Ranks(nn.Linear(2, 2))
    ranks.rank, ranks.world = rank, world
    return ranks


def test_rounds_deal_the_batches_in_turn_and_every_rank_runs_as_many_rounds():
    batches = [[0, 1], [2], [3, 4, 5], [6], [7, 8]]
    seen = {}
    for rank in range(2):
        bar = CountingBar()
        seen[rank] = list(_ranks(rank, 2).rounds(batches, bar))
        assert bar.n == 9  # the items of all ranks' batches, counted on each
    assert seen[0] == [[0, 1], [3, 4, 5], [7, 8]]
    assert seen[1] == [[2], [6], None]  # a placeholder round where rank 1 has no batch left
    assert list(_ranks(0, 1).rounds(batches)) == batches
    assert list(_ranks(2, 3).rounds(batches[:2])) == [None]


def test_one_process_needs_no_collective():
    ranks = Ranks(nn.Linear(2, 2))  # no process group
    assert (ranks.rank, ranks.world) == (0, 1)
    assert ranks.most(3, 5) == [3, 5]
    assert ranks.all(True) and not ranks.all(False)
    assert ranks.gather([1, 2]) == [1, 2]
    ranks.agree(None, same=b"anything")
    with pytest.raises(ValueError, match="^bad$"):
        ranks.agree(ValueError("bad"))

