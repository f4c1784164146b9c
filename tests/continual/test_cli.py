"""``memlayers slot-stats`` end to end on a tiny trained memory model, and its one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml

from memlayers.bench.reliability import TINY_RUN
from memlayers.cli import main
from memlayers.continual.slot_report import collect_from_file
from memlayers.continual.slot_stats import SlotStats, collect_slot_stats
from memlayers.data.packing import pack_documents
from memlayers.data.text import read_documents
from memlayers.train.pretrained import load_pretrained
from memlayers.train.run_dir import file_fingerprint


def _train(directory: Path, *overrides: str) -> Path:
    """Train the reliability suite's tiny run with ``memlayers train``; its final checkpoint."""
    config = directory / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(config), f"train.out_dir={directory / 'run'}", *overrides]) == 0
    return directory / "run" / "checkpoints" / "step_00000008"


@pytest.fixture(scope="module")
def memory_checkpoint(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("slots"))


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
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    (dense_dir / "tiny.yaml").write_text(yaml.safe_dump(TINY_RUN))
    assert main(["train", str(dense_dir / "tiny.yaml"), f"train.out_dir={dense_dir / 'run'}",
                 "model.memory_layers=[]", "train.slot_stats_batches=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.slot_stats_batches" in err and "need a memory model" in err and "\n" not in err
