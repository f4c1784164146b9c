"""Kill a run at every phase of a step and of a checkpoint write; it resumes from the newest
complete checkpoint and repeats the lost steps bit for bit (one process and torchrun)."""

from __future__ import annotations

import pytest

from memlayers.bench.reliability import (
    CHECKPOINT_POINTS,
    SHARDED_POINTS,
    STEP_POINTS,
    crash_and_resume,
)


def check(outcome) -> None:
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail} {outcome.extra}"
    assert outcome.resumed_exactly == 1 and outcome.checkpoints_lost == 0 and outcome.tracebacks == 0


@pytest.mark.slow
@pytest.mark.parametrize(("point", "step"), [(p, 5) for p in STEP_POINTS] + [(p, 4) for p in CHECKPOINT_POINTS])
def test_failed_at_every_phase_resumes_exactly(work, point, step):
    """Every phase, in this process: the fault raises and nothing runs before the exception leaves."""
    outcome = crash_and_resume(work, point, step=step, inline=True)
    check(outcome)
    committed = step == 5 or point in ("checkpoint.renamed", "checkpoint.prune")
    assert outcome.extra["resumed_from"] == (4 if committed else 2)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("point", "step"), [("step.backward", 5), ("checkpoint.write.optimizer.safetensors", 4), ("checkpoint.prune", 4)]
)
def test_a_killed_process_resumes_exactly(work, point, step):
    """SIGKILL for real at a few phases (the benchmark kills at all of them)."""
    outcome = crash_and_resume(work, point, step=step)
    check(outcome)
    assert outcome.extra["resumed_from"] == 4 if point != "checkpoint.write.optimizer.safetensors" else 2


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("point", "nproc", "rank"), [("checkpoint.write.shards", 2, 1), ("checkpoint.write.shards", 4, 3),
                                                    ("checkpoint.shards", 2, 1)])
def test_a_rank_killed_while_writing_its_shards_resumes_exactly(work, point, nproc, rank):
    """Killed after its shards (its peers may still be in DCP's last collective or the barrier),
    or as the collective write starts (its peers meet the loss inside DCP)."""
    assert point in SHARDED_POINTS
    outcome = crash_and_resume(work, point, step=4, nproc=nproc, rank=rank)
    check(outcome)
    assert outcome.extra["resumed_from"] == 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_hung_rank_stops_the_others_with_one_line_and_the_run_resumes(work):
    outcome = crash_and_resume(work, "step.start", step=5, nproc=2, rank=1, action="hang")
    check(outcome)
    assert outcome.extra["resumed_from"] == 4
