"""Deterministic fault injection: make a process die, hang or fail at a named point.

The reliability tests (and ``benchmarks/bench_reliability.py``) need faults
that land at a known place, never at a time that depends on how loaded the
machine is. The trainer and the checkpoint writer call :func:`fault_point` at
every phase of a step and of a checkpoint write; the environment variable
``MEMLAYERS_FAULT`` says which one misbehaves::

    MEMLAYERS_FAULT="kill@checkpoint.rename:step=10:rank=1"

is ``ACTION@POINT`` with optional ``:step=N`` (the training step, or the step
of the checkpoint being written) and ``:rank=R`` (torchrun's ``RANK``; one
process is rank 0). Actions:

- ``kill``: SIGKILL itself (no cleanup, no goodbye: a power cut or the OOM killer);
- ``hang``: say so on stderr, then sleep forever (a deadlocked or stalled rank; its peers time out);
- ``raise``: raise :class:`InjectedFault` (an unexpected error mid-phase);
- ``nan``: returned to the caller, which poisons a value (the trainer's loss).

Points (see where they are called): ``step.start``, ``step.backward``,
``step.optimizer``, ``step.end``, ``step.loss``; ``checkpoint.begin``,
``checkpoint.shards`` (a sharded checkpoint's collective write is about to start),
``checkpoint.write.<file>`` (after each file), ``checkpoint.rename``,
``checkpoint.renamed``, ``checkpoint.prune``. Without the variable every
call is a dictionary lookup and nothing happens.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import cache

ENV = "MEMLAYERS_FAULT"
ACTIONS = ("kill", "hang", "raise", "nan")
POINTS = (
    "step.start", "step.backward", "step.optimizer", "step.end", "step.loss",
    "checkpoint.begin", "checkpoint.shards", "checkpoint.write", "checkpoint.rename", "checkpoint.renamed", "checkpoint.prune",
)


class InjectedFault(RuntimeError):
    """Raised by a ``raise@POINT`` fault."""


@dataclass(frozen=True)
class Fault:
    """One parsed ``MEMLAYERS_FAULT`` value."""

    action: str
    point: str
    step: int | None = None
    rank: int | None = None


@cache
def parse_fault(spec: str) -> Fault:
    """``"kill@checkpoint.rename:step=10:rank=1"`` -> :class:`Fault`; a malformed spec raises ValueError."""
    head, *options = spec.strip().split(":")
    action, sep, point = head.partition("@")
    if not sep or action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: expected ACTION@POINT[:step=N][:rank=R] with ACTION in {list(ACTIONS)}")
    if not any(point == p or point.startswith(p + ".") for p in POINTS):
        raise ValueError(f"{ENV}={spec!r}: unknown point {point!r}; points are {list(POINTS)}")
    fields: dict[str, int] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("step", "rank") or not value.lstrip("-").isdigit():
            raise ValueError(f"{ENV}={spec!r}: options are step=N and rank=R, got {option!r}")
        fields[key] = int(value)
    return Fault(action, point, **fields)


def fault_point(point: str, step: int | None = None) -> str | None:
    """Misbehave here if ``MEMLAYERS_FAULT`` names this point (and step and rank).

    ``kill`` and ``hang`` never return, ``raise`` raises; ``nan`` is returned
    for the caller to act on. Otherwise (the normal case) returns None.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return None
    fault = parse_fault(spec)
    if fault.point != point or (fault.step is not None and fault.step != step):
        return None
    if fault.rank is not None and fault.rank != int(os.environ.get("RANK", "0")):
        return None
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "hang":  # said first, so a test can act once the process is there
        print(f"memlayers: fault: hanging at {point} (step {step})", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at {point} (step {step})")
    return fault.action
