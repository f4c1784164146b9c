"""`memlayers retrofit` of a tiny random Llama under torchrun (gloo, 2 and 4 ranks) against one
process on the same global batch; checkpoints that hold only the memory; exact resume after an
injected crash; a different base model refused on resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from memlayers.cli import main  # noqa: E402
from memlayers.distributed.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from memlayers.distributed.parallelize import model_blocks  # noqa: E402
from memlayers.faults import InjectedFault  # noqa: E402
from memlayers.integrations.hf import CausalLMAdapter, add_memory, freeze_all_but_memory  # noqa: E402
from memlayers.memory.config import MemoryConfig  # noqa: E402
from memlayers.model.transformer import Transformer  # noqa: E402
from memlayers.train.checkpoint import CheckpointError  # noqa: E402
from memlayers.train.data import prepare_data  # noqa: E402
from memlayers.train.metrics import read_metrics  # noqa: E402
from memlayers.train.sharded_checkpoint import export_checkpoint, shard_checkpoint  # noqa: E402

from .conftest import build_config  # noqa: E402

MEMORY = ["model.memory.n_keys=8", "model.memory.heads=2", "model.memory.knn=4", "model.memory.k_dim=16"]
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A fact world's training text and tokenizer, and two tiny random Llamas saved with it
    (``base``, and ``other``: the same shapes, other weights)."""
    root = tmp_path_factory.mktemp("retrofit_world")
    data = prepare_data(build_config(root / "world"), root / "world")
    paths = {"train": data.files["train"]}
    for name, seed in (("base", 0), ("other", 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=data.tokenizer.vocab_size, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(root / name)
        data.tokenizer.save(root / name)
        paths[name] = root / name
    return paths


def settings(world: dict[str, Path], out: Path, ranks: int) -> list[str]:
    return [
        "--layers", "1", "--mode", "parallel", "--out", str(out), *MEMORY, f"data.train={world['train']}",
        "data.seq_len=32", "train.steps=4", "train.checkpoint_every=2", "train.keep_last=5", "train.eval_qa=2",
        "train.eval_batches=1", "train.log_every=1", "train.threads=1", f"train.batch_size={GLOBAL_BATCH // ranks}",
        "parallel.memory_parallel=2", "optim.lr=0.01", "optim.value_lr=0.05",
    ]


def torchrun_retrofit(base: Path, args: list[str], nproc: int, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("MEMLAYERS_FAULT", None)
    if fault:
        env["MEMLAYERS_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "memlayers.cli", "retrofit", str(base), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "training") if "loss" in r]


def retrofitted_adapter(base: Path) -> CausalLMAdapter:
    """The model the retrofit command trains, as it is before training."""
    model = AutoModelForCausalLM.from_pretrained(base)
    add_memory(model, [1], MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16), "parallel")
    freeze_all_but_memory(model)
    return CausalLMAdapter(model)


def trained_and_frozen(base: Path) -> tuple[set[str], set[str]]:
    params = retrofitted_adapter(base).named_parameters(remove_duplicate=False)
    trained, frozen = set(), set()
    for name, param in params:
        (trained if param.requires_grad else frozen).add(name)
    return trained, frozen


def assert_same_model(out: Path, reference: Path, trained: set[str]) -> None:
    """The saved retrofitted models agree: the memory closely, the frozen base exactly."""
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if f"lm.{key}" in trained:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-6, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def refusal(stderr: str) -> bool:
    """Whether ``stderr`` says, in one error line, that the base model is not the run's."""
    errors = [line for line in stderr.splitlines() if line.startswith("memlayers: ")]
    return len(errors) == 1 and re.match(r"memlayers: config error: cannot resume from \S+: the base model's frozen "
                                         r"weights differ from those the run was trained on\. ", errors[0]) is not None


@pytest.fixture(scope="module")
def single(world, tmp_path_factory) -> Path:
    """The retrofit trained in one process on the whole global batch."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(["retrofit", str(world["base"]), *settings(world, out, ranks=1)]) == 0
    assert len(losses(out)) == 4
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[1].mlp.gate.abs().sum() > 0  # it trained
    return out


def test_a_retrofit_s_blocks_are_its_decoder_layers_and_checkpoint_exactly(world, tmp_path):
    adapter = retrofitted_adapter(world["base"])
    assert model_blocks(adapter) is adapter.wrapped_model.model.layers
    own = Transformer(build_config(tmp_path).model)
    assert model_blocks(own) is own.layers and model_blocks(torch.nn.Linear(2, 2)) is None

    def loss_and_grads(checkpointed: bool):
        torch.manual_seed(0)
        model = retrofitted_adapter(world["base"])
        with torch.no_grad():
            model.wrapped_model.model.layers[1].mlp.gate.fill_(0.5)  # the memory takes part in the output
        if checkpointed:
            assert apply_activation_checkpointing(model) == 2
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    loss_ac, grads_ac = loss_and_grads(True)
    torch.testing.assert_close(loss_ac, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ac.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ac[name], grad, msg=name)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_four_ranks_retrofit_like_one_process(world, single, tmp_path):
    """dp 2 x mp 2: FSDP over the frozen base's decoder layers (activation-checkpointed) and
    the rest, the value pool column-sharded."""
    out = tmp_path / "out"
    args = [*settings(world, out, ranks=4), "parallel.activation_checkpointing=true"]
    run = torchrun_retrofit(world["base"], args, nproc=4)
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert_same_model(out, single, trained_and_frozen(world["base"])[0])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_resume_exactly_after_a_crash_from_checkpoints_without_the_base(world, single, tmp_path, capsys):
    out = tmp_path / "out"
    args = settings(world, out, ranks=2)
    crashed = torchrun_retrofit(world["base"], args, nproc=2, fault="raise@step.start:step=4")
    assert crashed.returncode != 0 and "injected fault at step.start (step 4)" in crashed.stderr
    step2 = out / "training" / "checkpoints" / "step_00000002"
    state = json.loads((step2 / "state.json").read_text())
    assert state["sharded"] and state["trained_only"] and len(state["fingerprints"]["base_model"]) == 64
    keys = set()
    for file in (step2 / "shards").glob("*.safetensors"):
        with safe_open(file, "pt") as shard:
            keys.update(shard.keys())
    trained, frozen = trained_and_frozen(world["base"])
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys == trained and not model_keys & frozen  # the memory, its pool and gate; no base tensor
    assert {k.removeprefix("optim.").rsplit(".", 1)[0] for k in keys if k.startswith("optim.")} <= trained
    with pytest.raises(CheckpointError, match="is a retrofit's checkpoint: it holds only the memory"):
        export_checkpoint(step2, tmp_path / "exported")  # it would need the base model

    # a different base model is refused before anything is loaded, in one line (here in one process)
    capsys.readouterr()
    assert main(["retrofit", str(world["other"]), *settings(world, out, ranks=1), "--resume"]) == 2
    assert refusal(capsys.readouterr().err)

    resumed = torchrun_retrofit(world["base"], [*args, "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stderr
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)  # two ranks, interrupted, as one process
    assert_same_model(out, single, trained)


def test_one_process_resumes_exactly_and_saves_only_the_memory(world, single, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = settings(world, out, ranks=1)
    monkeypatch.setenv("MEMLAYERS_FAULT", "raise@step.start:step=3")
    with pytest.raises(InjectedFault, match=r"injected fault at step.start \(step 3\)"):
        main(["retrofit", str(world["base"]), *args])
    monkeypatch.delenv("MEMLAYERS_FAULT")
    step2 = out / "training" / "checkpoints" / "step_00000002"
    state = json.loads((step2 / "state.json").read_text())
    assert state["trained_only"] and not state.get("sharded")
    trained, frozen = trained_and_frozen(world["base"])
    with safe_open(step2 / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == trained  # no frozen base tensor
    with safe_open(step2 / "optimizer.safetensors", "pt") as saved:
        assert {k.split("::")[0] for k in saved.keys()} <= trained
    with pytest.raises(CheckpointError, match="is a retrofit's checkpoint: it holds only the memory"):
        shard_checkpoint(step2, tmp_path / "sharded")

    capsys.readouterr()
    assert main(["retrofit", str(world["other"]), *args, "--resume"]) == 2
    assert refusal(capsys.readouterr().err)

    assert main(["retrofit", str(world["base"]), *args, "--resume"]) == 0
    assert losses(out) == losses(single)  # the same process, the same arithmetic: exactly
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(single).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.multiprocess
def test_ranks_refuse_a_retrofit_s_single_process_checkpoint_and_say_what_to_do(world, single, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single / "training", out / "training")
    run = torchrun_retrofit(world["base"], [*settings(world, out, ranks=2), "--resume"], nproc=2)
    assert run.returncode != 0
    assert "is a single-process checkpoint; a distributed run resumes from sharded ones: a retrofit's cannot be " \
           "converted without its base model, so resume this one in one process" in run.stderr
