"""Memory usage statistics: which slots are read, and how evenly.

Cheap enough to run on every training step: an update adds the batch's reads
into one count per slot on the model's device (an ``index_add_``: no sort, no
copy to the host, nothing that waits for the device), and the statistics are
computed only when they are read, at log time.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

_paused = threading.local()


@contextlib.contextmanager
def usage_paused() -> Iterator[None]:
    """Within it, :meth:`UsageTracker.update` counts nothing (an activation-checkpointed
    block recomputing its forward in backward reads the memory a second time)."""
    depth = getattr(_paused, "depth", 0)
    _paused.depth = depth + 1
    try:
        yield
    finally:
        _paused.depth = depth


class UsageTracker:
    """Slot reads counted since the last :meth:`read` (or :meth:`reset`).

    ``update(indices)`` adds one batch of reads without synchronising with the
    device; :meth:`stats` (or :meth:`read`, which also starts a new window)
    returns, over the batches since the window began:

    - ``coverage``: fraction of all slots read at least once;
    - ``kl_uniform``: KL(p || uniform) of the read distribution p, in nats: 0
      when reads are spread evenly, ``log(n_slots)`` when one slot gets them all.
    """

    def __init__(self, n_slots: int, device: torch.device | str = "cpu"):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.n_slots = n_slots
        self.counts = torch.zeros(n_slots, dtype=torch.long, device=device)  # (n_slots,)
        self.batches = 0

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        """Add one batch of slot indices (any shape, values in ``[0, n_slots)``), unless
        inside :func:`usage_paused`."""
        if getattr(_paused, "depth", 0):
            return
        flat = indices.detach().reshape(-1).to(self.counts.device)  # (reads,)
        self.counts.index_add_(0, flat, torch.ones_like(flat))
        self.batches += 1

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Coverage and KL from uniform of the reads in the current window."""
        return {"coverage": int((self.counts > 0).sum()) / self.n_slots, "kl_uniform": kl_from_uniform(self.counts)}

    def read(self) -> dict[str, float]:
        """:meth:`stats`, then start a new window."""
        stats = self.stats()
        self.reset()
        return stats

    def reset(self) -> None:
        """Forget the window."""
        self.counts.zero_()
        self.batches = 0


def kl_from_uniform(counts: torch.Tensor) -> float:
    """KL(p || uniform) in nats of the read distribution ``counts`` over its slots: 0 when
    reads are spread evenly, ``log(n_slots)`` when one slot gets them all (0 for no reads)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float((p * p.log()).sum()) + math.log(counts.numel())
