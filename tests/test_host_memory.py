"""keep_freed_memory: a freed 64 MiB block is reused, not mapped and faulted in again; applied by the CLI and in spawned jobs.

Each case runs in a fresh Python process and counts its page faults
(``ru_minflt``) over steps that allocate and free a 64 MiB tensor, every page
written: under glibc's defaults each step maps the block anew and faults in
all its pages; with the freed memory kept, the steps fault in none.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from memlayers.host_memory import ENV

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

STEPS = 8
WARMUP = 8
"""Steps before the count: posix_memalign's padding keeps glibc from fitting the next block into the freed one
for the first few (1-4 seen), until the free space around it has grown large enough."""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
"""Pages of the block a step allocates: what it faults in when the block is mapped anew."""

PROBE = textwrap.dedent(
    f'''
    import resource
    import sys

    import torch


    def faults(send=None):
        """Page faults over {STEPS} steps that allocate, write and free 64 MiB (after {WARMUP} steps of warm-up)."""
        for _ in range({WARMUP}):
            torch.empty(16 * 2**20).fill_(1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range({STEPS}):
            torch.empty(16 * 2**20).fill_(1.0)  # (16M,) float32
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


    if __name__ == "__main__":
        mode = sys.argv[1]
        applied = None
        if mode == "keep":
            from memlayers.host_memory import keep_freed_memory
            applied = keep_freed_memory()
        elif mode == "cli":
            from memlayers.cli import main
            main(["info", "tiny"])
        if mode == "spawned":
            from memlayers.procs import run_all
            print("faults", run_all(faults, [("probe", ())], 1)[0])
        else:
            print("faults", faults())
        print("applied", applied)
    '''
)


def probe(tmp_path, mode: str, **env: str) -> tuple[int, str]:
    """(page faults of the probe's steps, what keep_freed_memory returned or 'None') in a fresh process."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env}, check=True)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("faults", "applied")))
    return int(lines["faults"]), lines["applied"]


def test_default_malloc_faults_the_block_in_every_step(tmp_path):
    faults, _ = probe(tmp_path, "none")
    assert faults >= STEPS * PAGES * 0.9


def test_kept_memory_is_reused_without_faults(tmp_path):
    faults, applied = probe(tmp_path, "keep")
    assert applied == "True"
    assert faults < PAGES  # less than one step's block in all the steps together


def test_the_variable_keeps_glibc_defaults(tmp_path):
    faults, applied = probe(tmp_path, "keep", **{ENV: "0"})
    assert applied == "False"
    assert faults >= STEPS * PAGES * 0.9


@pytest.mark.parametrize("mode", ["cli", "spawned"])
def test_the_command_line_and_its_jobs_keep_memory(tmp_path, mode):
    faults, _ = probe(tmp_path, mode)
    assert faults < PAGES
