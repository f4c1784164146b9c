"""The reliability suite: inject faults at known points, damage checkpoints, feed bad input.

Every scenario here returns an :class:`Outcome`; ``tests/reliability/`` asserts on
them one by one and :func:`run_reliability` (``benchmarks/bench_reliability.py``)
runs them all and counts: faults injected, runs resumed bit-exactly, bad inputs
tried, crashes, tracebacks shown to the user and checkpoints lost (the last
three must be 0).

Faults land where ``MEMLAYERS_FAULT`` says (:mod:`memlayers.faults`), never at a
time, so a scenario gives the same answer on an idle laptop and a loaded CI
machine. Runs are the real command line (``python -m memlayers.cli``, under
``torch.distributed.run`` for several ranks) on a tiny model and fact world.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memlayers.cli import main
from memlayers.config import load_config
from memlayers.faults import ENV, InjectedFault
from memlayers.train.checkpoint import resolve_checkpoint
from memlayers.train.checkpoint_write import list_checkpoints
from memlayers.train.config import RunConfig
from memlayers.train.metrics import read_metrics
from memlayers.train.sharded_checkpoint import shard_checkpoint
from memlayers.train.trainer import Trainer

TINY_RUN: dict[str, Any] = {
    "model": {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 2,
        "multiple_of": 16,
        "max_seq_len": 32,
        "memory_layers": [1],
        "memory": {"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
    },
    "optim": {"lr": 3.0e-3, "value_lr": 1.0e-2},
    "data": {"vocab_size": 300, "seq_len": 32, "facts": {"n_people": 30, "heldout_people": 5, "bios_per_person": 1}},
    "train": {
        "out_dir": "runs/tiny", "steps": 8, "batch_size": 4, "warmup_steps": 2, "device": "cpu", "threads": 1,
        "log_every": 1, "eval_every": 0, "eval_qa": 10, "eval_batches": 2, "checkpoint_every": 0, "keep_last": 2,
    },
}
"""A tiny model with one Memory+ layer on a fact world of 30 people: seconds per run on one core."""

STEP_POINTS = ("step.start", "step.backward", "step.optimizer", "step.end")
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "tokenizer.json", "state.json")
CHECKPOINT_POINTS = (
    "checkpoint.begin", *(f"checkpoint.write.{f}" for f in CHECKPOINT_FILES),
    "checkpoint.rename", "checkpoint.renamed", "checkpoint.prune",
)
EVERY_RANK_POINTS = ("checkpoint.shards", "checkpoint.write.shards")
"""The points of a sharded checkpoint write that every rank passes (rank 0 alone passes the others)."""
SHARDED_POINTS = (
    "checkpoint.begin", *EVERY_RANK_POINTS, "checkpoint.write.state.json",
    "checkpoint.rename", "checkpoint.renamed", "checkpoint.prune",
)
CRASH_SETTINGS = ["train.steps=8", "train.checkpoint_every=2", "train.keep_last=1"]
"""Checkpoints at steps 2, 4, 6 (and 8), one kept: a fault at step 4 meets a checkpoint being
written and the one of step 2 being pruned; a fault in step 5 comes after a complete checkpoint."""


@dataclass
class Outcome:
    """What one scenario did and whether every promise held."""

    scenario: str
    ok: bool
    detail: str = ""
    faults: int = 0
    resumed_exactly: int = 0
    bad_inputs: int = 0
    crashes: int = 0
    tracebacks: int = 0
    checkpoints_lost: int = 0
    extra: dict = field(default_factory=dict)


def write_config(path: Path, out_dir: Path) -> Path:
    """The tiny run's YAML, writing to ``out_dir``."""
    config = {**TINY_RUN, "train": {**TINY_RUN["train"], "out_dir": str(out_dir)}}
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], nproc: int = 1, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``memlayers ARGS`` in a fresh process (under torchrun for ``nproc`` > 1), with an optional fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*launcher, "-m", "memlayers.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _our_traceback_texts(stderr: str) -> list[str]:
    """The Python tracebacks in ``stderr`` that memlayers showed (torchrun's own report of a
    failed child, ``ChildFailedError``, is the launcher's and left out)."""
    chunks = stderr.split("Traceback (most recent call last):")[1:]
    return [chunk for chunk in chunks if "ChildFailedError" not in chunk]


def our_tracebacks(stderr: str) -> int:
    """How many tracebacks memlayers showed in ``stderr``."""
    return len(_our_traceback_texts(stderr))


def shown_traceback(stderr: str) -> str:
    """The last traceback counted by :func:`our_tracebacks`, as its final lines (empty if none)."""
    texts = _our_traceback_texts(stderr)
    return " | ".join(line.strip() for line in texts[-1].strip().splitlines()[-6:]) if texts else ""


def one_line_error(rc: int, stderr: str) -> str | None:
    """None when a command failed the promised way (exit 2, a ``memlayers:`` line, no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("memlayers: ") and "error" in line]
    if our_tracebacks(stderr):
        return "a traceback was shown"
    if rc != 2:
        return f"exit code {rc}, expected 2"
    if not lines:
        return "no 'memlayers: ... error' line"
    return None


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss as logged (the final evaluation's line has no loss)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _settings(nproc: int) -> list[str]:
    if nproc == 1:
        return list(CRASH_SETTINGS)
    return [*CRASH_SETTINGS, f"train.batch_size={4 // max(nproc // 2, 1)}", "parallel.memory_parallel=2",
            "parallel.timeout_s=60"]


def _train(args: list[str], nproc: int, fault: str | None, inline: bool) -> tuple[int | str, str]:
    """``memlayers train ARGS``: in a fresh process (or under torchrun), or ``inline`` in this one."""
    if inline:
        return _run_inline(["train", *args], fault)
    done = run_cli(["train", *args], nproc=nproc, fault=fault)
    return done.returncode, done.stderr


def straight_run(work: Path, nproc: int = 1, inline: bool = False) -> dict[int, float]:
    """The uninterrupted run every crashed-and-resumed one is compared with (once per ``work``)."""
    run_dir = work / f"straight-{nproc}{'-inline' if inline else ''}"
    if not (run_dir / "metrics.jsonl").exists():
        config = write_config(run_dir.with_suffix(".yaml"), run_dir)
        rc, stderr = _train([str(config), *_settings(nproc)], nproc, None, inline)
        if rc != 0:
            raise RuntimeError(f"the straight run failed:\n{stderr[-3000:]}")
    return losses(run_dir)


def crash_and_resume(
    work: Path, point: str, step: int, nproc: int = 1, rank: int = 0, action: str = "kill", inline: bool = False
) -> Outcome:
    """Kill (or hang, or fail) rank ``rank`` at ``point`` of ``step``, resume with ``--resume``,
    and compare every step's loss after resuming with the straight run's, bit for bit.

    ``inline``: one process, in this one, with ``raise`` standing in for the kill
    (no cleanup code runs between the fault and the exception leaving ``main``).
    """
    action = "raise" if inline else action
    name = f"{action}@{point}:step={step}:rank={rank} nproc={nproc}"
    expected = straight_run(work, nproc, inline)
    run_dir = work / name.replace(" ", "_").replace(":", "_").replace("@", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = write_config(run_dir.with_suffix(".yaml"), run_dir)
    settings = _settings(nproc)
    if action == "hang":
        settings.append("parallel.timeout_s=10")
    rc, stderr = _train([str(config), *settings], nproc, f"{action}@{point}:step={step}:rank={rank}", inline)
    outcome = Outcome(name, ok=False, faults=1, tracebacks=our_tracebacks(stderr) + int(rc == "traceback"))
    shown = {"after the fault": shown_traceback(stderr)}
    if rc == 0:
        outcome.detail = "the fault did not stop the run"
        return outcome
    complete = list_checkpoints(run_dir)
    newest = max((int(p.name.split("_")[1]) for p in complete), default=0)
    # a checkpoint committed before the fault must still be there
    committed_before = max((s for s in (2, 4, 6) if s < step or (s == step and point in ("checkpoint.renamed", "checkpoint.prune", "step.end"))), default=0)
    outcome.checkpoints_lost = int(newest < committed_before)
    rc, stderr = _train([str(config), *_settings(nproc), "--resume"], nproc, None, inline)
    outcome.tracebacks += our_tracebacks(stderr) + int(rc == "traceback")
    shown["on resuming"] = shown_traceback(stderr)
    if rc != 0:
        outcome.detail = f"resume failed: {stderr.strip().splitlines()[-1:]}"
        return outcome
    got = losses(run_dir)
    exact = got == expected
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))
    outcome.resumed_exactly = int(exact)
    outcome.extra = {"resumed_from": newest, "leftovers": leftovers}
    outcome.ok = exact and not leftovers and not outcome.checkpoints_lost and not outcome.tracebacks
    if not exact:
        differ = [s for s in expected if got.get(s) != expected[s]]
        outcome.detail = f"losses differ from the straight run at steps {differ}"
    elif leftovers:
        outcome.detail = f"leftovers after resuming: {leftovers}"
    elif outcome.tracebacks:
        outcome.detail = "; ".join(f"traceback {when}: {text}" for when, text in shown.items() if text)
    return outcome


def damage(file: Path, how: str) -> None:
    """``flip`` bytes in the middle, ``truncate`` to half, or ``delete`` the file."""
    if how == "delete":
        file.unlink()
        return
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
        return
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    file.write_bytes(bytes(data))


def checkpoint_pair(work: Path, sharded: bool) -> Path:
    """A run directory with checkpoints at steps 2 and 4 (sharded ones converted by ``memlayers shard``)."""
    run_dir = work / ("pair-sharded" if sharded else "pair-single")
    if list_checkpoints(run_dir):
        return run_dir
    single = work / "pair-single"
    if not list_checkpoints(single):
        config = write_config(work / "pair-single.yaml", single)
        done = run_cli(["train", str(config), "train.steps=4", "train.checkpoint_every=2", "train.keep_last=2"])
        if done.returncode != 0:
            raise RuntimeError(f"the checkpointed run failed:\n{done.stderr[-3000:]}")
    if sharded:
        for checkpoint in list_checkpoints(single):
            shard_checkpoint(checkpoint, run_dir)
        shutil.copy(single / "config.yaml", run_dir / "config.yaml")
        shutil.copytree(single / "data", run_dir / "data")
        shutil.copy(single / "tokenizer.json", run_dir / "tokenizer.json")
    return run_dir


def checkpoint_files(work: Path, sharded: bool) -> list[str]:
    """The files of the newest checkpoint of :func:`checkpoint_pair`, relative to it."""
    newest = list_checkpoints(checkpoint_pair(work, sharded))[-1]
    return sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file())


def damaged_checkpoint(work: Path, sharded: bool, file: str, how: str) -> Outcome:
    """Damage one file of the newest checkpoint: resuming it must fail with one line naming the
    file and the checkpoint before it, which must still resume."""
    name = f"{how} {file} ({'sharded' if sharded else 'single'})"
    source = checkpoint_pair(work, sharded)
    run_dir = work / "damaged" / name.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(source, run_dir)
    older, newest = list_checkpoints(run_dir)
    damage(newest / file, how)
    config = write_config(run_dir.parent / f"{run_dir.name}.yaml", run_dir)
    resumed, stderr = _run_inline(["train", str(config), "train.steps=4", "--resume"])
    outcome = Outcome(name, ok=False, bad_inputs=1, tracebacks=int(resumed == "traceback"))
    problem = None if resumed == "traceback" else one_line_error(resumed, stderr)
    named = Path(file).name in stderr or newest.name in stderr
    points_back = older.name in stderr
    if problem or not named or not points_back:
        outcome.detail = problem or f"the error does not name {'the file' if not named else older.name}: {stderr.strip()}"
        return outcome
    trainer = Trainer(load_config(RunConfig, config, ["train.steps=4"]), resume=resolve_checkpoint(older))
    outcome.checkpoints_lost = int(trainer.step != 2)
    outcome.ok = not outcome.checkpoints_lost
    outcome.detail = stderr.strip().splitlines()[-1]
    return outcome


def _run_inline(argv: list[str], fault: str | None = None) -> tuple[int | str, str]:
    """``memlayers.cli.main(argv)`` in this process: (exit code, or "traceback" for an uncaught
    exception, or "ran" when an injected fault stopped a healthy run; captured stderr)."""
    stderr = io.StringIO()
    previous = os.environ.get(ENV)
    if fault:
        os.environ[ENV] = fault
    try:
        with contextlib.redirect_stderr(stderr):
            return main(argv), stderr.getvalue()
    except InjectedFault:
        return "ran", stderr.getvalue()
    except SystemExit as exit_:  # argparse's usage errors
        return exit_.code, stderr.getvalue()
    except BaseException:  # noqa: BLE001 - any other escape is what the suite counts
        return "traceback", stderr.getvalue()
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def bad_input(work: Path, name: str, argv: list[str]) -> Outcome:
    """Run ``memlayers ARGV`` (in this process) stopping after one training step: it must work
    or fail with one clear line, never a traceback."""
    rc, stderr = _run_inline(argv, fault="raise@step.end:step=1")
    outcome = Outcome(name, ok=False, bad_inputs=1, tracebacks=int(rc == "traceback"))
    if rc in ("ran", 0):
        outcome.ok, outcome.detail = True, "accepted"
    elif rc == "traceback":
        outcome.detail = "uncaught exception"
    else:
        problem = one_line_error(rc, stderr)
        outcome.ok = problem is None
        outcome.detail = problem or stderr.strip().splitlines()[-1]
    return outcome


def numeric_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """Every int and float key of the run config, dotted, with its type."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += numeric_keys(kind, f"{prefix}{f.name}.")
        elif kind in (int, float, int | None, float | None):
            keys.append((f"{prefix}{f.name}", int if kind in (int, int | None) else float))
    return keys


HUGE = {int: 10**12, float: 1e30}
BAD_FILES: dict[str, bytes] = {
    "empty.txt": b"",
    "binary.txt": bytes(range(256)) * 64,
    "latin-1.txt": "caf\xe9 au lait\n\nna\xefve\n".encode("latin-1"),
    "huge-line.txt": b"word " * 400_000,
    "missing-field.jsonl": b'{"body": "no text field"}\n',
    "malformed.jsonl": b'{"text": "ok"}\n{not json\n',
    "not-objects.jsonl": b"[1, 2]\n3\n",
    "qa-missing-answer.jsonl": b'{"question": "Who?"}\n',
    "qa-missing-question.jsonl": b'{"answer": "x"}\n',
    "qa-not-json.jsonl": b"question? answer\n",
    "qa-answer-not-a-string.jsonl": b'{"question": "Who?", "answer": 3}\n',
    "tokenizer-not-json.json": b"{",
    "tokenizer-foreign.json": b'{"vocab": 1}',
}
"""Files of bad input, written under ``<work>/inputs/``."""

BAD_OVERRIDES: dict[str, list[str]] = {
    **{f"train file: {n}": [f"data.train={{inputs}}/{n}"] for n in BAD_FILES if not n.startswith(("qa", "tok"))},
    "train file: qa-shaped": ["data.train={inputs}/qa-missing-answer.jsonl"],
    **{f"qa file: {n}": [f"data.qa={{inputs}}/{n}"] for n in BAD_FILES if n.startswith("qa") or n == "empty.txt"},
    **{f"tokenizer: {n}": [f"data.tokenizer={{inputs}}/{n}"] for n in BAD_FILES if n.startswith("tok")},
    "tokenizer: missing": ["data.tokenizer={inputs}/nope.json"],
    "train file: missing": ["data.train={inputs}/nope.txt"],
    "heldout file: missing": ["data.heldout={inputs}/nope.txt"],
    **{f"key: {o}": [o] for o in (
        "model.nope=1", "model.dim=abc", "train.steps=1.5", "optim.lr=fast", "train.schedule=zigzag",
        "model.memory_layers=[9]", "train=3", "model.memory.qk_norm=maybe", "data.facts.n_people=[1]", "nodots",
    )},
}
"""Named dotted overrides of the tiny run that feed it bad input (``{inputs}``: where BAD_FILES are)."""

