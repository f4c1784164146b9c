"""SIGINT/SIGTERM and failing runs: no process is left behind, no checkpoint is half-written, one line is shown.

Every command runs with a unique ``MEMLAYERS_TEST_TAG`` in its environment,
which its children inherit: a process still carrying the tag after the
command has exited is an orphan. Signals are sent at a known point (a metrics
line or a checkpoint on disk, a pid printed by a child), and the assertions
hold wherever exactly the signal lands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from memlayers.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from test_demo import TOY  # noqa: E402

from conftest import build_config, tiny_config_dict  # noqa: E402

TAG = "MEMLAYERS_TEST_TAG"
RESOURCE_TRACKER = "from multiprocessing.resource_tracker import main"
NEVER_ENDS = "train.steps=100000"
"""More steps than a test waits for: the signal always lands while training."""


def tagged_processes(tag: str) -> dict[int, str]:
    """The live processes started with ``MEMLAYERS_TEST_TAG=tag`` in their environment: pid -> command line."""
    needle = f"{TAG}={tag}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for a zombie: it is not running
            if needle in environ.split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not ours
    return found


class Command:
    """A command in its own session (as a shell runs a job), tagged, its output in files."""

    def __init__(self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        env = {**os.environ, TAG: self.tag, "OMP_NUM_THREADS": "1", **(env or {})}
        env.pop("TRITON_INTERPRET", None)
        self.stdout_path, self.stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(args, stdout=out, stderr=err, env=env, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` (a file or a line appearing); fail if the command ends first."""
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not ready():
            if self.process.poll() is not None:
                pytest.fail(f"ended (exit {self.process.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill_all()
                pytest.fail(f"never reached: {what}")
            time.sleep(0.1)

    def finish(self) -> int:
        """Wait for the command to exit; its exit status."""
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"did not stop:\n{self.stderr[-3000:]}")

    def orphans(self) -> list[str]:
        """Command lines of the tagged processes alive after the command exited (killed here: none leaks)."""
        left = tagged_processes(self.tag)
        # multiprocessing's resource tracker ends by itself a moment after the last process holding
        # its pipe (the command) has exited: wait for that. Any other process is reported at once.
        deadline = time.monotonic() + 60
        while left and all(RESOURCE_TRACKER in line for line in left.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            left = tagged_processes(self.tag)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return list(left.values())

    def kill_all(self) -> None:
        self.process.kill()
        self.process.wait()
        self.orphans()


def tracebacks(stderr: str) -> list[str]:
    """The Python tracebacks in ``stderr``, but for the torchrun launcher's report of the signal it got."""
    blocks = stderr.split("Traceback (most recent call last):")[1:]
    return [block for block in blocks if "elastic.multiprocessing.api.SignalException: Process" not in block]


def metrics_lines(run_dir: Path) -> int:
    """Number of loss lines in a run's metrics.jsonl (0 before it exists)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def send(command: Command, signum: int) -> None:
    """SIGINT as a terminal's Ctrl-C sends it (to the whole process group); SIGTERM as `kill PID` does."""
    if signum == signal.SIGINT:
        os.killpg(command.process.pid, signum)
    else:
        command.process.send_signal(signum)


def assert_stopped_cleanly(command: Command, signum: int, run_dir: Path | None = None) -> None:
    """No process left and (for a training run) only complete checkpoints; then
    exit 128 + signal, one line saying so and no traceback."""
    code = command.finish()
    assert command.orphans() == []
    if run_dir is not None:
        assert_checkpoints_complete(run_dir)
    assert tracebacks(command.stderr) == []
    assert command.stderr.rstrip().endswith("memlayers: interrupted")
    assert code == 128 + signum


# ---------------------------------------------------------------- memlayers.procs.run_all

JOBS = textwrap.dedent(
    '''
    """Two jobs: one waits to be stopped, the other ends as argv[1] says once the first is up."""
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    from memlayers.procs import run_all
    from memlayers.train.trainer import TrainingError


    def job(mode, flag, send):
        send(os.getpid())
        if mode == "wait":
            Path(flag).touch()
            signal.pause()  # until the parent stops us
        while not Path(flag).exists():
            time.sleep(0.01)
        if mode == "raise":
            raise ValueError("boom")
        os.kill(os.getpid(), signal.SIGKILL)


    if __name__ == "__main__":
        flag = sys.argv[2]
        try:
            run_all(job, [("waiter", ("wait", flag)), ("bad", (sys.argv[1], flag))], 2,
                    lambda name, pid: print(name, pid, flush=True))
        except TrainingError as error:
            print(error, file=sys.stderr)
            sys.exit(2)
    '''
)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("raise", "run 'bad' failed: ValueError: boom (at jobs.py:"),
        ("die", "run 'bad' failed: its process was killed by SIGKILL"),
    ],
)
def test_a_failing_job_stops_the_others_and_is_named(tmp_path, mode, message):
    script = tmp_path / "jobs.py"
    script.write_text(JOBS)
    command = Command([sys.executable, str(script), mode, str(tmp_path / "waiter_is_up")], tmp_path)
    assert command.finish() == 2
    assert command.orphans() == []
    assert command.stderr.startswith(message) and len(command.stderr.splitlines()) == 1, command.stderr
    assert "Traceback" not in command.stderr
    # both were running when "bad" failed: the waiter was stopped, not just never started
    assert {line.split()[0] for line in command.stdout.splitlines()} == {"waiter", "bad"}


