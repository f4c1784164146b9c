"""Memory parallelism and FSDP2 on CPU processes (gloo), started through the real torchrun.

Each run checks, on every rank, a memory layer's outputs and gradients and a
few training steps of a small model against the single-process computation
on the whole batch (see worker_memory_parallel.py).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker_memory_parallel.py")
TOL = 2e-5


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("nproc", "memory_parallel", "table_grad", "variant"),
    [(2, 2, "dense", "plus"), (2, 2, "rows", "plus"), (4, 2, "rows", "plus"), (4, 4, "dense", "plus"),
     (2, 1, "rows", "plus"), (2, 2, "dense", "peer"), (4, 2, "rows", "peer")],
    ids=["2ranks-mp2-dense", "2ranks-mp2-rows", "4ranks-mp2xdp2-rows", "4ranks-mp4-dense", "2ranks-dp2-rows",
         "2ranks-mp2-dense-peer", "4ranks-mp2xdp2-rows-peer"],
)
def test_matches_one_process(tmp_path, nproc, memory_parallel, table_grad, variant):
    run = torchrun(nproc, str(tmp_path), str(memory_parallel), table_grad, variant)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for result in results:
        layer = result["layer"]
        expected = {"out", "table_grad", "grad/search.query_proj.weight", "grad/search.keys"}
        expected |= {"table_grad/up"} if variant == "peer" else {"grad/w1.weight"}
        assert set(layer) >= expected
        for key, diff in layer.items():
            assert diff < TOL, (result["rank"], key, diff)
        for distributed, single in result["training"]["losses"]:
            assert abs(distributed - single) < 1e-5, result["training"]["losses"]
        # AdamW at lr 1e-2 moves each weight up to 1e-2 a step whatever the gradient's size, so the
        # rounding of differently ordered sums in a near-zero gradient can show as ~1e-5 (it did, on one
        # machine, deterministically); a wrong gradient shows as ~1e-2
        for name, diff in result["training"]["param_diffs"].items():
            assert diff < 1e-4, (result["rank"], name, diff)
    # every rank saw the same global losses
    assert len({json.dumps(r["training"]["losses"]) for r in results}) == 1


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_lost_rank_stops_the_others_with_an_error(mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    worker = Path(__file__).with_name("worker_fault.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker), mode, "5"]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, check=False)
    assert run.returncode != 0
    assert time.monotonic() - start < 120  # stopped, not hung
    assert "finished without its peer" not in run.stdout
    if mode == "hang":  # rank 0's own error: the collective timed out
        assert "a peer rank died, hung past the timeout or left" in run.stderr, run.stderr[-2000:]
    else:  # torchrun reports the dead rank and stops the other
        assert "exitcode" in run.stderr and "worker_fault.py FAILED" in run.stderr, run.stderr[-2000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 4])
def test_a_read_moves_exactly_the_analytic_bytes(tmp_path, nproc):
    """Lookups all-gathered, rows all-to-all'd and nothing else (benchmarks/bench_comm.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_comm.py"
    out = tmp_path / "comm.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           "--tokens", "64", "--n-keys", "32", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    M, B, K, d = nproc, 64, 4 * 32, 256
    assert result["analytic_bytes_per_read"] == M * 8 + M * B * K * 12 + 2 * B * d * 4  # int32 ids + fp32 weights + fp32 grads
    assert result["received_bytes_per_read"] == result["analytic_bytes_per_read"]
    assert result["table_bytes_per_rank"] * nproc == result["table_bytes_unsharded"]


def test_bad_layouts_are_config_errors():
    """In a one-rank process group: the memory-parallel group must divide the ranks."""
    import torch
    import torch.distributed as dist

    from memlayers.config import ConfigError
    from memlayers.distributed import ParallelConfig, build_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="^parallel.memory_parallel: must divide the number of ranks 1, got 2"):
            build_mesh(ParallelConfig(memory_parallel=2), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
