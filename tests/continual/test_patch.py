"""Memory patches: made from a sparse step, applied and reverted bit for bit, merged, refused clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from memlayers.continual.patch import MemoryPatch, PatchError, merge, patched, table_fingerprint
from memlayers.continual.slot_stats import collect_slot_stats
from memlayers.continual.sparse import RowSelector, sparse_step, train_values_only
from memlayers.train.row_optim import RowSGD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slot_stats import _batches, _model  # noqa: E402


def _learned(model, seed: int, top_t: int = 4) -> MemoryPatch:
    """Copy the tables, run two sparse steps on batches of ``seed``, return the patch; the model
    is left at its base again."""
    background = collect_slot_stats(model, _batches(6, seed=2), progress=False)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    tables = train_values_only(model)
    before = {name: t.detach().clone() for name, t in tables.items()}
    optimizer = RowSGD(list(tables.values()), lr=0.5)
    selector = RowSelector(model, background, top_t)
    for batch in _batches(2, seed=seed):
        sparse_step(model, selector, optimizer, batch[:, :-1], batch[:, 1:])
    patch = MemoryPatch.between(before, model, {"method": "sparse", "top_t": top_t})
    with torch.no_grad():
        for name, table in tables.items():
            table.copy_(before[name])
    for name, p in model.named_parameters():
        p.requires_grad_(frozen[name])
    return patch


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_then_revert_is_bit_exact(tmp_path):
    model = _model()
    base = _state(model)
    patch = _learned(model, seed=7)
    assert 0 < patch.n_rows <= 2 * 4 and patch.nbytes == sum(
        t.numel() * t.element_size() for part in (patch.rows, patch.old, patch.new) for t in part.values())
    back = MemoryPatch.load(patch.save(tmp_path / "p"))
    assert back.info == {"method": "sparse", "top_t": 4} and back.base == patch.base
    back.apply(model)
    applied = _state(model)
    (table,) = patch.rows
    assert not torch.equal(applied[table], base[table])
    changed = (applied[table] != base[table]).any(1).nonzero().squeeze(1)
    assert torch.equal(changed, patch.rows[table])  # exactly the patch's rows changed
    assert all(torch.equal(applied[k], base[k]) for k in base if k != table)
    back.revert(model)
    assert all(torch.equal(v, base[k]) for k, v in _state(model).items())
    with patched(model, back):
        assert torch.equal(model.state_dict()[table], applied[table])
    assert all(torch.equal(v, base[k]) for k, v in _state(model).items())


def test_the_wrong_base_and_damaged_files_are_refused(tmp_path):
    model = _model()
    patch = _learned(model, seed=7)
    other = _model(seed=3)
    with pytest.raises(PatchError, match="made on another base model"):
        patch.apply(other)
    with pytest.raises(PatchError, match="changes value tables"):
        patch.apply(_model(shared=False))
    with pytest.raises(PatchError, match="not applied"):
        patch.revert(model)
    directory = patch.save(tmp_path / "p")
    data = (directory / "patch.safetensors").read_bytes()
    (directory / "patch.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchError, match="unreadable"):
        MemoryPatch.load(directory)
    (directory / "patch.json").unlink()
    with pytest.raises(PatchError, match="patch.json is missing"):
        MemoryPatch.load(directory)


def test_merge_names_conflicts_and_follows_the_policy():
    model = _model()
    base = _state(model)
    first, second = _learned(model, seed=7, top_t=6), _learned(model, seed=7, top_t=6)
    (table,) = first.rows
    # the same learning twice changes the same rows: every one conflicts
    with pytest.raises(PatchError, match=rf"{first.rows[table].numel()} rows of table .* changed by both"):
        merge(first, second)
    third = _learned(model, seed=11, top_t=6)
    for policy in ("first", "second", "add"):
        merged = merge(first, third, policy)
        assert torch.equal(merged.rows[table], torch.unique(torch.cat([first.rows[table], third.rows[table]])))
        merged.apply(model)
        now = model.state_dict()[table]
        for patch in (first, third):
            own = ~torch.isin(patch.rows[table], (third if patch is first else first).rows[table])
            assert torch.equal(now[patch.rows[table][own]], patch.new[table][own])  # unconflicted rows: theirs
        both = first.rows[table][torch.isin(first.rows[table], third.rows[table])]
        assert 0 < both.numel() < merged.rows[table].numel()  # some rows conflict, some do not
        for row in both.tolist():
            a = first.new[table][first.rows[table] == row][0]
            b = third.new[table][third.rows[table] == row][0]
            expected = {"first": a, "second": b, "add": a + b - base[table][row]}[policy]
            assert torch.allclose(now[row], expected)
        merged.revert(model)
        assert torch.equal(model.state_dict()[table], base[table])
    with pytest.raises(PatchError, match="not one of"):
        merge(first, third, "mean")


def test_fingerprint_sees_one_changed_bit():
    table = torch.randn(5, 3)
    before = table_fingerprint(table)
    table.view(torch.int32)[2, 1] ^= 1
    assert table_fingerprint(table) != before and len(before) == 64
