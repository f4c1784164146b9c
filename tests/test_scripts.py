"""The SLURM launch script: run with stand-ins for srun, scontrol and torchrun, it builds the
multi-node torchrun command with the job's nodes, rendezvous and the user's arguments."""

import os
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sbatch"


def stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"')
    stand_in(bin_dir, "srun", 'echo "srun $*"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "SLURM_GPUS_PER_NODE": "4"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False)


def test_builds_the_multi_node_torchrun_command(tmp_path):
    result = run(tmp_path, "paper_1.3b_memory", "data.shards=/data/shards")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("srun --kill-on-bad-exit=1 torchrun ")
    for part in ("--nnodes 2", "--nproc-per-node 4", "--rdzv-id 77", "--rdzv-backend c10d",
                 "--rdzv-endpoint node-a:29500", "-m memlayers.cli train paper_1.3b_memory data.shards=/data/shards"):
        assert part in line, part


def test_refuses_to_run_without_a_config(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
