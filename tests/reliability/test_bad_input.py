"""Bad input through `memlayers train`: every case works or fails with one clear line (exit 2),
never a traceback, a hang or a crash. Runs stop after one training step (an injected fault)."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from memlayers.bench.reliability import bad_input, write_config
from memlayers.train.config import RunConfig


def numeric_keys(cls=RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """Every int and float key of the run config, dotted."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += numeric_keys(kind, f"{prefix}{f.name}.")
        elif kind in (int, float) or kind in (int | None, float | None):
            keys.append((f"{prefix}{f.name}", int if int in typing.get_args(kind) or kind is int else float))
    return keys


NUMERIC = numeric_keys()
HUGE = {int: 10**12, float: 1e30}


def test_the_fuzz_covers_the_config():
    names = [k for k, _ in NUMERIC]
    assert {"model.dim", "model.memory.n_keys", "optim.value_lr", "train.batch_size", "data.seq_len"} <= set(names)


def run(tmp_path: Path, name: str, *overrides: str):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run")
    return bad_input(tmp_path, name, ["train", str(config), *overrides, "train.eval_qa=2"])


@pytest.mark.slow
@pytest.mark.parametrize("value", ["zero", "negative", "huge"])
@pytest.mark.parametrize(("key", "kind"), NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_key_at_zero_negative_and_huge(tmp_path, key, kind, value):
    number = {"zero": 0, "negative": -1, "huge": HUGE[kind]}[value]
    outcome = run(tmp_path, f"{key}={number}", f"{key}={number}")
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


DATA_FILES = {
    "empty": b"",
    "binary": bytes(range(256)) * 64,
    "latin-1": "caf\xe9 au lait\n\nna\xefve\n".encode("latin-1"),
    "huge-line": ("word " * 400_000).encode(),
    "jsonl-missing-field": b'{"body": "no text field"}\n',
    "jsonl-malformed": b'{"text": "ok"}\n{not json\n',
    "jsonl-not-objects": b"[1, 2]\n3\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DATA_FILES)
def test_bad_training_files(tmp_path, case):
    suffix = ".jsonl" if case.startswith("jsonl") else ".txt"
    path = write(tmp_path / f"train{suffix}", DATA_FILES[case])
    outcome = run(tmp_path, f"train file: {case}", f"data.train={path}")
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"


QA_FILES = {
    "missing-answer": '{"question": "Who?"}\n',
    "missing-question": '{"answer": "x"}\n',
    "not-json": "question? answer\n",
    "empty": "",
    "answer-not-a-string": '{"question": "Who?", "answer": 3}\n',
}


@pytest.mark.slow
@pytest.mark.parametrize("case", QA_FILES)
def test_bad_qa_files(tmp_path, case):
    path = write(tmp_path / "qa.jsonl", QA_FILES[case])
    outcome = run(tmp_path, f"qa file: {case}", f"data.qa={path}")
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not-json", "not-a-tokenizer", "missing-data-file", "missing-heldout"])
def test_missing_and_foreign_files(tmp_path, case):
    overrides = {
        "missing": [f"data.tokenizer={tmp_path / 'nope.json'}"],
        "not-json": [f"data.tokenizer={write(tmp_path / 't.json', b'{')}"],
        "not-a-tokenizer": [f"data.tokenizer={write(tmp_path / 't.json', json.dumps({'vocab': 1}))}"],
        "missing-data-file": [f"data.train={tmp_path / 'nope.txt'}"],
        "missing-heldout": [f"data.heldout={tmp_path / 'nope.txt'}"],
    }[case]
    outcome = run(tmp_path, case, *overrides)
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"


@pytest.mark.parametrize(
    "override",
    ["model.nope=1", "model.dim=abc", "train.steps=1.5", "optim.lr=fast", "train.schedule=zigzag",
     "model.memory_layers=[9]", "train=3", "model.memory.qk_norm=maybe", "data.facts.n_people=[1]"],
)
def test_unknown_and_mistyped_keys(tmp_path, override):
    outcome = run(tmp_path, override, override)
    assert outcome.ok and outcome.detail != "accepted", f"{outcome.scenario}: {outcome.detail}"


@pytest.mark.parametrize("text", ["model: [unclosed", "- a list\n- at the top", "model:\n  dim: 32\n dim: 3", "\x00\x01"])
def test_malformed_yaml(tmp_path, text):
    path = write(tmp_path / "bad.yaml", text)
    outcome = bad_input(tmp_path, f"yaml {text!r}", ["train", str(path), f"train.out_dir={tmp_path / 'run'}"])
    assert outcome.ok and outcome.detail != "accepted", f"{outcome.scenario}: {outcome.detail}"
