"""A failed collective shard write is one clear line, and the newest complete checkpoint stays.

DCP raises ``CheckpointException``, a ``BaseException`` that no ``except Exception`` sees;
these tests run ``save_sharded`` in a one-rank gloo group in this process.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from memlayers.train import sharded_checkpoint
from memlayers.train.checkpoint import CheckpointError, list_checkpoints
from memlayers.train.sharded_checkpoint import dcp_cause, load_sharded, save_sharded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint import assert_state_equal, clone_state, model_config, new_model, trained


def _failure(error: BaseException) -> tuple[BaseException, traceback.StackSummary]:
    return error, traceback.StackSummary()


def test_dcp_cause_names_the_first_failing_rank_in_one_line():
    error = CheckpointException("write", {
        2: _failure(OSError(28, "No space left on device")),
        1: _failure(RuntimeError("Read error: Connection reset by peer\nThis is typically caused by ...")),
    })
    assert "Traceback" in str(error)  # what printing the exception itself would show
    assert dcp_cause(error) == "rank 1: RuntimeError: Read error: Connection reset by peer"
    assert dcp_cause(RuntimeError("")) == "RuntimeError"


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_failed_shard_write_is_a_checkpoint_error_and_keeps_the_newest_checkpoint(tmp_path, monkeypatch, one_rank_group):
    model, optimizer = trained(steps=2)
    kept = clone_state(model)
    save_sharded(tmp_path, 2, model, optimizer, {"note": "kept"})

    def lost_peer(*args, **kwargs):
        raise CheckpointException("write", {1: _failure(RuntimeError("Connection reset by peer"))})

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", lost_peer)
    with pytest.raises(CheckpointError) as info:
        save_sharded(tmp_path, 4, model, optimizer, {"note": "lost"})
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("the shards of checkpoint step 4 could not be written (rank 1: RuntimeError: Connection")
    assert message.endswith("restart with --resume")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    monkeypatch.undo()
    fresh, fresh_optimizer = new_model(model_config(), seed=123)
    load_sharded(list_checkpoints(tmp_path)[0], fresh, fresh_optimizer)
    assert_state_equal(clone_state(fresh), kept)


def test_an_interrupt_caught_by_dcp_ends_the_command_as_interrupted(tmp_path, monkeypatch, one_rank_group):
    """SIGTERM (torchrun stopping the survivors of a lost rank) inside DCP's own code is wrapped
    into a CheckpointException there; it must leave as the interrupt it was."""
    import signal

    from memlayers.procs import Interrupted

    model, optimizer = trained(steps=1)
    stop = Interrupted(signal.SIGTERM)

    def interrupted(*args, **kwargs):
        raise CheckpointException("write", {0: _failure(stop)})

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", interrupted)
    with pytest.raises(Interrupted) as info:
        save_sharded(tmp_path, 2, model, optimizer, {})
    assert info.value is stop and info.value.exit_code == 143


def test_loading_in_one_process_is_quiet(tmp_path, one_rank_group):
    # DCP warns on every no_dist load that it assumes one process; that is what no_dist asks for
    model, optimizer = trained(steps=1)
    kept = clone_state(model)
    save_sharded(tmp_path, 1, model, optimizer, {})
    fresh, fresh_optimizer = new_model(model_config(), seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sharded(list_checkpoints(tmp_path)[0], fresh, fresh_optimizer, no_dist=True)
    assert_state_equal(clone_state(fresh), kept)
