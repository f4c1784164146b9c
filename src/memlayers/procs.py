"""Child processes that never outlive their command, and commands that stop cleanly on a signal.

``run_all`` runs jobs in spawned processes, a few at a time. Whatever ends it
(every job done, a job that fails, SIGINT or SIGTERM of the parent), its
children are terminated, killed after a grace period if they linger, and
reaped before it returns or raises: no process is left behind. A failed job
is named in the ``TrainingError`` it raises.

``interruptible`` turns SIGINT and SIGTERM into ``Interrupted`` (a
``KeyboardInterrupt``), so ``finally`` clauses run on ``kill`` as they do on
Ctrl-C, and a command can end with one line and the conventional exit status
(128 + the signal: 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from memlayers.host_memory import keep_freed_memory
from memlayers.train.trainer import TrainingError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived inside ``interruptible()``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a command ended by a signal: 128 + its number."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def _handlers(handlers: dict[int, Any]) -> Iterator[None]:
    """Signal number -> handler inside the block, the previous handlers after. Only the main
    thread can set handlers; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interruptible() -> AbstractContextManager[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block (the previous handlers come back after).

    Only the main thread can take signals; elsewhere the block changes nothing.
    """
    return _handlers(dict.fromkeys(STOP_SIGNALS, _raise_interrupted))


@contextmanager
def _held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is over: what it does is not cut half-way."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _children_ignore_ctrl_c() -> AbstractContextManager[None]:
    """Processes started in the block begin with SIGINT ignored (exec keeps an ignored signal, and
    Python then installs no KeyboardInterrupt handler): a Ctrl-C to the group while one is still
    importing would otherwise kill it with a traceback. Inside ``_held_signals``, a SIGINT to this
    process meanwhile stays pending and reaches the handler restored after."""
    return _handlers({signal.SIGINT: signal.SIG_IGN})


def _exit_on_signal(signum: int, frame: Any) -> None:
    """End a job's process from the handler: multiprocessing's exit handlers (which release what
    the job holds: tqdm's semaphore, ...), flushed output, exit status 128 + the signal. Not by
    raising SystemExit: the handler runs wherever the main thread is, and an exception raised in
    Python code that native code called does not unwind through it (a ctypes callback prints and
    swallows it; triton's nanobind module, mid-import, aborted the process with a traceback)."""
    multiprocessing.util._exit_function()  # what a job's process runs when it ends by itself
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _child(fn: Callable[..., Any], args: tuple, conn: Connection) -> None:
    """A job's process: ``fn(*args, send)``, then its result or its error on ``conn``."""
    # Ctrl-C in a terminal reaches the whole process group: the parent alone answers it, by
    # terminating its children (we started with SIGINT ignored). SIGTERM ends us through
    # _exit_on_signal; until now its default action did, at once (Python 3.11 starts us with no
    # signal blocked; where the parent's hold carries over, the unblocking below delivers a SIGTERM
    # that came meanwhile).
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        report = ("result", fn(*args, lambda payload: conn.send(("message", payload))))
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        report = ("error", f"{type(error).__name__}: {error} (at {Path(where.filename).name}:{where.lineno})")
    # the job is over and the process ends by itself: a SIGTERM from a parent that stops the
    # others now must not raise in the middle of the interpreter's shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send(report)


def _how_it_ended(exitcode: int) -> str:
    """'its process was killed by SIGKILL' or 'its process exited with code 3 without a result'."""
    if exitcode < 0:
        return f"its process was killed by {signal.Signals(-exitcode).name}"
    return f"its process exited with code {exitcode} without a result"


def _stop(processes: Sequence[multiprocessing.process.BaseProcess], grace_s: float) -> None:
    """Terminate ``processes``, kill those still alive after ``grace_s`` seconds, and reap them all."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.exitcode is None:
            process.kill()
            process.join()


def run_all(
    fn: Callable[..., Any],
    jobs: Sequence[tuple[str, tuple]],
    workers: int,
    on_message: Callable[[str, Any], None] = lambda name, payload: None,
    grace_s: float = 10.0,
) -> list[Any]:
    """Run ``fn(*args, send)`` for each ``(name, args)`` of ``jobs``, ``workers`` processes at a time.

    ``fn`` must be importable (a module-level function: processes are spawned)
    and may call ``send(payload)`` to hand ``on_message(name, payload)`` a
    progress report. Returns the results in the order of ``jobs``. The first job that
    fails (an exception, or a process that dies) stops the others and raises a
    ``TrainingError`` naming it; SIGINT or SIGTERM stop them all and raise
    ``Interrupted``.
    """
    context = multiprocessing.get_context("spawn")
    waiting = list(enumerate(jobs))[::-1]  # popped from the end: jobs start in order
    running: dict[Connection, tuple[int, multiprocessing.process.BaseProcess]] = {}
    results: dict[int, Any] = {}
    with interruptible():
        try:
            while waiting or running:
                while waiting and len(running) < workers:
                    index, (name, args) = waiting.pop()
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(target=_child, args=(fn, args, writer), name=name)
                    # a signal now would leave a started child unrecorded
                    with _held_signals(), _children_ignore_ctrl_c():
                        process.start()
                        running[reader] = (index, process)
                    writer.close()  # the child holds the only writer: its exit is our end of file
                for reader in wait(list(running)):
                    index, process = running[reader]
                    try:
                        kind, payload = reader.recv()
                    except EOFError:
                        del running[reader]
                        reader.close()
                        process.join()
                        if index not in results:
                            raise TrainingError(f"run {process.name!r} failed: {_how_it_ended(process.exitcode)}") from None
                        continue
                    if kind == "message":
                        on_message(process.name, payload)
                    elif kind == "result":
                        results[index] = payload
                    else:
                        raise TrainingError(f"run {process.name!r} failed: {payload}")
        finally:
            with _held_signals():
                _stop([process for _, process in running.values()], grace_s)
                for reader in running:
                    reader.close()
    return [results[index] for index in range(len(jobs))]
