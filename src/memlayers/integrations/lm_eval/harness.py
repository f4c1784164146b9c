"""What memlayers adds to lm-evaluation-harness: its local task and its command line.

The task ``memlayers_fact_qa`` (``tasks/memlayers_fact_qa/memlayers_fact_qa.yaml``)
asks the questions of the demo's fact world and scores them exactly as
``memlayers eval --qa`` does; its loader, prompt and metric are the functions
below, which the YAML names with ``!function``, so the question file is found
from any working directory.

lm-eval's command line finds neither third-party models nor tasks outside its
own folder by itself (it has no plugin entry points), so :func:`run_harness`
(``memlayers lm-eval ARGS``) registers the ``memlayers`` model, points
``--include_path`` at this package's tasks and then runs lm-eval's own command
line on ``ARGS``::

    memlayers lm-eval --model memlayers --model_args checkpoint=runs/tiny \\
        --tasks memlayers_fact_qa --batch_size 16 --output_path results/
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from memlayers.config import ConfigError
from memlayers.data.text import qa_prompt, read_qa
from memlayers.eval.qa import exact_match

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""The folder of memlayers' lm-eval tasks (what ``--include_path`` gets)."""

TASK_NAME = "memlayers_fact_qa"
"""The fact QA task of the demo world."""

QA_FILE = TASKS_DIR / TASK_NAME / "qa.jsonl"
"""The demo's 1,400 question/answer pairs (the task YAML says how they were made)."""

_COMMANDS = ("run", "ls", "validate")
"""lm-eval's subcommands; each takes ``--include_path``."""

_LIST_TASKS = "`memlayers lm-eval ls tasks` lists them"

_KNOWN_ERRORS = (
    (re.compile(r"Tasks not found: (.+)"), "--tasks", "unknown task(s) {}; " + _LIST_TASKS),
    (re.compile(r"No tasks specified"), "--tasks", "no task given; pass --tasks NAME (" + _LIST_TASKS + ")"),
    (re.compile(r"Attempted to load model '(.+?)'"), "--model",
     "unknown model {!r}; use --model memlayers --model_args checkpoint=PATH, "
     "or --model hf --model_args pretrained=DIR for a directory of `memlayers export`"),
)
"""lm-eval's ``ValueError`` messages for input a user easily gets wrong, each with
the option to blame and memlayers' one line (``{}`` is the message's group)."""

_SHARED_OPTIONS = ("device", "batch_size")
"""Model arguments lm-eval's command line passes to every model from its own options."""


def load_fact_qa(qa_file: str | None = None, **_task_metadata: Any) -> Any:
    """The task's question/answer pairs as a ``test`` split: :data:`QA_FILE`, or ``qa_file``.

    lm-eval calls this with the task's metadata as keyword arguments (its
    ``--metadata``, the model arguments, the task version...); only
    ``qa_file`` is used: a ``.jsonl`` file with string ``question`` and
    ``answer`` fields (a relative path is relative to the working directory),
    e.g. ``--metadata '{"qa_file": "runs/tiny/data/qa.jsonl"}'``. A missing or
    malformed file raises memlayers' one-line :class:`~memlayers.data.text.DataError`.
    """
    import datasets

    pairs = read_qa(QA_FILE if qa_file is None else Path(qa_file))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(pairs)})


def doc_to_text(doc: dict[str, Any]) -> str:
    """The task's prompt, the one of ``memlayers eval --qa``: ``qa_prompt(question)``."""
    return qa_prompt(doc["question"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The task's metric: exact match of the generation cut at its first newline and
    stripped, as in :func:`memlayers.eval.qa.evaluate_qa`."""
    prediction = results[0].split("\n", 1)[0].strip()
    return {"exact_match": float(exact_match(prediction, doc["answer"]))}


def _has_option(argv: list[str], name: str) -> bool:
    """Whether ``argv`` sets option ``name`` (as ``name VALUE`` or ``name=VALUE``)."""
    return any(arg == name or arg.startswith(name + "=") for arg in argv)


def harness_argv(argv: list[str]) -> list[str]:
    """``argv`` for lm-eval's command line with memlayers' tasks folder (and default device) added.

    ``--include_path TASKS_DIR`` goes to every command that takes it (``run``,
    written out or implied as lm-eval implies it, ``ls`` and ``validate``).
    ``run`` also gets ``--device auto`` unless ``--device`` or ``--config`` is
    given: lm-eval's own default, ``cuda:0``, fails on a machine without a GPU.
    Arguments that only print help are passed through unchanged. Raises
    :class:`ConfigError` if ``argv`` sets ``--include_path`` itself (lm-eval
    takes one folder); a task YAML of your own can be given by its path in
    ``--tasks`` instead.
    """
    argv = list(argv)
    if _has_option(argv, "--include_path"):
        raise ConfigError(
            "--include_path",
            f"memlayers sets it to its own tasks ({TASKS_DIR}); "
            "give your task's YAML file in --tasks instead (e.g. --tasks my_tasks/task.yaml)",
        )
    if argv and argv[0] in _COMMANDS:
        command = argv[0]
    else:  # lm-eval inserts `run` before two or more arguments without a command
        command = "run" if len(argv) >= 2 else None
    if command is None or argv == ["run"]:
        return argv
    extra = ["--include_path", str(TASKS_DIR)]
    if command == "run" and not (_has_option(argv, "--device") or _has_option(argv, "--config")):
        extra += ["--device", "auto"]
    return argv + extra


def _exit_code(code: Any) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter would make it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _check_model_args(model_args: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for a model argument lm-eval's command line also
    passes from its own option (the model would get it twice and fail)."""
    for key in _SHARED_OPTIONS:
        if key in model_args:
            raise ConfigError(
                "--model_args",
                f"{key}={model_args[key]} clashes with lm-eval's own --{key}, which it passes to every model; "
                f"give --{key} {model_args[key]} instead",
            )


def _known_error(error: ValueError) -> ConfigError | None:
    """memlayers' one-line :class:`ConfigError` for an lm-eval error in :data:`_KNOWN_ERRORS`, else None."""
    for pattern, key, message in _KNOWN_ERRORS:
        match = pattern.search(str(error))
        if match:
            return ConfigError(key, message.format(*match.groups()))
    return None


def run_harness(argv: list[str]) -> int:
    """Run lm-eval's command line in this process on ``argv``, as ``lm_eval ARGV`` would; returns its exit status.

    The ``memlayers`` model is registered (and memlayers' transformers
    classes, for ``--model hf --model_args pretrained=EXPORTED_DIR``) and
    ``argv`` goes through :func:`harness_argv` first. lm-eval reads ``sys.argv``, which is set for
    the call and restored afterwards. An unknown task or model, no task, or
    ``device``/``batch_size`` in ``--model_args`` raise :class:`ConfigError`;
    errors of memlayers (a bad checkpoint, a bad question file) propagate as
    their exceptions.
    """
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import memlayers.integrations.hf  # noqa: F401  (lm-eval's `hf` model can then load exported directories)
    import memlayers.integrations.lm_eval.model  # noqa: F401  (registers the model)

    saved = sys.argv
    sys.argv = ["lm_eval", *harness_argv(argv)]
    try:  # what lm-eval's own entry point (lm_eval.__main__.cli_evaluate) does, with a check between
        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
        _check_model_args(getattr(args, "model_args", None) or {})
        cli.execute(args)
    except SystemExit as exit_:
        return _exit_code(exit_.code)
    except ValueError as error:
        known = _known_error(error)
        if known is None:
            raise
        raise known from None
    finally:
        sys.argv = saved
    return 0