NATIVE = textwrap.dedent(
    '''
    """A job stopped while native code is calling it back: SIGTERM lands inside a ctypes callback of qsort."""
    import ctypes
    import multiprocessing
    import os
    import signal
    import sys

    from memlayers.procs import run_all
    from memlayers.train.trainer import TrainingError


    def job(send):
        lock = multiprocessing.get_context("spawn").Lock()  # a semaphore the job holds, as tqdm's
        compare_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))

        def compare(a, b):
            os.kill(os.getpid(), signal.SIGTERM)  # what the parent's terminate() does, at a known point
            return a[0] - b[0]

        values = (ctypes.c_int * 4)(3, 1, 2, 0)
        ctypes.CDLL(None).qsort(values, 4, ctypes.sizeof(ctypes.c_int), compare_type(compare))
        return f"survived {lock}"


    if __name__ == "__main__":
        try:
            print(run_all(job, [("native", ())], 1))
        except TrainingError as error:
            print(error, file=sys.stderr)
            sys.exit(2)
    '''
)


@pytest.mark.multiprocess
def test_sigterm_inside_native_code_ends_the_job_at_once(tmp_path):
    """An exception raised in Python code that native code called does not unwind through it (ctypes
    prints and swallows it; a C++ extension's initialisation aborts): the job exits from the handler."""
    script = tmp_path / "native.py"
    script.write_text(NATIVE)
    command = Command([sys.executable, str(script)], tmp_path)
    assert command.finish() == 2
    assert command.orphans() == []
    assert tracebacks(command.stderr) == [], command.stderr
    assert "leaked" not in command.stderr  # the resource tracker found the job's semaphore released
    assert command.stderr.strip() == "run 'native' failed: its process exited with code 143 without a result"


STARTING = textwrap.dedent(
    '''
    """A job whose process gets SIGINT while it is still starting (importing the main module)."""
    import os
    import sys
    import time

    if __name__ == "__mp_main__":
        print("child", os.getpid(), flush=True)
        time.sleep(60)  # the signal lands here; the parent stops us long before this ends

    from memlayers.procs import Interrupted, run_all


    def job(send):
        return 0


    if __name__ == "__main__":
        try:
            run_all(job, [("slow", ())], 1)
        except Interrupted:
            print("interrupted", file=sys.stderr)
            sys.exit(143)
    '''
)


@pytest.mark.multiprocess
def test_a_job_process_ignores_ctrl_c_while_it_starts(tmp_path):
    """Ctrl-C reaches a job's process too: one still importing must not die of KeyboardInterrupt with
    a traceback (the parent alone answers the signal, by stopping its jobs)."""
    script = tmp_path / "starting.py"
    script.write_text(STARTING)
    command = Command([sys.executable, str(script)], tmp_path)
    command.wait_until(lambda: "child" in command.stdout, "the job's process importing")
    child = int(command.stdout.split()[1])
    os.kill(child, signal.SIGINT)  # the child alone: the parent must not be what stops it first
    time.sleep(1.0)  # the child's KeyboardInterrupt, had it one, is written by now (not needed to pass)
    command.process.send_signal(signal.SIGTERM)  # then the parent stops it
    assert command.finish() == 143
    assert command.orphans() == []
    assert tracebacks(command.stderr) == [], command.stderr
    assert command.stderr.strip() == "interrupted"


# ---------------------------------------------------------------- memlayers demo

