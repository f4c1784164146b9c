"""The verdict of a plan and what to change when it does not fit, each change re-planned.

A suggestion is a list of dotted overrides (what a user adds to the command
line of ``memlayers train`` or ``memlayers plan``). It is listed only when the
plan with it fits: more memory-parallel ranks, a row optimizer for the values,
activation checkpointing, or a smaller micro-batch with more gradient
accumulation (the same global batch). When none alone fits, all of them
together are planned and reported as well, fitting or not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memlayers.config import apply_overrides, from_dict, to_dict
from memlayers.distributed.plan import GB, Cluster, ModelShapes, Plan, check_layout, plan
from memlayers.train.config import RunConfig

CHECKPOINTING = "parallel.activation_checkpointing=true"


@dataclass(frozen=True)
class Suggestion:
    """A change and the plan with it."""

    overrides: tuple[str, ...]
    plan: Plan
    why: str
    """What the change does, in a few words."""

    @property
    def change(self) -> str:
        """The change as command-line arguments."""
        return " ".join(self.overrides)


def verdict(result: Plan) -> str:
    """``fits: X GB of Y GB per GPU`` or ``does not fit: needs X GB per GPU of Y``."""
    need, have = result.memory.total / GB, result.gpu_bytes / GB
    if result.fits:
        return f"fits: {need:,.1f} GB of {have:,.0f} GB per GPU"
    return f"does not fit: needs {need:,.1f} GB per GPU of {have:,.0f}"


def replanned(config: RunConfig, overrides: list[str]) -> RunConfig:
    """``config`` with dotted ``overrides`` applied, checked as a loaded config is."""
    return from_dict(RunConfig, apply_overrides(to_dict(config), overrides))


def _options(config: RunConfig, cluster: Cluster, shapes: ModelShapes) -> list[list[tuple[list[str], str]]]:
    """The kinds of change worth planning, each a list of ``(overrides, why)`` candidates from
    the smallest change to the largest (the first that fits is suggested)."""
    world, M = cluster.world, config.parallel.memory_parallel
    mps = []
    for k in range(M + 1, world + 1):
        try:
            check_layout(shapes, world, k)
        except ValueError:
            continue
        mps.append(([f"parallel.memory_parallel={k}"], f"shard tables and dense weights over {k} ranks"))
    optim = config.optim
    rows = [(["optim.value_optimizer=row_adamw", "optim.value_state_dtype=float32"], "row AdamW: state of touched rows"),
            (["optim.value_optimizer=row_adamw", "optim.value_state_dtype=bfloat16"], "row AdamW, bfloat16 moments"),
            (["optim.value_optimizer=row_adagrad"], "row Adagrad: 4 bytes of state per row")]
    if optim.value_optimizer == "row_adamw":
        rows = rows[1:] if optim.value_state_dtype == "float32" else rows[2:]
    elif optim.value_optimizer in ("row_adagrad", "row_sgd"):
        rows = []
    if not shapes.tables:
        rows = []
    B, A = config.train.batch_size, config.train.grad_accum
    batches = [([f"train.batch_size={b}", f"train.grad_accum={A * B // b}"],
                f"micro-batch {b}, accumulating {A * B // b}: the same global batch")
               for b in range(B - 1, 0, -1) if B % b == 0]
    checkpointing = [] if config.parallel.activation_checkpointing else [
        ([CHECKPOINTING], "recompute each block in the backward (about one more forward of compute)")]
    return [mps, rows, checkpointing, batches]


def suggestions(config: RunConfig, cluster: Cluster, shapes: ModelShapes) -> tuple[list[Suggestion], Suggestion | None]:
    """The single changes that make ``config`` fit (at most one of each kind), and, when
    there is none, the plan with all of them together (else None)."""
    found, strongest = [], []
    for candidates in _options(config, cluster, shapes):
        for overrides, why in candidates:
            result = plan(replanned(config, overrides), cluster, shapes)
            if result.fits:
                found.append(Suggestion(tuple(overrides), result, why))
                break
        if candidates:
            strongest.append(candidates[-1][0])  # the last candidate is the largest change of its kind
    if found:
        return found, None
    overrides = [o for group in strongest for o in group]
    combined = plan(replanned(config, overrides), cluster, shapes)
    return [], Suggestion(tuple(overrides), combined, "all of the changes together")


def report(config: RunConfig, cluster: Cluster, result: Plan, found: list[Suggestion],
           combined: Suggestion | None) -> dict:
    """Everything the plan says, as a JSON-ready dict."""

    def brief(suggestion: Suggestion) -> dict:
        return {"change": suggestion.change, "overrides": list(suggestion.overrides), "why": suggestion.why,
                "bytes_per_gpu": suggestion.plan.memory.total, "fits": suggestion.plan.fits}

    body = asdict(result)
    body["memory"]["total"] = result.memory.total
    body["communication"]["total"] = result.communication.total
    body["time"]["step"] = result.time.step
    body["tokens_per_second"] = result.tokens_per_second
    return {
        "cluster": {**asdict(cluster), "world": cluster.world},
        "plan": body,
        "fits": result.fits,
        "verdict": verdict(result),
        "suggestions": [brief(s) for s in found],
        "combined": None if combined is None else brief(combined),
    }
