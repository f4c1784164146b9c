"""What a new user meets first: ``--version``, the device picker's errors, and every
failure of a command ending in one line (no traceback) with the documented exit code."""

import os
import signal
from importlib.metadata import version

import pytest
import torch

from memlayers.cli import main
from memlayers.config import ConfigError
from memlayers.device import pick_device
from memlayers.distributed.comm import collective


def one_line(capsys: pytest.CaptureFixture) -> str:
    """The single line a failed command wrote to stderr (fails on a traceback or more lines)."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"memlayers {version('memlayers')}"


def test_pick_device_takes_auto_cpu_and_cuda_devices_that_exist(no_cuda, monkeypatch):
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1", "--device") == torch.device("cuda:1")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_pick_device_names_its_key_when_cuda_is_missing(no_cuda, name):
    for key in ("train.device", "--device", "device"):
        with pytest.raises(ConfigError) as error:
            pick_device(name, key)
        assert str(error.value) == f"{key}: {name} asked for, but no CUDA device is available; use cpu"
    with pytest.raises(ConfigError, match=r"^train\.device: "):  # the trainer's key by default
        pick_device(name)


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:x", "cuda:-1", "", "mps", "meta"])
def test_pick_device_refuses_names_that_are_not_devices(name):
    with pytest.raises(ConfigError) as error:
        pick_device(name, "--device")
    assert str(error.value) == f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N"


def test_pick_device_refuses_a_cuda_index_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^--device: cuda:2 asked for, but this machine has 2 CUDA device\(s\); "
                                          r"use cuda:0 to cuda:1$"):
        pick_device("cuda:2", "--device")


@pytest.mark.parametrize("command", [
    ["eval", "runs/none", "--qa", "qa.jsonl", "--device", "cuda"],
    ["generate", "runs/none", "--prompt", "Hi", "--device", "cuda"],
])
def test_eval_and_generate_blame_their_own_device_option(no_cuda, capsys, command):
    assert main(command) == 2
    line = one_line(capsys)
    assert line == "memlayers: config error: --device: cuda asked for, but no CUDA device is available; use cpu"


def test_a_lost_peer_is_one_distributed_error_line(monkeypatch, capsys):
    def lost(args):
        with collective("memory-parallel gather"):  # what every collective turns a backend error into
            raise RuntimeError("Connection closed by peer\nException raised from recvBytes")

    monkeypatch.setattr("memlayers.cli.cmd_info", lost)
    assert main(["info", "tiny"]) == 2
    assert one_line(capsys).startswith("memlayers: distributed error: memory-parallel gather: ")


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("memlayers.cli.cmd_info", interrupted)
    assert main(["info", "tiny"]) == 130
    assert one_line(capsys) == "memlayers: interrupted"


def test_sigterm_is_one_line_and_exit_code_143(monkeypatch, capsys):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` sends it; Python handles it before the next line
        return 0

    def outside(signum, frame):
        raise AssertionError("SIGTERM reached the handler outside main()")

    monkeypatch.setattr("memlayers.cli.cmd_info", terminated)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        assert main(["info", "tiny"]) == 143
        assert signal.getsignal(signal.SIGTERM) is outside  # main() put the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert one_line(capsys) == "memlayers: interrupted"


def test_other_errors_are_not_hidden(monkeypatch):
    """Only the input's problems become one line: a bug keeps its traceback."""

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("memlayers.cli.cmd_info", bug)
    with pytest.raises(ZeroDivisionError):
        main(["info", "tiny"])


@pytest.mark.parametrize(("command", "says"), [
    (["demo", "--claims", "--seeds", "3"], "--claims takes its seeds from the claims preset"),
    (["demo", "--tune", "--seeds", "2"], "--tune trains tune.seeds seeds per trial"),
    (["demo", "--continual", "--seeds", "2"], "--continual takes its seeds from its preset"),
    (["demo", "--quick", "--seeds", "0"], "seeds: must be in [1, 100]"),
    (["demo", "--ablations", "configs/demo_ablations.yaml", "--tune"], "--tune does not apply to --ablations"),
    (["demo", "--ablations", "configs/demo_ablations.yaml", "--seeds", "0"], "seeds: must be in [1, 100]"),
    (["demo", "--tune", "--quick", "tune.refine_trials=9"], "tune.refine_trials: must be >= 0 and < lr_trials"),
    (["demo", "--quick", "lrs.dense.value_lr=0.1"], "lrs.dense.value_lr: dense has the learning rates ['lr']"),
    (["demo", "--claims", "--quick", "seeds=2"], "seeds: a claims run trains 3 seeds"),  # never ignored
])
def test_demo_modes_refuse_what_does_not_apply_before_training(capsys, tmp_path, command, says):
    assert main([*command, "--out", str(tmp_path / "out")]) == 2
    assert says in one_line(capsys)
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained
