"""The command line end to end: train, eval and generate on a tiny fact world, and their errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from memlayers.bench.reliability import TINY_RUN
from memlayers.cli import main
from memlayers.config import apply_overrides
from memlayers.data.packing import pack_documents
from memlayers.data.text import qa_prompt, read_documents, read_qa, write_jsonl
from memlayers.eval.perplexity import evaluate_perplexity
from memlayers.eval.qa import evaluate_qa
from memlayers.train.checkpoint import list_checkpoints
from memlayers.train.metrics import read_metrics
from memlayers.train.pretrained import load_pretrained

# the tiny run, with a longer context, a higher lr and logging every other step
TINY = apply_overrides(TINY_RUN, ["model.max_seq_len=64", "optim.lr=1.0e-2", "train.log_every=2"])


@pytest.fixture(scope="module")
def config_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny_facts.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(config_yaml, tmp_path_factory):
    """One run trained with ``memlayers train``: (run dir, checkpoint dir, its stdout)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out, err = io.StringIO(), io.StringIO()  # capsys is per test; this fixture is per module
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            ["train", str(config_yaml), f"train.out_dir={run_dir}", "train.checkpoint_every=4"]
        )
    assert code == 0, err.getvalue()
    checkpoint = run_dir / "checkpoints" / "step_00000008"
    return run_dir, checkpoint, out.getvalue()


@pytest.fixture
def qa_file(trained, tmp_path) -> tuple[Path, list[dict]]:
    """A hand-made QA file: a few of the world's pairs, of different attributes and people."""
    run_dir, _, _ = trained
    world = read_qa(run_dir / "data" / "qa.jsonl")
    pairs = [
        {"question": world[i]["question"], "answer": world[i]["answer"]}
        for i in (0, 6, 12, 18, 24, 77)
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", pairs)
    return path, pairs


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_train_writes_checkpoints_and_prints_a_summary(trained):
    run_dir, checkpoint, stdout = trained
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004", "step_00000008"]
    assert f"checkpoint   {checkpoint}" in stdout.splitlines()
    summary = dict(line.split(None, 1) for line in stdout.splitlines() if line.strip())
    assert int(summary["step"]) == 8
    assert float(summary["answer_nll"]) > 0
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics if "loss" in r] == [2, 4, 6, 8]
    assert (run_dir / "config.yaml").is_file() and (checkpoint / "tokenizer.json").is_file()


def test_eval_json_equals_direct_evaluation(trained, qa_file, tmp_path, capsys):
    run_dir, checkpoint, _ = trained
    qa_path, pairs = qa_file
    heldout = run_dir / "data" / "heldout.jsonl"
    out_file = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(checkpoint),
            "--qa",
            str(qa_path),
            "--text",
            str(heldout),
            "--json",
            "--device",
            "cpu",
            "--out",
            str(out_file),
        ]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out)

    model, tokenizer, config = load_pretrained(checkpoint)
    direct = evaluate_qa(model, tokenizer, pairs, max_new_tokens=16, batch_size=64)
    assert results["qa_n"] == len(pairs) == 6
    assert results["qa_exact_match"] == direct.exact_match
    assert results["answer_nll"] == direct.answer_nll
    assert json.loads(out_file.read_text())["predictions"] == direct.predictions

    rows = pack_documents(
        tokenizer.encode_batch(read_documents(heldout)),
        config.data.seq_len,
        tokenizer.bos_id,
        tokenizer.eos_id,
    )
    ppl = evaluate_perplexity(model, rows, batch_size=64)
    assert results["text_loss"] == ppl["loss"] and results["text_tokens"] == ppl["tokens"]


def test_eval_from_run_dir_with_limit_prints_a_table(trained, qa_file, capsys):
    run_dir, checkpoint, _ = trained
    qa_path, pairs = qa_file
    assert (
        main(["eval", str(run_dir), "--qa", str(qa_path), "--limit", "2", "--device", "cpu"]) == 0
    )
    table = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    model, tokenizer, _ = load_pretrained(checkpoint)
    direct = evaluate_qa(model, tokenizer, pairs[:2], batch_size=64)
    assert int(table["qa_n"]) == 2
    assert float(table["answer_nll"]) == pytest.approx(direct.answer_nll, abs=1e-4)


