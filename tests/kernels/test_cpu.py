"""Building and loading the C kernels: cache, fallback without a compiler, thread splitting."""

import ctypes
import threading

import pytest
import torch

from memlayers.kernels import cpu


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A library() that has not run yet and caches into tmp_path."""
    monkeypatch.setenv("MEMLAYERS_CACHE", str(tmp_path))
    monkeypatch.delenv("MEMLAYERS_NO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_library", None)
    return tmp_path


@pytest.mark.skipif(not cpu.available(), reason="no C compiler")
def test_builds_once_into_the_cache_and_exports_every_kernel(fresh_build):
    lib = cpu.library()
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left behind
    for name in ("bag_f32", "bag_bf16", "bag_dot_f32", "row_grad_sq_norm", "sgd_bf16", "adagrad_f32", "adam_bf16_f32"):
        assert isinstance(getattr(lib, name), ctypes._CFuncPtr)
    mtime = built[0].stat().st_mtime_ns
    cpu._tried = False  # a new process finds the cached build instead of compiling again
    assert cpu.library() is not None and built[0].stat().st_mtime_ns == mtime
    with pytest.raises(TypeError, match="unsupported dtype"):
        cpu.kernel("bag", torch.float64)


def test_without_a_compiler_it_warns_and_falls_back(fresh_build, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C compiler found"):
        assert cpu.library() is None
    assert not cpu.available()
    assert list(fresh_build.iterdir()) == []
    with pytest.raises(RuntimeError, match="not available"):
        cpu.kernel("bag", torch.float32)


def test_a_broken_compiler_warns_and_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build the CPU memory kernels"):
        assert cpu.library() is None


@pytest.mark.parametrize("total", [0, 1, 255, 1000, 4097])
def test_parallel_for_covers_the_range_once(total, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    seen, lock = [], threading.Lock()

    def record(tag, start, stop):
        with lock:
            seen.append((start, stop))
        return tag

    results = cpu.parallel_for(record, total, "x", grain=100)
    covered = sorted(i for start, stop in seen for i in range(start, stop))
    assert covered == list(range(total))
    assert len(seen) == min(3, max(1, total // 100)) if total else seen == []
    assert results == ["x"] * len(seen)
