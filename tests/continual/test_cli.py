"""``memlayers slot-stats`` end to end on a tiny trained memory model, and its one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from memlayers.bench.reliability import write_config
from memlayers.cli import main
from memlayers.continual.slot_report import collect_from_file
from memlayers.continual.slot_stats import SlotStats, collect_slot_stats
from memlayers.data.packing import pack_documents
from memlayers.data.text import qa_text, read_documents, write_jsonl
from memlayers.train.checkpoint import resolve_checkpoint
from memlayers.train.pretrained import load_pretrained
from memlayers.train.run_dir import file_fingerprint


def _train(directory: Path, *overrides: str) -> Path:
    """Train the reliability suite's tiny run with ``memlayers train``; its final checkpoint."""
    config = write_config(directory / "tiny.yaml", directory / "run")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(config), *overrides]) == 0
    return directory / "run" / "checkpoints" / "step_00000008"


@pytest.fixture(scope="module")
def memory_checkpoint(tmp_path_factory) -> Path:
    """A tiny memory model that ships its slot statistics (4 batches of its training text)."""
    return _train(tmp_path_factory.mktemp("slots"), "train.slot_stats_batches=4")


def test_slot_stats_writes_what_the_library_counts(memory_checkpoint, tmp_path, capsys):
    background = memory_checkpoint.parents[2] / "run" / "data" / "train.jsonl"
    out = tmp_path / "stats.safetensors"
    assert main(["slot-stats", str(memory_checkpoint), "--data", str(background), "--out", str(out),
                 "--batches", "5", "--batch-size", "4", "--top", "3", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    saved = SlotStats.load(out)
    model, tokenizer, config = load_pretrained(memory_checkpoint)
    direct = collect_from_file(model, background, tokenizer.encode, tokenizer.bos_id, tokenizer.eos_id,
                               config.data.seq_len, 4, max_batches=5, progress=False)
    assert saved.n_batches == 5 and saved.n_tokens == 5 * 4 * config.data.seq_len
    assert all(torch.equal(saved.reads[k], direct.reads[k]) for k in direct.reads)
    assert all(torch.equal(saved.batches[k], direct.batches[k]) for k in direct.batches)
    saved.check_model(model)
    assert saved.metadata["model"] == str(memory_checkpoint) and saved.metadata["data_sha256"]
    (layer,) = summary["layers"].values()
    assert [s["reads"] for s in layer["top_slots"]] == sorted((s["reads"] for s in layer["top_slots"]), reverse=True)
    assert all(s["tokens"] and all(t["count"] > 0 for t in s["tokens"]) for s in layer["top_slots"])
    assert 0 <= layer["dead_fraction"] < 1
    image = matplotlib.image.imread(summary["plot"])
    assert summary["plot"] == str(out.with_suffix(".png")) and image[..., :3].std() > 0.05


def test_slot_stats_table_names_each_layer(memory_checkpoint, tmp_path, capsys):
    background = memory_checkpoint.parents[2] / "run" / "data" / "train.jsonl"
    assert main(["slot-stats", str(memory_checkpoint), "--data", str(background), "--out",
                 str(tmp_path / "s.safetensors"), "--batches", "2", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "layers.1.ffn" in text and "dead" in text and "KL from uniform" in text and "reads" in text


@pytest.mark.parametrize(("extra", "message"), [
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--batches", "0"], "--batches: must be >= 1"),
])
def test_bad_options_are_one_line(memory_checkpoint, tmp_path, capsys, extra, message):
    background = memory_checkpoint.parents[2] / "run" / "data" / "train.jsonl"
    assert main(["slot-stats", str(memory_checkpoint), "--data", str(background), "--out",
                 str(tmp_path / "s.safetensors"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_missing_data_and_dense_models_are_one_line(memory_checkpoint, tmp_path, capsys):
    args = ["--out", str(tmp_path / "s.safetensors"), "--device", "cpu"]
    assert main(["slot-stats", str(memory_checkpoint), "--data", str(tmp_path / "none.jsonl"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memlayers: data error:") and "does not exist" in err and "\n" not in err
    dense = _train(tmp_path, "model.memory_layers=[]")
    background = dense.parents[1] / "data" / "train.jsonl"
    assert main(["slot-stats", str(dense), "--data", str(background), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memlayers: slot statistics error:") and "no memory layers" in err and "\n" not in err
    assert not (tmp_path / "s.safetensors").exists()


def test_training_ships_the_slot_statistics_of_its_data(tmp_path, capsys):
    checkpoint = _train(tmp_path, "train.slot_stats_batches=3")
    stats = SlotStats.load(checkpoint / "slot_stats.safetensors")
    model, tokenizer, config = load_pretrained(checkpoint)  # the checkpoint still loads with the extra file
    stats.check_model(model)
    run_dir = checkpoint.parents[1]
    rows = pack_documents(tokenizer.encode_batch(read_documents(run_dir / "data" / "train.jsonl")),
                          config.data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    direct = collect_slot_stats(model, rows[:, :-1].split(config.train.batch_size)[:3], progress=False)
    assert stats.n_batches == 3 and stats.n_tokens == direct.n_tokens
    assert all(torch.equal(stats.reads[k], direct.reads[k]) for k in direct.reads)
    assert stats.metadata["data_sha256"] == file_fingerprint(run_dir / "data" / "train.jsonl")
    dense_config = write_config(tmp_path / "dense.yaml", tmp_path / "dense")
    assert main(["train", str(dense_config), "model.memory_layers=[]", "train.slot_stats_batches=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.slot_stats_batches" in err and "need a memory model" in err and "\n" not in err


def _new_facts(directory: Path) -> tuple[Path, Path]:
    """New text (question/answer documents about people the model never saw) and its QA file."""
    pairs = [{"question": f"Where was Zorblat {name} born?", "answer": city}
             for name, city in (("Quen", "Paris"), ("Vix", "Lima"), ("Oru", "Oslo"), ("Taz", "Kyiv"))]
    text = write_jsonl(directory / "new.jsonl", [{"text": qa_text(p["question"], p["answer"])} for p in pairs] * 4)
    return text, write_jsonl(directory / "new_qa.jsonl", pairs)


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(resolve_checkpoint(checkpoint) / "model.safetensors")


def test_learn_writes_a_patch_that_applies_and_reverts(memory_checkpoint, tmp_path, capsys):
    text, qa = _new_facts(tmp_path)
    out = tmp_path / "learned"
    assert main(["learn", str(memory_checkpoint), "--data", str(text), "--out", str(out), "--eval", f"new={qa}",
                 "--device", "cpu", "--json", "lr=30", "steps=16", "batch_size=2", "top_t=8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "sparse" and summary["steps"] == 16 and 0 < summary["rows_changed"] <= 16 * 8
    assert summary["after"]["new_answer_nll"] < summary["before"]["new_answer_nll"]
    assert json.loads((out / "learn.json").read_text()) == summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 16 + 2  # losses, evaluations before/after
    assert main(["patch", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sum(info["rows_changed"].values()) == summary["rows_changed"] and info["method"] == "sparse"
    assert info["data_sha256"] == file_fingerprint(text) and info["bytes"] == summary["patch_bytes"]
    (listed,) = info["rows"].values()
    documents = read_documents(text)
    assert 0 < len(listed) <= 20 and all(entry["read_most_by"] for entry in listed)  # every learned row was read
    for entry in listed:
        reads = [r["reads"] for r in entry["read_most_by"]]
        assert reads == sorted(reads, reverse=True) and all(r["example"] in documents for r in entry["read_most_by"])
    checkpoint_bytes = (memory_checkpoint / "model.safetensors").stat().st_size
    assert summary["patch_bytes"] < checkpoint_bytes / 10

    base = _tensors(memory_checkpoint)
    assert main(["patch", "apply", str(memory_checkpoint), str(out), "--out", str(tmp_path / "applied")]) == 0
    applied = _tensors(tmp_path / "applied")
    (table,) = info["rows_changed"]
    changed = (applied[table] != base[table]).any(1).nonzero().squeeze(1)
    assert changed.numel() == summary["rows_changed"]
    assert all(torch.equal(applied[k], base[k]) for k in base if k != table)
    assert main(["patch", "revert", str(tmp_path / "applied"), str(out), "--out", str(tmp_path / "reverted")]) == 0
    reverted = _tensors(tmp_path / "reverted")
    assert all(torch.equal(reverted[k], base[k]) for k in base)  # bit for bit
    capsys.readouterr()
    # applying twice meets a base it was not made on; merging a patch with itself conflicts everywhere
    assert main(["patch", "apply", str(tmp_path / "applied"), str(out), "--out", str(tmp_path / "twice")]) == 2
    assert "patch error: this patch was made on another base model" in capsys.readouterr().err
    assert main(["patch", "merge", str(out), str(out), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert "changed by both patches" in err and "\n" not in err
    assert main(["patch", "merge", str(out), str(out), "--out", str(tmp_path / "merged"), "--policy", "first"]) == 0


def test_learn_full_and_lora_write_what_they_trained(memory_checkpoint, tmp_path, capsys):
    text, _ = _new_facts(tmp_path)
    args = ["--data", str(text), "--device", "cpu", "--json", "steps=3", "batch_size=2"]
    assert main(["learn", str(memory_checkpoint), "--method", "full", "--out", str(tmp_path / "full"), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    model, _, _ = load_pretrained(summary["checkpoint"])  # a checkpoint like any other
    base = _tensors(memory_checkpoint)
    assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
    pytest.importorskip("peft")
    assert main(["learn", str(memory_checkpoint), "--method", "lora", "--out", str(tmp_path / "lora"), *args]) == 0
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter and all("lora_" in k for k in adapter) and config["peft_type"] == "LORA" and config["r"] == 8


def test_learn_errors_are_one_line(memory_checkpoint, tmp_path, capsys):
    text, _ = _new_facts(tmp_path)
    cases = [
        (["--out", str(tmp_path / "a"), "top_t=0"], "top_t: must be >= 1"),
        (["--out", str(tmp_path / "b"), "--background", str(tmp_path / "none.safetensors")], "slot-stats"),
        (["--out", str(tmp_path / "c"), "no_such=1"], "no_such"),
    ]
    for extra, message in cases:
        assert main(["learn", str(memory_checkpoint), "--data", str(text), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("kept")
    assert main(["learn", str(memory_checkpoint), "--data", str(text), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "kept"
