"""The lm-evaluation-harness integration: the ``memlayers`` model against direct computations
with the model, the local fact task against ``memlayers eval --qa``, and ``run_harness``.

The tiny run answers every question with spaces after 30 steps, so these tests use
it with noise added to its weights: a model whose greedy answers are varied text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from memlayers.cli import main  # noqa: E402
from memlayers.config import ConfigError, to_dict  # noqa: E402
from memlayers.data.facts import generate_world  # noqa: E402
from memlayers.data.text import qa_prompt, qa_text, read_documents, read_qa, write_jsonl  # noqa: E402
from memlayers.demo.runner import demo_config  # noqa: E402
from memlayers.eval.generate import generate  # noqa: E402
from memlayers.eval.qa import evaluate_qa  # noqa: E402
from memlayers.integrations.lm_eval import (  # noqa: E402
    TASK_NAME,
    TASKS_DIR,
    MemlayersLM,
    harness_argv,
    run_harness,
)
from memlayers.integrations.lm_eval.harness import load_fact_qa  # noqa: E402
from memlayers.train.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from memlayers.train.pretrained import load_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny run's model with Gaussian noise (3x each weight's std) added."""
    model, _, config = load_pretrained(tiny_run)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 3 * float(param.std()))
    run = tmp_path_factory.mktemp("noisy") / "run"
    return save_checkpoint(run, 0, model, None, {"config": to_dict(config)}, tokenizer_path=tiny_run / "tokenizer.json")


