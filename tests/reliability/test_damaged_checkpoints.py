"""Flip, truncate or delete each file of a checkpoint (single-process and sharded): resuming it
fails with one line naming the file and the checkpoint before it, which still resumes."""

from __future__ import annotations

import pytest

from memlayers.bench.reliability import CHECKPOINT_FILES, checkpoint_files, damaged_checkpoint

SHARDED_FILES = ("state.json", "tokenizer.json", "shards/shard-00001-model-00001-of-00001.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize(
    ("sharded", "file"),
    [(False, f) for f in CHECKPOINT_FILES] + [(True, f) for f in SHARDED_FILES],
    ids=[f"single-{f}" for f in CHECKPOINT_FILES] + [f"sharded-{f}" for f in SHARDED_FILES],
)
def test_a_damaged_checkpoint_is_named_and_the_one_before_resumes(work, sharded, file, how):
    assert file in checkpoint_files(work, sharded)
    outcome = damaged_checkpoint(work, sharded=sharded, file=file, how=how)
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"
    assert outcome.tracebacks == 0 and outcome.checkpoints_lost == 0