BAD_YAML = {"unclosed": "model: [unclosed", "a list": "- a list\n- at the top", "bad indent": "model:\n  dim: 32\n dim: 3",
            "control bytes": "\x00\x01"}


def bad_input_cases() -> dict[str, list[str]]:
    """Every bad-input case by name: numeric keys at 0, -1 and huge, bad files, bad keys."""
    cases = {}
    for key, kind in numeric_keys():
        for number in (0, -1, HUGE[kind]):
            cases[f"{key}={number}"] = [f"{key}={number}"]
    return {**cases, **BAD_OVERRIDES, **{f"yaml: {name}": [] for name in BAD_YAML}}


def run_bad_input(work: Path, name: str) -> Outcome:
    """One case of :func:`bad_input_cases` in a fresh run directory under ``work``."""
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for file, content in BAD_FILES.items():
        if not (inputs / file).exists():
            (inputs / file).write_bytes(content)
    run_dir = work / "bad" / "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = write_config(run_dir / "run.yaml", run_dir / "run")
    if name.startswith("yaml: "):
        config.write_text(BAD_YAML[name.removeprefix("yaml: ")])
    overrides = [o.format(inputs=inputs) for o in bad_input_cases()[name]]
    return bad_input(work, name, ["train", str(config), *overrides, f"train.out_dir={run_dir / 'run'}", "train.eval_qa=2"])


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures of the reliability table."""
    return {
        "scenarios": len(outcomes),
        "passed": sum(o.ok for o in outcomes),
        "faults_injected": sum(o.faults for o in outcomes),
        "resumed_bit_exactly": sum(o.resumed_exactly for o in outcomes),
        "bad_inputs_tried": sum(o.bad_inputs for o in outcomes),
        "crashes": sum(o.crashes for o in outcomes),
        "tracebacks_shown": sum(o.tracebacks for o in outcomes),
        "checkpoints_lost": sum(o.checkpoints_lost for o in outcomes),
        "failures": [asdict(o) for o in outcomes if not o.ok],
    }


def scenarios(quick: bool = False) -> list[tuple[str, Any]]:
    """Every scenario of the suite as (group, callable taking the work directory)."""
    crash = [(p, 5) for p in STEP_POINTS] + [(p, 4) for p in CHECKPOINT_POINTS]
    sharded = [("step.start", 5)] + [(p, 4) for p in SHARDED_POINTS]
    runs: list[tuple[str, Any]] = [
        ("kill, 1 process", lambda w, p=p, s=s: crash_and_resume(w, p, s)) for p, s in crash
    ]
    for nproc, points in ((2, sharded), (4, sharded[1::2])):  # every phase on 2 ranks, every other on 4
        for point, step in points[: 2 if quick else None]:
            # rank 0 alone stages, commits and prunes a sharded checkpoint: its faults are rank 0's;
            # every rank steps and writes its shards: there the last rank dies
            rank = 0 if point.startswith("checkpoint.") and point not in EVERY_RANK_POINTS else nproc - 1
            runs.append((f"kill, {nproc} ranks",
                         lambda w, p=point, s=step, n=nproc, r=rank: crash_and_resume(w, p, s, nproc=n, rank=r)))
    runs.append(("hang, 2 ranks", lambda w: crash_and_resume(w, "step.start", 5, nproc=2, rank=1, action="hang")))
    for sharded_ in (False, True):
        files = ("state.json", "tokenizer.json", "shards/shard-00001-model-00001-of-00001.safetensors") if sharded_ \
            else CHECKPOINT_FILES
        for file in files:
            for how in ("flip", "truncate", "delete"):
                runs.append((f"damaged {'sharded' if sharded_ else 'single'} checkpoint",
                             lambda w, s=sharded_, f=file, h=how: damaged_checkpoint(w, s, f, h)))
    names = list(bad_input_cases())
    runs += [("bad input", lambda w, n=n: run_bad_input(w, n)) for n in (names[::10] if quick else names)]
    return runs


def run_reliability(work: Path, quick: bool = False) -> dict[str, Any]:
    """Run every scenario (a progress bar), return the figures per group and in all."""
    from tqdm import tqdm

    outcomes: dict[str, list[Outcome]] = {}
    for group, scenario in tqdm(scenarios(quick), unit="scenario", dynamic_ncols=True):
        start = time.perf_counter()
        try:
            outcome = scenario(work)
        except Exception as error:  # noqa: BLE001 - a scenario that breaks is a failed scenario
            outcome = Outcome(group, ok=False, detail=f"scenario raised {type(error).__name__}: {error}", crashes=1)
        outcome.extra["seconds"] = round(time.perf_counter() - start, 2)
        outcomes.setdefault(group, []).append(outcome)
    every = [o for group in outcomes.values() for o in group]
    return {"groups": {g: summarize(o) for g, o in outcomes.items()}, "total": summarize(every), "quick": quick}


def render_reliability(results: dict[str, Any]) -> str:
    """The results as a markdown table (one row per group, then the total)."""
    columns = ("scenarios", "passed", "faults_injected", "resumed_bit_exactly", "bad_inputs_tried", "crashes",
               "tracebacks_shown", "checkpoints_lost")
    lines = ["| scenario | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in [*results["groups"].items(), ("**total**", results["total"])]:
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
    for failure in results["total"]["failures"]:
        lines.append(f"\nFAILED {failure['scenario']}: {failure['detail']}")
    return "\n".join(lines)
