"""The one checkpoint writer: a fault at any phase leaves only complete checkpoints, recover()
cleans up or restores what a crashed writer left, pruning never removes the newest."""

from __future__ import annotations

import pytest

from memlayers.faults import ENV, InjectedFault, fault_point, parse_fault
from memlayers.train import checkpoint_write
from memlayers.train.checkpoint_write import (
    begin,
    commit,
    list_checkpoints,
    manifest,
    prune,
    recover,
    verify,
)


def write(run_dir, step: int, keep_last: int | None = None):
    staging = begin(run_dir, step)
    (staging / "model.safetensors").write_bytes(bytes([step]) * 64)
    checkpoint_write.written(staging, "model.safetensors", step)
    checkpoint_write.write_state(staging, {"step": step, "files": manifest(staging)}, step)
    return commit(staging, step, keep_last)


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


POINTS = ["checkpoint.begin", "checkpoint.write.model.safetensors", "checkpoint.write.state.json",
          "checkpoint.rename", "checkpoint.renamed", "checkpoint.prune"]


@pytest.mark.parametrize("point", POINTS)
def test_a_fault_at_any_phase_leaves_complete_checkpoints_and_recover_cleans_up(tmp_path, monkeypatch, point):
    write(tmp_path, 1)
    write(tmp_path, 2)
    monkeypatch.setenv(ENV, f"raise@{point}:step=3")
    with pytest.raises(InjectedFault):
        write(tmp_path, 3, keep_last=1)
    monkeypatch.delenv(ENV)
    committed = point in ("checkpoint.renamed", "checkpoint.prune")
    steps = [p.name for p in list_checkpoints(tmp_path)]
    assert steps[-1] == ("step_00000003" if committed else "step_00000002")
    for path in list_checkpoints(tmp_path):  # whatever is visible is whole
        assert verify(path, checkpoint_write.json.loads((path / "state.json").read_text())["files"]) is None
    done = recover(tmp_path)
    assert all(not name.startswith(".") for name in names(tmp_path))
    assert bool(done) == (point not in ("checkpoint.renamed",))  # a staging or pruned dir was left


def test_recover_restores_a_step_whose_rewrite_was_interrupted(tmp_path):
    final = write(tmp_path, 4)
    before = (final / "model.safetensors").read_bytes()
    final.rename(final.with_name(".old_" + final.name))  # the crash came between the two renames
    (tmp_path / "checkpoints" / ".tmp_step_00000004").mkdir()
    assert list_checkpoints(tmp_path) == []
    done = recover(tmp_path)
    assert any("restored step_00000004" in line for line in done)
    assert (final / "model.safetensors").read_bytes() == before and names(tmp_path) == ["step_00000004"]


def test_rewriting_a_step_replaces_it_and_leaves_nothing_behind(tmp_path):
    write(tmp_path, 4)
    staging = begin(tmp_path, 4)
    (staging / "model.safetensors").write_bytes(b"new")
    checkpoint_write.write_state(staging, {"step": 4}, 4)
    commit(staging, 4)
    assert names(tmp_path) == ["step_00000004"]
    assert (tmp_path / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes() == b"new"


def test_prune_keeps_the_newest_even_when_asked_for_none(tmp_path):
    for step in (1, 2, 3):
        write(tmp_path, step)
    prune(tmp_path, keep_last=0)
    assert names(tmp_path) == ["step_00000003"]


def test_verify_names_missing_truncated_and_changed_files(tmp_path):
    path = write(tmp_path, 1)
    files = checkpoint_write.json.loads((path / "state.json").read_text())["files"]
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:10])
    assert "truncated" in verify(path, files)
    model.write_bytes(bytes([9]) * 64)
    assert "corrupt" in verify(path, files)
    model.unlink()
    assert "missing" in verify(path, files)


@pytest.mark.parametrize("spec", ["kill", "boom@step.start", "kill@nowhere", "kill@step.start:step=x", "kill@step.start:when=3"])
def test_a_malformed_fault_spec_is_refused(spec):
    with pytest.raises(ValueError, match="MEMLAYERS_FAULT"):
        parse_fault(spec)


def test_a_fault_fires_only_at_its_point_step_and_rank(monkeypatch):
    monkeypatch.setenv(ENV, "raise@step.backward:step=3:rank=1")
    monkeypatch.setenv("RANK", "1")
    fault_point("step.backward", 2)
    fault_point("step.start", 3)
    monkeypatch.setenv("RANK", "0")
    fault_point("step.backward", 3)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InjectedFault, match="step.backward"):
        fault_point("step.backward", 3)
    monkeypatch.setenv(ENV, "nan@step.loss")
    assert fault_point("step.loss", 7) == "nan"
