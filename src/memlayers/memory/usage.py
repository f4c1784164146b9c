"""Memory usage statistics: which slots are read, and how evenly.

Cheap enough to log every step: an update costs a sort of the batch's
indices (O(B log B) for B reads) and the window is kept as sparse counts,
so nothing proportional to the memory size is stored per batch.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class UsageTracker:
    """Slot-read statistics over the last ``window`` batches.

    ``update(indices)`` records one batch and returns its stats:

    - ``batch_slots``: distinct slots read in this batch;
    - ``batch_fraction``: that count over ``n_slots``;
    - ``coverage``: fraction of all slots read at least once in the window;
    - ``kl_uniform``: KL(p || uniform) of the window's read distribution p,
      in nats: 0 when reads are spread evenly, ``log(n_slots)`` when one slot
      gets them all.
    """

    def __init__(self, n_slots: int, window: int = 100, device: torch.device | str = "cpu"):
        if n_slots < 1 or window < 1:
            raise ValueError(f"n_slots and window must be >= 1, got {n_slots}, {window}")
        self.n_slots = n_slots
        self.window = window
        self.counts = torch.zeros(n_slots, dtype=torch.long, device=device)
        self._batches: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> dict[str, float]:
        """Add one batch of slot indices (any shape) and return its stats."""
        slots, counts = indices.detach().reshape(-1).to(self.counts.device).unique(return_counts=True)
        if slots.numel() and (slots.min() < 0 or slots.max() >= self.n_slots):
            raise ValueError(f"slot index out of range [0, {self.n_slots})")
        self.counts.index_add_(0, slots, counts)
        self._batches.append((slots, counts))
        if len(self._batches) > self.window:
            old_slots, old_counts = self._batches.popleft()
            self.counts.index_add_(0, old_slots, -old_counts)
        stats = self.stats()
        stats["batch_slots"] = float(slots.numel())
        stats["batch_fraction"] = slots.numel() / self.n_slots
        return stats

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Coverage and KL-from-uniform over the current window."""
        return {
            "coverage": int((self.counts > 0).sum()) / self.n_slots,
            "kl_uniform": kl_from_uniform(self.counts),
        }

    def reset(self) -> None:
        """Forget the window."""
        self.counts.zero_()
        self._batches.clear()


def kl_from_uniform(counts: torch.Tensor) -> float:
    """KL(p || uniform) in nats of the read distribution ``counts`` over its slots: 0 when
    reads are spread evenly, ``log(n_slots)`` when one slot gets them all (0 for no reads)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float((p * p.log()).sum()) + math.log(counts.numel())