@pytest.mark.multiprocess
@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_its_workers(tmp_path):
    out = tmp_path / "demo"
    command = Command([sys.executable, "-m", "memlayers.cli", "demo", "--quick", "--out", str(out), *TOY, NEVER_ENDS],
                      tmp_path)
    # both workers are training
    command.wait_until(lambda: sum(metrics_lines(run) > 0 for run in out.glob("runs/*/seed*")) == 2, "two runs logged")
    send(command, signal.SIGINT)
    assert_stopped_cleanly(command, signal.SIGINT)


def ablation_file(tmp_path: Path, variants: list[dict]) -> Path:
    """A toy ablation file (the demo test's TOY world) with ``variants``."""
    path = tmp_path / "ablations.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo_quick", "demo_overrides": TOY, "variants": variants}))
    return path


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_stops_the_ablations_and_their_workers(tmp_path):
    variants = [{"name": "a", "run": "dense"}, {"name": "b", "run": "memory-32x32"}]
    out = tmp_path / "ablations"
    command = Command([sys.executable, "-m", "memlayers.cli", "demo", "--ablations", str(ablation_file(tmp_path, variants)),
                       "--out", str(out), NEVER_ENDS], tmp_path)
    command.wait_until(lambda: metrics_lines(out / "runs" / "a" / "seed0") > 0 and metrics_lines(out / "runs" / "b" / "seed0") > 0,
                       "both variants logged")
    send(command, signal.SIGTERM)
    assert_stopped_cleanly(command, signal.SIGTERM)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_failing_variant_stops_the_others_and_is_named(tmp_path):
    variants = [
        {"name": "good", "run": "dense"},
        {"name": "broken", "run": "dense", "overrides": [f"data.qa={tmp_path / 'missing.jsonl'}"]},
    ]
    command = Command([sys.executable, "-m", "memlayers.cli", "demo", "--ablations", str(ablation_file(tmp_path, variants)),
                       "--out", str(tmp_path / "ablations"), "workers=2", NEVER_ENDS], tmp_path)
    assert command.finish() == 2
    assert command.orphans() == []
    assert tracebacks(command.stderr) == [], command.stderr
    last = command.stderr.rstrip().splitlines()[-1]
    assert last.startswith("memlayers: training stopped: run 'broken' failed: ") and "missing.jsonl" in last, last


# ---------------------------------------------------------------- memlayers train, one process and torchrun

SETTINGS = [NEVER_ENDS, "train.checkpoint_every=1", "train.keep_last=2", "train.eval_qa=2"]
STALL = {"MEMLAYERS_FAULT": "hang@checkpoint.rename:step=2:rank=0"}
"""Rank 0 stalls with checkpoint 2 written but not renamed: the run never gets past it, and the
signal lands once rank 0 says it is there (a known point), with step_00000001 the last complete
checkpoint."""


def train_command(tmp_path: Path, nproc: int) -> tuple[Command, Path]:
    """``memlayers train`` (under torchrun for ``nproc`` > 1) of the tiny config, stalling at ``STALL``."""
    run_dir = tmp_path / "run"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(run_dir)))
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = Command([*launcher, "-m", "memlayers.cli", "train", str(config_file), *SETTINGS], tmp_path, STALL)
    command.wait_until(lambda: (run_dir / "checkpoints" / "step_00000001" / "state.json").exists()
                       and "hanging at checkpoint.rename" in command.stderr, "rank 0 stalled in checkpoint 2")
    return command, run_dir


def assert_checkpoints_complete(run_dir: Path, nproc: int = 1) -> None:
    """step_00000001 alone is visible (2 was never renamed into place) and resumes at step 1
    (in one process, on the same global batch)."""
    visible = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert visible == ["step_00000001"]
    batch = tiny_config_dict(run_dir)["train"]["batch_size"] * nproc
    config = build_config(run_dir, [*SETTINGS, f"train.batch_size={batch}"])
    assert Trainer(config, resume=run_dir / "checkpoints" / "step_00000001").step == 1


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, signal.SIGTERM],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_stops_train_with_its_checkpoints_complete(tmp_path, signum):
    command, run_dir = train_command(tmp_path, nproc=1)
    send(command, signum)
    assert_stopped_cleanly(command, signum, run_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, signal.SIGTERM],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_to_torchrun_leaves_no_worker_and_complete_checkpoints(tmp_path, signum):
    command, run_dir = train_command(tmp_path, nproc=2)
    command.process.send_signal(signum)  # the launcher alone: it signals its workers
    code = command.finish()
    assert command.orphans() == []
    assert_checkpoints_complete(run_dir, nproc=2)
    assert tracebacks(command.stderr) == []  # the launcher reports its own signal with one; the workers none
    assert code != 0
