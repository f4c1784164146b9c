"""Every Triton kernel compiles for the A100 and H100 (sm_80, sm_90) without spilling, on a CPU.

The compile runs in a fresh process: the suite's own process defines the kernels
under the interpreter (conftest), which has nothing to compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas (not x86-64 Linux?)")
# on a GPU machine the gpu tests compile and run every kernel on the device itself
without_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the compiled kernels instead")


def compile_all(tmp_path: Path, *archs: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "memlayers.kernels.compile_check", "--arch", *archs, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=540)
    return proc, json.loads(out.read_text()) if out.exists() else []


@pytest.mark.slow
@needs_ptxas
@without_gpu
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    proc, results = compile_all(tmp_path, "80", "90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {r["kernel"] for r in results}
    # every kernel of the Triton modules was launched by a recorded case (the check refuses to pass
    # otherwise), and these are all of them
    assert names == {"_bag_kernel", "_bag_dot_kernel", "_half_topk", "_pair_topk", "_quantized_bag_kernel"}
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in results if r["arch"] == arch} == names
    for r in results:
        assert r["cubin_bytes"] > 0 and 0 < r["registers"] <= 255, r
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"spills: {r}"
        assert r["shared_bytes"] <= 48 * 1024, r  # within the static limit of every GPU since sm_70
    # the launches follow the launchers' choices: quantized bags at 8 and 4 bits, sorts at two sizes
    assert {r["constexprs"]["BITS"] for r in results if r["kernel"] == "_quantized_bag_kernel"} == {8, 4}
    assert {r["constexprs"]["N_POW"] for r in results if r["kernel"] == "_half_topk"} == {256, 1024}
    assert "regs" in proc.stdout and "sm_90" in proc.stdout  # the printed table


def test_an_interpreted_process_is_refused():
    # in this (interpreted) process the check must refuse rather than "compile" interpreter stand-ins
    from memlayers.kernels import compile_check, triton_bag

    if not triton_bag._INTERPRETED:
        pytest.skip("the kernels are compiled in this process (a CUDA machine)")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.check([90])
