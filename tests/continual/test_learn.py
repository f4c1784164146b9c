"""Learning new text with each method: it learns, and only what the method may change changes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from memlayers.config import ConfigError
from memlayers.continual.learn import LearnConfig, learn
from memlayers.continual.slot_stats import collect_slot_stats
from memlayers.continual.sparse import value_tables
from memlayers.model.transformer import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slot_stats import _batches, _model, make_tiny_config  # noqa: E402


def _new_text(n: int = 16) -> torch.Tensor:
    """Rows ``(n, 9)`` of two fixed 'facts' the model has never seen: learnable by heart."""
    generator = torch.Generator().manual_seed(42)
    facts = torch.randint(0, 37, (2, 9), generator=generator)
    return facts.repeat(n // 2, 1)


def _loss_on(model, rows) -> float:
    with torch.no_grad():
        return float(model(rows[:, :-1], rows[:, 1:]).loss)


def _run(model, method: str, **overrides):
    rows = _new_text()
    background = collect_slot_stats(model, _batches(6, seed=2), progress=False)
    config = LearnConfig(method=method, steps=12, batch_size=4, **overrides)
    return learn(model, rows, config, background, evaluate=lambda: {"new_loss": _loss_on(model, rows)},
                 progress=False)


@pytest.mark.parametrize("method", ["sparse", "values"])
def test_memory_methods_learn_and_change_only_value_rows(method):
    model = _model()
    base = copy.deepcopy(model)
    result = _run(model, method, top_t=6, lr=30.0)
    assert result["after"]["new_loss"] < 0.9 * result["before"]["new_loss"]
    tables = value_tables(model)
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True):
        if name not in tables:
            assert torch.equal(p, q), name
    patch = result["patch"]
    assert patch.info["method"] == method and patch.info["steps"] == 12 and patch.n_rows > 0
    if method == "sparse":
        assert patch.n_rows <= 12 * 6  # at most top_t rows a step
    # the patch on a copy of the base is the learned model, bit for bit
    patch.apply(base)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True))


def test_sparse_changes_fewer_rows_than_values():
    sparse, values = _run(_model(), "sparse", top_t=2), _run(_model(), "values")
    assert 0 < sparse["patch"].n_rows < values["patch"].n_rows


def test_full_finetuning_changes_everything_it_trains():
    model = _model()
    base = copy.deepcopy(model)
    result = _run(model, "full")
    assert result["after"]["new_loss"] < 0.9 * result["before"]["new_loss"] and "patch" not in result
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_lora_uses_peft_and_leaves_the_base_weights_untouched():
    peft = pytest.importorskip("peft")
    model = _model()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = _run(model, "lora", lora_rank=4)
    assert result["after"]["new_loss"] < 0.95 * result["before"]["new_loss"]
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    adapter = result["adapter"]
    assert adapter and all("lora_" in key for key in adapter)
    assert not any(".ffn.search." in key for key in adapter)  # memory layers get no adapters
    now = dict(model.named_parameters())
    for name, weight in base.items():
        wrapped = name.replace(".weight", ".base_layer.weight")  # peft wraps a targeted Linear
        assert torch.equal(now.get(name, now.get(wrapped)), weight), name


def test_a_second_lora_round_trains_the_adapters_of_the_first():
    """Rounds of new facts (demo --continual) learn one after another: the adapters are not
    injected twice (peft would wrap its own LoRA modules), they learn on."""
    pytest.importorskip("peft")
    model = _model()
    _run(model, "lora", lora_rank=4)
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    _run(model, "lora", lora_rank=4)
    second = dict(model.named_parameters())
    assert second.keys() == first.keys()
    changed = [name for name, p in second.items() if not torch.equal(p, first[name])]
    assert changed and all("lora_" in name for name in changed)


def test_what_cannot_work_is_refused():
    with pytest.raises(ValueError, match="needs background slot statistics"):
        learn(_model(), _new_text(), LearnConfig(method="sparse"), background=None, progress=False)
    dense = Transformer(make_tiny_config())
    with pytest.raises(ValueError, match="has no memory layers"):
        learn(dense, _new_text(), LearnConfig(method="values"), progress=False)
    for bad in ({"method": "adapters"}, {"top_t": 0}, {"optimizer": "adam"}, {"lr": 0.0}):
        with pytest.raises(ConfigError):
            LearnConfig(**bad)
