"""Building and loading the C kernels: cache, fallback without a compiler, their threads."""

import ctypes
from contextlib import contextmanager

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


needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C compiler")


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_the_kernels_run_on_torchs_openmp_threads():
    if cpu.library().max_threads() == 0:
        pytest.skip("the kernels were built without OpenMP (they run in the calling thread)")
    for n in (1, 3, 2):  # torch.set_num_threads sets the team of the OpenMP runtime the kernels share
        with torch_threads(n):
            assert cpu.library().max_threads() == n


@needs_kernels
def test_without_openmp_the_kernels_build_and_run_in_the_calling_thread(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu, "OPTIONAL", (["-march=native"], []))  # as where -fopenmp does not link
    lib = cpu.library()
    assert lib is not None and lib.max_threads() == 0
    table, ids, weights = torch.randn(20, 5), torch.randint(0, 20, (12,)), torch.randn(12)
    offsets, out = torch.arange(5) * 3, torch.full((4, 5), float("nan"))
    with torch_threads(2):
        cpu.run(cpu.kernel("bag", torch.float32), 4, cpu.ptr(table), 5, cpu.ptr(ids), cpu.ptr(weights),
                cpu.ptr(offsets), cpu.ptr(out), grain=1)
    torch.testing.assert_close(out, (table[ids] * weights[:, None]).view(4, 3, 5).sum(1))


@needs_kernels
@pytest.mark.parametrize("total", [0, 1, 255, 1000, 4097])
def test_a_kernel_covers_its_range_once_whatever_the_threads(total):
    g = torch.Generator().manual_seed(total)
    table, K = torch.randn(50, 8, generator=g), 3
    ids, weights = torch.randint(0, 50, (total * K,), generator=g), torch.randn(total * K, generator=g)
    offsets = torch.arange(total + 1) * K
    expected = (table[ids] * weights[:, None]).view(total, K, 8).sum(1)  # (total, 8)
    for n in (1, 2, 3):
        out = torch.full((total, 8), float("nan"))  # a bag no thread wrote stays NaN
        with torch_threads(n):
            cpu.run(cpu.kernel("bag", torch.float32), total, cpu.ptr(table), 8, cpu.ptr(ids), cpu.ptr(weights),
                    cpu.ptr(offsets), cpu.ptr(out), grain=100)
        torch.testing.assert_close(out, expected)
