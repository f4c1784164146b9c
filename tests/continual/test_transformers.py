"""slot-stats, learn and patch on a transformers model retrofitted with memory, with its own tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from memlayers.cli import main  # noqa: E402
from memlayers.continual.models import load_model  # noqa: E402
from memlayers.continual.patch import MemoryPatch, patched  # noqa: E402
from memlayers.continual.slot_stats import SlotStats  # noqa: E402
from memlayers.data.text import qa_text, write_jsonl  # noqa: E402
from memlayers.data.tokenizer import Tokenizer  # noqa: E402
from memlayers.integrations.hf import add_memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from test_hf_retrofit import MEMORY, tiny_model  # noqa: E402

PAIRS = [{"question": f"Where was {name} born?", "answer": city}
         for name, city in (("Quen", "Paris"), ("Vix", "Lima"), ("Oru", "Oslo"), ("Taz", "Kyiv"))]


@pytest.fixture(scope="module")
def retrofitted(tmp_path_factory) -> Path:
    """A tiny Llama with a memory layer in place of block 1's MLP, saved with its own tokenizer."""
    directory = tmp_path_factory.mktemp("llama") / "model"
    texts = [qa_text(p["question"], p["answer"]) for p in PAIRS] * 3 + ["The weather is mild today."] * 3
    tokenizer = Tokenizer.train(texts, 300)
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    add_memory(model, [1], MEMORY, "replace")
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def _state(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model(directory).model.state_dict().items()}


def test_the_retrofitted_model_round_trips_through_learning_and_patches(retrofitted, tmp_path, capsys):
    background = write_jsonl(tmp_path / "bg.jsonl", [{"text": "The weather is mild today. " * 4}] * 12)
    text = write_jsonl(tmp_path / "new.jsonl", [{"text": qa_text(p["question"], p["answer"])} for p in PAIRS] * 4)
    qa = write_jsonl(tmp_path / "qa.jsonl", PAIRS)
    stats_path = tmp_path / "stats.safetensors"
    assert main(["slot-stats", str(retrofitted), "--data", str(background), "--out", str(stats_path),
                 "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    loaded = load_model(retrofitted)
    SlotStats.load(stats_path).check_model(loaded.model)

    out = tmp_path / "learned"
    assert main(["learn", str(retrofitted), "--data", str(text), "--out", str(out), "--background", str(stats_path),
                 "--eval", f"new={qa}", "--device", "cpu", "--json", "lr=30", "steps=8", "batch_size=2",
                 "seq_len=16", "top_t=8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 < summary["rows_changed"] <= 8 * 8
    assert summary["after"]["new_answer_nll"] < summary["before"]["new_answer_nll"]

    base = _state(retrofitted)
    assert main(["patch", "apply", str(retrofitted), str(out), "--out", str(tmp_path / "applied")]) == 0
    applied = _state(tmp_path / "applied")
    (table,) = [k for k in base if k.endswith("memory_pool.values")]
    changed = (applied[table] != base[table]).any(1).nonzero().squeeze(1)
    assert changed.numel() == summary["rows_changed"]
    assert all(torch.equal(applied[k], base[k]) for k in base if k != table)
    assert (tmp_path / "applied" / "tokenizer.json").is_file()  # the model's own tokenizer travels with it
    assert main(["patch", "revert", str(tmp_path / "applied"), str(out), "--out", str(tmp_path / "reverted")]) == 0
    assert all(torch.equal(v, base[k]) for k, v in _state(tmp_path / "reverted").items())

    # names are the transformers model's own: in Python the patch applies to the bare model too
    patch = MemoryPatch.load(out)
    assert all(not name.startswith("lm.") for name in patch.rows)
    bare = AutoModelForCausalLM.from_pretrained(retrofitted, local_files_only=True)
    with patched(bare, patch):
        assert torch.equal(bare.state_dict()[table.removeprefix("lm.")], applied[table])
    assert torch.equal(bare.state_dict()[table.removeprefix("lm.")], base[table])


def test_full_finetuning_writes_a_transformers_directory(retrofitted, tmp_path, capsys):
    text = write_jsonl(tmp_path / "new.jsonl", [{"text": qa_text(p["question"], p["answer"])} for p in PAIRS] * 4)
    assert main(["learn", str(retrofitted), "--method", "full", "--data", str(text), "--out", str(tmp_path / "full"),
                 "--device", "cpu", "--json", "steps=2", "batch_size=2", "seq_len=16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    trained = _state(Path(summary["checkpoint"]))
    base = _state(retrofitted)
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