def test_eval_scores_several_named_qa_sets(trained, capsys, tmp_path):
    run_dir, checkpoint, _ = trained
    seen, test = run_dir / "data" / "qa_seen.jsonl", run_dir / "data" / "qa_test.jsonl"
    out_file = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--qa", f"recall={seen}", "--qa", f"extraction={test}", "--limit", "5",
                 "--json", "--device", "cpu", "--out", str(out_file)]) == 0
    results = json.loads(capsys.readouterr().out)
    model, tokenizer, _ = load_pretrained(checkpoint)
    for name, path in (("recall", seen), ("extraction", test)):
        direct = evaluate_qa(model, tokenizer, read_qa(path)[:5], max_new_tokens=16, batch_size=64)
        assert results[f"qa_exact_match_{name}"] == direct.exact_match
        assert results[f"answer_nll_{name}"] == direct.answer_nll and results[f"qa_n_{name}"] == 5
        assert json.loads(out_file.read_text())["predictions"][name] == direct.predictions
    assert "qa_exact_match" not in results
    for bad in ([f"--qa={seen}", f"--qa={test}"], ["--qa", f"bad name={seen}"]):
        assert main(["eval", str(checkpoint), *bad, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--qa" in err


def test_training_scores_recall_and_extraction_of_the_generated_world(trained):
    run_dir, _, stdout = trained
    summary = dict(line.split(None, 1) for line in stdout.splitlines() if line.strip())
    for name in ("recall", "extraction"):
        assert 0.0 <= float(summary[f"qa_em_{name}"]) <= 1.0 and float(summary[f"answer_nll_{name}"]) > 0
    assert summary["qa_em"] == summary["qa_em_recall"]
    assert "qa_em_validation" not in summary  # the validation split is for tuning only


def test_generate_equals_greedy_decoding(trained, capsys):
    run_dir, checkpoint, _ = trained
    question = read_qa(run_dir / "data" / "qa.jsonl")[3]["question"]
    prompt = qa_prompt(question)  # "Question: ...\nAnswer:"
    assert (
        main(
            [
                "generate",
                str(checkpoint),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out

    model, tokenizer, _ = load_pretrained(checkpoint)
    ids = tokenizer.encode(prompt, bos=True)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(5):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            new.append(token)
    assert printed.startswith(prompt)
    assert printed == prompt + tokenizer.decode(new) + "\n"


def test_sampled_generation_is_reproducible_with_a_seed(trained, capsys):
    _, checkpoint, _ = trained
    args = [
        "generate",
        str(checkpoint),
        "--prompt",
        "Question: Who",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--temperature",
        "1.5",
        "--seed",
    ]
    outputs = []
    for seed in ("3", "3"):
        assert main([*args, seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Question: Who")


def test_resume_continues_a_run(config_yaml, tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = [
        "train",
        str(config_yaml),
        f"train.out_dir={run_dir}",
        "train.log_every=1",
        "train.checkpoint_every=2",
    ]
    assert main([*base, "train.steps=4"]) == 0
    assert main([*base, "train.steps=6", "--resume"]) == 0
    assert "step" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert list_checkpoints(run_dir)[-1].name == "step_00000006"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.steps=0", "train.steps"),
        ("model.memory.knn=100", "model.memory.knn"),
        ("train.stepz=3", "stepz"),
        ("train.steps", "train.steps"),
    ],
    ids=["invalid-value", "rule", "unknown-key", "no-equals"],
)
def test_bad_override_is_one_line_exit_2(config_yaml, tmp_path, capsys, override, key):
    assert main(["train", str(config_yaml), f"train.out_dir={tmp_path / 'run'}", override]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("memlayers: config error:") and key in err
    assert captured.out == ""
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_missing_checkpoint_is_exit_2(tmp_path, capsys, command):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Who?", "answer": "Ada"}])
    extra = ["--qa", str(qa)] if command == "eval" else ["--prompt", "Question:"]
    assert main([command, str(tmp_path / "no_such_run"), *extra, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("memlayers: checkpoint error:") and "no_such_run" in err


def test_eval_needs_qa_or_text(trained, capsys):
    _, checkpoint, _ = trained
    assert main(["eval", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--qa" in err and "config error" in err


def test_resume_without_checkpoints_is_a_clear_error(config_yaml, tmp_path, capsys):
    run_dir = tmp_path / "fresh"
    assert main(["train", str(config_yaml), f"train.out_dir={run_dir}", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        err.startswith("memlayers: checkpoint error:")
        and "no checkpoint" in err
        and str(run_dir) in err
    )


def test_missing_training_data_is_a_data_error(config_yaml, tmp_path, capsys):
    missing = tmp_path / "absent.jsonl"
    assert (
        main(
            [
                "train",
                str(config_yaml),
                f"train.out_dir={tmp_path / 'run'}",
                f"data.train={missing}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and err.startswith("memlayers: data error:")
        and str(missing) in err
    )


def test_diverging_run_stops_with_exit_2(config_yaml, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            str(config_yaml),
            f"train.out_dir={run_dir}",
            "optim.lr=1e30",
            "optim.value_lr=1e30",
            "train.warmup_steps=0",
            "train.schedule=constant",
        ]
    )
    assert code == 2
    err = last_line(capsys.readouterr().err)  # above it: the progress bar
    assert err.startswith("memlayers: training stopped: loss is nan at step")
    assert list_checkpoints(run_dir) == []