@pytest.fixture(scope="module")
def loaded(ckpt: Path):
    """``(model, tokenizer)`` of ``ckpt``, for the direct computations."""
    model, tokenizer, _ = load_pretrained(ckpt)
    return model, tokenizer


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> MemlayersLM:
    """The lm-eval model of ``ckpt``, 8 requests per batch."""
    return MemlayersLM(checkpoint=str(ckpt), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def mixed_qa(loaded, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 questions of the tiny world with non-empty greedy answers (short enough to be gold
    answers); every other one has that answer as its gold answer, so exact match is about 0.5."""
    model, tokenizer = loaded
    predictions = evaluate_qa(model, tokenizer, read_qa(tiny_run / "data" / "qa.jsonl")[:80]).predictions
    fits = [p for p in predictions if 0 < len(tokenizer.encode(" " + p["prediction"])) <= model.config.max_seq_len]
    kept = [p for p in fits if p["prediction"]][:20]
    assert len(kept) == 20
    records = [
        {"question": p["question"], "answer": p["prediction"] if i % 2 == 0 else p["answer"]}
        for i, p in enumerate(kept)
    ]
    return write_jsonl(tmp_path_factory.mktemp("qa") / "mixed.jsonl", records)


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    """lm-eval requests of type ``kind``, one per argument tuple."""
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


@torch.no_grad()
def _log_probs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 log-probs ``(T, V)`` of one unbatched forward over ``ids[:-1]``, and the targets ``ids[1:]``."""
    tokens = torch.tensor([ids])  # (1, T + 1)
    logits = model(tokens[:, :-1]).logits[0].float()  # (T, V)
    return F.log_softmax(logits, dim=-1), tokens[0, 1:]


def _direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probs (context cropped to the window) and whether each is the argmax."""
    log_probs, targets = _log_probs(model, (context + continuation)[-(model.config.max_seq_len + 1) :])
    n = len(continuation)
    scored, wanted = log_probs[-n:], targets[-n:]  # (n, V), (n,)
    return float(scored.gather(-1, wanted[:, None]).sum()), bool((scored.argmax(-1) == wanted).all())


def test_loglikelihood_equals_direct_forward(lm: MemlayersLM, loaded, tiny_run: Path):
    model, tokenizer = loaded
    pairs = read_qa(tiny_run / "data" / "qa.jsonl")
    arguments = [(qa_prompt(p["question"]), " " + p["answer"]) for p in pairs[:4]]
    arguments.append((" ".join(qa_text(p["question"], p["answer"]) for p in pairs[4:8]), " " + pairs[8]["answer"]))
    arguments.append(("", " " + pairs[9]["answer"]))  # empty context: BOS only
    found = False
    for pair in pairs[10:40]:  # the model's own greedy tokens, as few as survive re-encoding (whole characters)
        prompt = tokenizer.encode(qa_prompt(pair["question"]), bos=True)
        tokens = generate(model, [prompt], 4)[0]
        for k in range(1, len(tokens) + 1):
            if tokenizer.encode(qa_prompt(pair["question"]) + tokenizer.decode(tokens[:k]), bos=True) == prompt + tokens[:k]:
                arguments.append((qa_prompt(pair["question"]), tokenizer.decode(tokens[:k])))
                found = True
                break
        if found:
            break
    assert found, "no greedy continuation of the tiny model survives re-encoding"
    expected = []
    for context, continuation in arguments:
        context_ids = tokenizer.encode(context, bos=True) if context else [tokenizer.bos_id]
        expected.append(_direct_loglikelihood(model, context_ids, tokenizer.encode(continuation)))
    assert len(tokenizer.encode(arguments[4][0])) > model.config.max_seq_len  # cropped on the left
    greedy = [g for _, g in expected]
    assert any(greedy) and not all(greedy)

    for batch_size in (1, 8):
        lm.batch_size = batch_size
        got = lm.loglikelihood(_requests("loglikelihood", arguments), disable_tqdm=True)
        assert [g for _, g in got] == greedy
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-5, rel=0)
    lm.batch_size = 8


def _direct_rolling(model, tokens: list[int], bos: int) -> float:
    """Log-likelihood of ``tokens`` after BOS, predicting each once, in windows of ``max_seq_len``
    inputs: the first after BOS, each later one predicting the next ``max_seq_len`` tokens given
    the ``max_seq_len`` tokens before its last target."""
    window = model.config.max_seq_len
    sequence = [bos] + tokens
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + window, len(tokens))
        log_probs, targets = _log_probs(model, sequence[max(0, end - window) : end + 1])
        n = end - start
        total += float(log_probs[-n:].gather(-1, targets[-n:, None]).sum())
        start = end
    return total


def test_loglikelihood_rolling_equals_direct_nll(lm: MemlayersLM, loaded, tiny_run: Path):
    model, tokenizer = loaded
    bios = read_documents(tiny_run / "data" / "train.jsonl")
    short = tokenizer.decode(tokenizer.encode(bios[0])[:20])
    long = " ".join(bios[:4])
    short_ids, long_ids = tokenizer.encode(short), tokenizer.encode(long)
    assert len(short_ids) <= model.config.max_seq_len < 2 * model.config.max_seq_len < len(long_ids)

    log_probs, targets = _log_probs(model, [tokenizer.bos_id] + short_ids)
    whole = float(log_probs.gather(-1, targets[:, None]).sum())
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,), ("",)]), disable_tqdm=True)
    assert got == pytest.approx([whole, _direct_rolling(model, long_ids, tokenizer.bos_id), 0.0], abs=1e-4, rel=0)
    assert _direct_rolling(model, short_ids, tokenizer.bos_id) == pytest.approx(whole, abs=1e-5)


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops``."""
    return text[: min([text.find(s) for s in stops if s in text], default=len(text))]


def test_generate_until_equals_memlayers_generate(lm: MemlayersLM, ckpt: Path, loaded, tiny_run: Path):
    model, tokenizer = loaded
    pairs = read_qa(tiny_run / "data" / "qa.jsonl")
    prompts = [qa_prompt(p["question"]) for p in pairs[:6]]
    prompts.append(" ".join(qa_text(p["question"], p["answer"]) for p in pairs[6:9]) + " " + prompts[0])
    max_new = 8
    raw = []
    for prompt in prompts:  # one at a time
        ids = tokenizer.encode(prompt, bos=True)
        raw.append(tokenizer.decode(generate(model, [ids], max_new, stop_ids=[tokenizer.eos_id])[0]))
    assert len(tokenizer.encode(prompts[-1])) > model.config.max_seq_len

    def run(until: list[str], **extra) -> list[str]:
        gen = {"until": until, "max_gen_toks": max_new, **extra}
        return lm.generate_until(_requests("generate_until", [(p, gen) for p in prompts]), disable_tqdm=True)

    assert run([]) == raw
    assert len(set(raw)) > 1
    # stop strings taken from the outputs themselves (two characters, no replacement character)
    found = [m.group() for m in (re.search(r"[^\ufffd]{2}", text[1:]) for text in raw) if m]
    stops = list(dict.fromkeys(found))[:2]
    assert len(stops) == 2
    for until in ([stops[0]], stops):
        cut = [_cut(text, until) for text in raw]
        assert cut != raw
        assert run(until) == cut

    sampled = run([], do_sample=True, temperature=1.0)
    again = MemlayersLM(checkpoint=str(ckpt), device="cpu", batch_size=8)
    assert again.generate_until(
        _requests("generate_until", [(p, {"until": [], "max_gen_toks": max_new, "do_sample": True}) for p in prompts]),
        disable_tqdm=True,
    ) == sampled  # seeded: the same samples from a fresh model
    assert sampled != raw


def test_simple_evaluate_matches_memlayers_eval(ckpt: Path, loaded, mixed_qa: Path):
    """The parity test: lm-eval's score of the local fact task is ``memlayers eval --qa``'s."""
    model, tokenizer = loaded
    reference = evaluate_qa(model, tokenizer, read_qa(mixed_qa))
    assert 0.3 <= reference.exact_match <= 0.7

    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"qa_file": str(mixed_qa)})
    results = lm_eval.simple_evaluate(
        # on the CPU like `loaded`: a noisy model's argmax could flip between devices
        model="memlayers", model_args=f"checkpoint={ckpt},device=cpu", tasks=[TASK_NAME], task_manager=tasks,
        limit=20, log_samples=True, bootstrap_iters=0,
    )
    assert results["results"][TASK_NAME]["exact_match,none"] == pytest.approx(reference.exact_match)
    samples = sorted(results["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    assert len(samples) == reference.n
    for sample, prediction in zip(samples, reference.predictions, strict=True):
        assert sample["doc"]["question"] == prediction["question"]
        assert sample["filtered_resps"][0].strip() == prediction["prediction"]
        assert sample["exact_match"] == float(prediction["correct"])


def test_bad_model_arguments_raise_one_line_errors(tmp_path: Path, ckpt: Path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        MemlayersLM(checkpoint=str(missing))
    with pytest.raises(CheckpointError, match="checkpoint=PATH"):
        MemlayersLM()
    with pytest.raises(ConfigError, match="pretrained"):
        MemlayersLM(checkpoint=str(ckpt), pretrained="gpt2")
    with pytest.raises(ConfigError, match="batch_size"):
        MemlayersLM(checkpoint=str(ckpt), batch_size="many")
    assert MemlayersLM(checkpoint=str(ckpt), batch_size="auto").batch_size == 16
    assert MemlayersLM(checkpoint=str(ckpt), batch_size="4").batch_size == 4


def test_a_device_the_machine_lacks_names_the_model_argument(monkeypatch: pytest.MonkeyPatch, ckpt: Path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: cuda asked for, but no CUDA device is available; use cpu$"):
        MemlayersLM(checkpoint=str(ckpt), device="cuda")
    with pytest.raises(ConfigError, match=r"^device: unknown device 'gpu'"):
        MemlayersLM(checkpoint=str(ckpt), device="gpu")


def test_fact_task_reads_demo_questions_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    task = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load([TASK_NAME])["tasks"][TASK_NAME]
    docs = list(task.test_docs())
    demo = generate_world(demo_config(quick=False).facts).qa_pairs()
    assert docs == demo
    assert task.doc_to_text(docs[0]) == qa_prompt(demo[0]["question"])
    assert len(load_fact_qa(qa_file=None, version=1.0)["test"]) == len(demo)


def test_harness_argv_adds_our_tasks():
    include = ["--include_path", str(TASKS_DIR)]
    assert harness_argv(["--model", "memlayers", "--tasks", "t"]) == ["--model", "memlayers", "--tasks", "t", *include, "--device", "auto"]
    assert harness_argv(["run", "--tasks", "t", "--device", "cpu"]) == ["run", "--tasks", "t", "--device", "cpu", *include]
    assert harness_argv(["ls", "tasks"]) == ["ls", "tasks", *include]
    for passthrough in ([], ["-h"], ["run"]):
        assert harness_argv(passthrough) == passthrough
    with pytest.raises(ConfigError, match="--include_path"):
        harness_argv(["--tasks", "t", "--include_path=mine"])
    assert run_harness(["run", "--no_such_option", "x"]) == 2  # lm-eval's usage error, as its exit status


class _OwnTasksOnly(TaskManager):
    """A TaskManager without lm-eval's ~10,000 built-in tasks, which take ~13 s to index."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, include_defaults=False, **kwargs)


def test_memlayers_lm_eval_command_writes_results(ckpt: Path, loaded, mixed_qa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("lm_eval.tasks.TaskManager", _OwnTasksOnly)
    model, tokenizer = loaded
    reference = evaluate_qa(model, tokenizer, read_qa(mixed_qa)[:4])
    assert 0 < reference.exact_match < 1
    code = main([  # `memlayers lm-eval ...`: every argument goes to run_harness and lm-eval's parser
        "lm-eval", "--model", "memlayers", "--model_args", f"checkpoint={ckpt}", "--tasks", TASK_NAME,
        "--device", "cpu", "--limit", "4", "--output_path", str(tmp_path), "--metadata", json.dumps({"qa_file": str(mixed_qa)}),
    ])
    assert code == 0
    (results_file,) = tmp_path.glob("**/results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"][TASK_NAME]["exact_match,none"] == pytest.approx(reference.exact_match)
    assert results["config"]["memlayers_checkpoint"] == str(ckpt)


_LIST = "`memlayers lm-eval ls tasks` lists them"


@pytest.mark.parametrize("args,line", [
    (["--model_args", "checkpoint=run", "--tasks", "no_such_task"],
     f"config error: --tasks: unknown task(s) no_such_task; {_LIST}"),
    (["--model_args", "checkpoint=run", "--tasks", f"{TASK_NAME},nosuch"],
     f"config error: --tasks: unknown task(s) nosuch; {_LIST}"),
    (["--model_args", "checkpoint=run", "--tasks", TASK_NAME, "nosuch", "other"],
     f"config error: --tasks: unknown task(s) nosuch, other; {_LIST}"),
    (["--model_args", "checkpoint=run"], f"config error: --tasks: no task given; pass --tasks NAME ({_LIST})"),
    (["--model_args", "checkpoint=run,device=cpu", "--tasks", TASK_NAME],
     "config error: --model_args: device=cpu clashes with lm-eval's own --device, which it passes to every model; "
     "give --device cpu instead"),
    (["--model_args", "checkpoint=run", "batch_size=8", "--tasks", TASK_NAME],
     "config error: --model_args: batch_size=8 clashes with lm-eval's own --batch_size, which it passes to every "
     "model; give --batch_size 8 instead"),
    (["--model_args", '{"checkpoint": "run", "device": "cuda"}', "--tasks", TASK_NAME],
     "config error: --model_args: device=cuda clashes with lm-eval's own --device, which it passes to every model; "
     "give --device cuda instead"),
    (["--tasks", TASK_NAME], "checkpoint error: no checkpoint given; pass model_args checkpoint=PATH "
     "(a checkpoint or run directory)"),
    (["--model_args", "checkpoint=no_such_run", "--tasks", TASK_NAME], "checkpoint error: no checkpoint at no_such_run"),
])
def test_memlayers_lm_eval_input_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str], line: str
):
    monkeypatch.setattr("lm_eval.tasks.TaskManager", _OwnTasksOnly)
    monkeypatch.chdir(tmp_path)  # where no_such_run is missing
    assert main(["lm-eval", "--model", "memlayers", *args]) == 2
    err = capsys.readouterr().err  # lm-eval's own log lines come first
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"memlayers: {line}")


def test_memlayers_lm_eval_names_an_unknown_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr("lm_eval.tasks.TaskManager", _OwnTasksOnly)
    assert main(["lm-eval", "--model", "nosuch", "--tasks", TASK_NAME, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "memlayers: config error: --model: unknown model 'nosuch'; use --model memlayers --model_args checkpoint=PATH, "
        "or --model hf --model_args pretrained=DIR for a directory of `memlayers export`"
    )


def test_exported_model_scores_the_same_in_lm_evals_own_hf_model(lm: MemlayersLM, ckpt: Path, tiny_run: Path, tmp_path: Path):
    """`memlayers export` gives a directory that lm-eval's stock `hf` model loads
    (after `import memlayers.integrations.hf`) and scores as the memlayers model does."""
    pytest.importorskip("accelerate")
    from lm_eval.api.registry import get_model

    from memlayers.integrations.hf import export_to_hf

    hf_dir = export_to_hf(ckpt, tmp_path / "hf")
    hf_lm = get_model("hf")(pretrained=str(hf_dir), device="cpu", batch_size=4)
    pairs = read_qa(tiny_run / "data" / "qa.jsonl")[:6]
    arguments = [(qa_prompt(p["question"]), " " + p["answer"]) for p in pairs]
    ours = lm.loglikelihood(_requests("loglikelihood", arguments), disable_tqdm=True)
    theirs = hf_lm.loglikelihood(_requests("loglikelihood", arguments), disable_tqdm=True)
    assert len({round(lp, 3) for lp, _ in ours}) == len(ours)  # distinct scores, so equality means something
    assert [lp for lp, _ in theirs] == pytest.approx([lp for lp, _ in ours], abs=1e-4, rel=0)
    assert [g for _, g in theirs] == [g for _, g in ours]
