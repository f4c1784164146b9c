"""Metrics logging: one JSON object per line, and TensorBoard when it is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends ``{"step": N, ...}`` lines to ``run_dir/metrics.jsonl``.

    If ``tensorboard`` is importable, scalars also go to ``run_dir/tensorboard``.
    On resume, lines from steps after the resumed step are dropped first, so
    the log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled  # off on every rank but 0 of a distributed run
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # a line torn by a crash does not parse (step -1) and goes too
            kept = [line for line in self.path.read_text().splitlines() if 0 <= _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close the log (and the TensorBoard writer)."""
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
