"""Checkpoints: atomic writes, pruning, corruption and mismatch errors, exact state round-trips."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memlayers.train.checkpoint as checkpoint_module
from memlayers.memory.config import MemoryConfig
from memlayers.model import ModelConfig, Transformer
from memlayers.train import OptimConfig, build_optimizer, checkpoint_write, clip_gradients
from memlayers.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from memlayers.train.pretrained import load_pretrained
from memlayers.train.trainer import Trainer

VOCAB = 50


def model_config(**overrides) -> ModelConfig:
    memory = MemoryConfig(
        **{"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16, **overrides.pop("memory", {})}
    )
    fields = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 2,
        "multiple_of": 16,
        "vocab_size": VOCAB,
        "max_seq_len": 16,
        "memory_layers": (1,),
        "memory": memory,
    }
    return ModelConfig(**{**fields, **overrides})


def new_model(config: ModelConfig, seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(config)
    return model, build_optimizer(model, OptimConfig(lr=1e-2, value_lr=3e-2))


def train(model: Transformer, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (3, 9), generator=generator)
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        clip_gradients(optimizer, OptimConfig())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trained(config: ModelConfig | None = None, steps: int = 2):
    model, optimizer = new_model(config or model_config())
    train(model, optimizer, steps)
    return model, optimizer


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def step_names(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir)]


# --- round trips -------------------------------------------------------------------------------


def test_weights_and_optimizer_state_round_trip(tmp_path):
    model, optimizer = trained(steps=3)
    for group, lr in zip(optimizer.param_groups, (1.5e-3, 2.5e-4, 7.0e-3), strict=False):
        group["lr"] = lr  # as a schedule would leave them
    path = save_checkpoint(
        tmp_path, 3, model, optimizer, {"note": "hello", "data": {"epoch": 1, "position": 8}}
    )
    assert path == tmp_path / "checkpoints" / "step_00000003"

    fresh, fresh_optimizer = new_model(model_config(), seed=123)  # different init
    loaded = load_checkpoint(tmp_path, fresh, fresh_optimizer)
    assert loaded.path == path and loaded.step == 3
    assert loaded.state["note"] == "hello" and loaded.state["data"] == {"epoch": 1, "position": 8}
    assert_state_equal(clone_state(model), clone_state(fresh))

    names = {id(p): n for n, p in model.named_parameters()}
    fresh_params = dict(fresh.named_parameters())
    assert len(optimizer.state) == len(fresh_optimizer.state) > 0
    for param, state in optimizer.state.items():
        restored = fresh_optimizer.state[fresh_params[names[id(param)]]]
        assert restored.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(restored[key], value), (names[id(param)], key)
            assert restored[key].dtype == value.dtype
    for saved, restored in zip(optimizer.param_groups, fresh_optimizer.param_groups, strict=True):
        assert {k: v for k, v in saved.items() if k != "params"} == {
            k: (tuple(v) if k == "betas" else v) for k, v in restored.items() if k != "params"
        }

    # both continue identically
    train(model, optimizer, 2, seed=7)
    train(fresh, fresh_optimizer, 2, seed=7)
    assert_state_equal(clone_state(model), clone_state(fresh))


def test_fresh_optimizer_round_trips(tmp_path):
    model, optimizer = new_model(model_config())
    save_checkpoint(tmp_path, 0, model, optimizer, {})
    fresh, fresh_optimizer = new_model(model_config(), seed=5)
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer).step == 0
    assert len(fresh_optimizer.state) == 0
    assert_state_equal(clone_state(model), clone_state(fresh))


def test_tied_embeddings_round_trip(tmp_path):
    config = model_config(tie_embeddings=True)
    model, optimizer = trained(config)
    assert model.output.weight is model.tok_embeddings.weight
    path = save_checkpoint(tmp_path, 2, model, optimizer, {})
    stored = load_file(path / "model.safetensors")
    assert ("output.weight" in stored) != ("tok_embeddings.weight" in stored)  # stored once
    assert len(stored) == len(model.state_dict()) - 1
    assert read_state(path)["tied"] in (
        {"output.weight": "tok_embeddings.weight"},
        {"tok_embeddings.weight": "output.weight"},
    )

    fresh, fresh_optimizer = new_model(config, seed=9)
    load_checkpoint(path, fresh, fresh_optimizer)
    assert fresh.output.weight is fresh.tok_embeddings.weight  # still tied
    assert_state_equal(clone_state(model), clone_state(fresh))
    train(model, optimizer, 1, seed=3)
    train(fresh, fresh_optimizer, 1, seed=3)
    assert_state_equal(clone_state(model), clone_state(fresh))


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    model, _ = trained()
    save_checkpoint(tmp_path, 2, model, None, {})
    fresh, fresh_optimizer = new_model(model_config(), seed=4)
    load_model_weights(tmp_path, fresh)  # weights alone load
    assert_state_equal(clone_state(model), clone_state(fresh))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path, fresh, fresh_optimizer)


def test_rng_state_round_trip():
    saved = json.loads(json.dumps(rng_state()))  # JSON-safe
    expected = (random.random(), torch.rand(3))
    random.random(), torch.rand(5)
    set_rng_state(saved)
    again = (random.random(), torch.rand(3))
    assert expected[0] == again[0] and torch.equal(expected[1], again[1])


# --- atomic writes -----------------------------------------------------------------------------


class DiskFull(OSError):
    pass


def fail_on_call(monkeypatch, target: str, fail_at: int) -> None:
    """Make ``checkpoint_module.<target>`` (save_file, or os.replace) raise on its ``fail_at``-th call."""
    if target == "replace":
        owner, name = checkpoint_write.os, "replace"
    else:
        owner, name = checkpoint_module, target
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise DiskFull("no space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


@pytest.mark.parametrize(
    ("target", "fail_at"),
    [("save_file", 3), ("save_file", 4), ("replace", 2)],
    ids=["model-file", "optimizer-file", "rename"],
)
def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch, target, fail_at):
    model, optimizer = trained()
    first = clone_state(model)
    fail_on_call(
        monkeypatch, target, fail_at
    )  # each checkpoint calls save_file twice, os.replace once
    save_checkpoint(tmp_path, 2, model, optimizer, {"step_note": 2})
    train(model, optimizer, 1)
    with pytest.raises(DiskFull):
        save_checkpoint(tmp_path, 3, model, optimizer, {"step_note": 3})
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert not (root / "step_00000003").exists()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp_step_00000003")]
    assert len(leftovers) == 1  # the half-written temporary directory is still there ...
    assert step_names(tmp_path) == ["step_00000002"]  # ... and ignored
    assert resolve_checkpoint(tmp_path) == root / "step_00000002"
    fresh, fresh_optimizer = new_model(model_config(), seed=11)
    loaded = load_checkpoint(tmp_path, fresh, fresh_optimizer)
    assert loaded.step == 2 and loaded.state["step_note"] == 2
    assert_state_equal(first, clone_state(fresh))

    # the next attempt succeeds and cleans up its own temporary directory
    save_checkpoint(tmp_path, 3, model, optimizer, {"step_note": 3})
    assert step_names(tmp_path) == ["step_00000002", "step_00000003"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


@pytest.mark.parametrize("fail_at", [1, 2])  # setting the old copy aside, or moving the new one in
def test_crash_while_rewriting_the_same_step_keeps_it(tmp_path, monkeypatch, fail_at):
    model, optimizer = trained()
    first = clone_state(model)
    save_checkpoint(tmp_path, 2, model, optimizer, {})
    fail_on_call(monkeypatch, "replace", fail_at)
    with pytest.raises(DiskFull):
        save_checkpoint(tmp_path, 2, model, optimizer, {})
    monkeypatch.undo()
    assert step_names(tmp_path) == ["step_00000002"]
    fresh, _ = new_model(model_config(), seed=11)
    load_model_weights(tmp_path, fresh)
    assert_state_equal(first, clone_state(fresh))


def test_trainer_crash_on_second_checkpoint_keeps_the_first(make_config, monkeypatch):
    config = make_config("train.steps=6", "train.checkpoint_every=2")
    fail_on_call(monkeypatch, "save_file", 3)  # the model file of the second checkpoint (step 4)
    with pytest.raises(DiskFull):
        Trainer(config).fit(progress=False)
    monkeypatch.undo()
    run_dir = Path(config.train.out_dir)
    assert step_names(run_dir) == ["step_00000002"]
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
    resumed = Trainer(config, resume=True)
    assert resumed.step == 2
    assert resumed.fit(progress=False)["step"] == 6


def test_keep_last_prunes_oldest(tmp_path):
    model, optimizer = trained()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep_last=2)
        assert step_names(tmp_path) == [f"step_{s:08d}" for s in range(max(1, step - 1), step + 1)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000005",
    ]


def test_trainer_keep_last(make_config):
    config = make_config("train.steps=8", "train.checkpoint_every=2", "train.keep_last=2")
    Trainer(config).fit(progress=False)
    assert step_names(Path(config.train.out_dir)) == ["step_00000006", "step_00000008"]


def test_checkpoints_sort_by_step_number(tmp_path):
    model, _ = trained()
    for step in (100_000_000, 99_999_999, 7):  # 9 digits: longer than the zero padding
        save_checkpoint(tmp_path, step, model, None, {})
    assert step_names(tmp_path) == ["step_00000007", "step_99999999", "step_100000000"]
    assert resolve_checkpoint(tmp_path).name == "step_100000000"
    assert read_state(tmp_path)["step"] == 100_000_000


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)
    damaged = tmp_path / "checkpoints" / "step_00000009"
    damaged.mkdir(parents=True)  # a commit never leaves a step without state.json: it was damaged since
    with pytest.raises(CheckpointError, match="step_00000009 is damaged: its state.json is missing; no earlier"):
        resolve_checkpoint(tmp_path)
    model, _ = trained()
    path = save_checkpoint(tmp_path, 4, model, None, {})
    with pytest.raises(CheckpointError, match=r"step_00000009 is damaged.*--resume-from .*step_00000004"):
        resolve_checkpoint(tmp_path)
    damaged.rmdir()
    assert resolve_checkpoint(tmp_path) == path
    assert resolve_checkpoint(path) == path


# --- broken checkpoints ------------------------------------------------------------------------


def corrupt_truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8  # header length
    file.write_bytes(bytes(data))


def corrupt_header_json(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:24] = b"#" * 16
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_header, corrupt_header_json])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_corrupt_tensor_file_is_a_checkpoint_error(tmp_path, corrupt, name):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 2, model, optimizer, {})
    corrupt(path / name)
    fresh, fresh_optimizer = new_model(model_config())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, fresh, fresh_optimizer)
    message = str(info.value)
    assert str(path / name) in message and "corrupt" in message
    assert len(message.splitlines()) == 1


def test_missing_tensor_file_is_a_checkpoint_error(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path, 2, model, None, {})
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        load_model_weights(path, new_model(model_config())[0])
    assert str(path / "model.safetensors") in str(info.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: {**s, "format": "something-else"}, "not a memlayers checkpoint"),
        (lambda s: {k: v for k, v in s.items() if k != "format"}, "not a memlayers checkpoint"),
        (lambda s: {**s, "version": 2}, "version 2"),
        (lambda s: {k: v for k, v in s.items() if k != "version"}, "version None"),
    ],
    ids=["wrong-format", "no-format", "newer-version", "no-version"],
)
def test_state_json_format_and_version_are_checked(tmp_path, edit, match):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 2, model, optimizer, {})
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps(edit(state)))  # the checksum does not hide what is wrong
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, *new_model(model_config()))
    assert len(str(info.value).splitlines()) == 1


def test_a_changed_state_json_is_refused_by_its_checksum(tmp_path):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 2, model, optimizer, {"tokens_seen": 100})
    (path / "state.json").write_text((path / "state.json").read_text().replace('"tokens_seen": 100', '"tokens_seen": 900'))
    with pytest.raises(CheckpointError, match=r"state.json is corrupt \(its checksum differs\); no earlier checkpoint"):
        load_checkpoint(path, *new_model(model_config()))


def test_unreadable_state_json_is_a_checkpoint_error(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path, 2, model, None, {})
    (path / "state.json").write_text('{"format": "memlayers-checkpoint", "ver')
    with pytest.raises(CheckpointError, match="state.json is unreadable"):
        read_state(path)


def test_checkpoint_of_another_model_is_a_checkpoint_error(tmp_path):
    model, _ = trained()
    path = save_checkpoint(tmp_path, 2, model, None, {})
    dense = Transformer(model_config(memory_layers=()))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(path, dense)
    message = str(info.value)
    assert "does not fit this model" in message
    assert "missing: layers.1.ffn.w3.weight" in message
    assert "unexpected: layers.1.ffn.search" in message
    assert len(message.splitlines()) == 1

    bigger = Transformer(model_config(memory={"n_keys": 12}))
    with pytest.raises(CheckpointError, match=r"wrong shape: .*layers\.1\.ffn\.search\.keys"):
        load_model_weights(path, bigger)


def test_optimizer_with_other_groups_is_a_checkpoint_error(tmp_path):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 2, model, optimizer, {})
    fresh = Transformer(model_config())
    single_group = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(CheckpointError, match="parameter groups"):
        load_checkpoint(path, fresh, single_group)


# --- load_pretrained ---------------------------------------------------------------------------


def test_load_pretrained_returns_the_trained_model(make_config):
    config = make_config("train.steps=2")
    trainer = Trainer(config)
    summary = trainer.fit(progress=False)
    model, tokenizer, loaded_config = load_pretrained(config.train.out_dir)
    assert not model.training
    assert loaded_config == trainer.config
    assert tokenizer.vocab_size == trainer.data.tokenizer.vocab_size
    text = "Question: Where was Ada born?"
    assert tokenizer.encode(text) == trainer.data.tokenizer.encode(text)
    assert_state_equal(clone_state(trainer.model), clone_state(model))

    path = Path(summary["checkpoint"])
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_pretrained(path)


def test_load_pretrained_rejects_a_broken_config(make_config):
    config = make_config("train.steps=1")
    path = Path(Trainer(config).fit(progress=False)["checkpoint"])
    state = json.loads((path / "state.json").read_text())
    state["config"]["model"]["dim"] = -4
    del state["checksum"]  # as a checkpoint of an older memlayers (or edited by hand) would be
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="invalid config") as info:
        load_pretrained(path)
    assert "dim" in str(info.value)
