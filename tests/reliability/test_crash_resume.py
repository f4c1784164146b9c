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
@pytest.mark.multiprocess
@pytest.mark.parametrize("point", STEP_POINTS)
def test_killed_in_a_step_resumes_exactly(work, point):
    outcome = crash_and_resume(work, point, step=5)
    check(outcome)
    assert outcome.extra["resumed_from"] == 4


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("point", CHECKPOINT_POINTS)
def test_killed_while_writing_a_checkpoint_resumes_exactly(work, point):
    outcome = crash_and_resume(work, point, step=4)
    check(outcome)
    committed = point in ("checkpoint.renamed", "checkpoint.prune")
    assert outcome.extra["resumed_from"] == (4 if committed else 2)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("point", "step", "rank"),
    [("step.start", 5, 1), ("checkpoint.write.shards", 4, 1), ("checkpoint.rename", 4, 0), ("checkpoint.prune", 4, 0)],
)
def test_a_killed_rank_of_two_resumes_exactly(work, point, step, rank):
    assert point in SHARDED_POINTS or point in STEP_POINTS
    check(crash_and_resume(work, point, step=step, nproc=2, rank=rank))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_rank_of_four_resumes_exactly(work):
    check(crash_and_resume(work, "checkpoint.write.shards", step=4, nproc=4, rank=3))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_hung_rank_stops_the_others_with_one_line_and_the_run_resumes(work):
    outcome = crash_and_resume(work, "step.start", step=5, nproc=2, rank=1, action="hang")
    check(outcome)
    assert outcome.extra["resumed_from"] == 4
