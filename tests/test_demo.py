"""The synthetic fact table of the smoke demo."""

import torch

from memlayers.demo import batch_of, make_facts


def test_facts_are_seeded_and_unique_per_subject_relation():
    facts = make_facts(500, torch.Generator().manual_seed(3))
    again = make_facts(500, torch.Generator().manual_seed(3))
    assert torch.equal(facts, again)
    assert not torch.equal(facts, make_facts(500, torch.Generator().manual_seed(4)))
    keys = {tuple(row[:3].tolist()) for row in facts}
    assert len(keys) == 500


def test_batches_target_only_the_values():
    facts = make_facts(50, torch.Generator().manual_seed(0))
    tokens, targets = batch_of(facts, batch=3, per_sequence=4, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == targets.shape == (3, 16)
    assert (targets[:, [0, 1, 3]] == -100).all()
    assert torch.equal(targets[:, 2::4], tokens[:, 3::4])
    rows = {tuple(r.tolist()) for r in facts}
    assert all(tuple(chunk.tolist()) in rows for chunk in tokens.reshape(-1, 4))
