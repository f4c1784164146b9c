"""Activation checkpointing: the same loss, gradients and usage counts as without it, less
saved activation memory, and the trainer's option."""

import pytest
import torch

from memlayers.bench.reliability import TINY_RUN
from memlayers.config import apply_overrides, from_dict
from memlayers.distributed.activation_checkpointing import apply_activation_checkpointing
from memlayers.memory import MemoryConfig
from memlayers.model.config import ModelConfig
from memlayers.model.transformer import Transformer
from memlayers.train.config import RunConfig
from memlayers.train.trainer import Trainer

CONFIG = ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16,
                     memory_layers=(1,), memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16))


def run(checkpointed: bool):
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    for layer in model.memory_layers():
        layer.track_usage()
    if checkpointed:
        assert apply_activation_checkpointing(model) == 3
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    counts = [layer.usage.counts.clone() for layer in model.memory_layers()]
    return model, loss.detach(), grads, counts, sum(saved)


def test_same_results_with_fewer_saved_activations():
    _, loss, grads, counts, saved = run(False)
    model, loss_ac, grads_ac, counts_ac, saved_ac = run(True)
    torch.testing.assert_close(loss_ac, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ac.keys()  # parameter names unchanged
    for name, g in grads.items():
        torch.testing.assert_close(grads_ac[name], g, msg=name)
    for a, b in zip(counts, counts_ac, strict=True):
        assert torch.equal(a, b) and a.sum() > 0  # each read counted once, not again in the recompute
    assert saved_ac < saved / 2
    with torch.no_grad():  # evaluation runs the blocks plainly
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(model)


def test_the_trainer_option_trains_the_same(tmp_path):
    def config(name, *overrides):
        return from_dict(RunConfig, apply_overrides(dict(TINY_RUN), [f"train.out_dir={tmp_path / name}", "train.steps=3",
                                                                     "train.eval_qa=2", *overrides]))

    plain = Trainer(config("plain"))
    plain.fit(progress=False)
    ac = Trainer(config("ac", "parallel.activation_checkpointing=true"))
    ac.fit(progress=False)
    for a, b in zip(plain.model.parameters(), ac.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
