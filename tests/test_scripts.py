"""The SLURM launch script: run with stand-ins for srun and scontrol, it builds the
multi-node torchrun command with the job's nodes, rendezvous and the user's arguments."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sbatch"


def run(*args: str) -> subprocess.CompletedProcess:
    # stand-ins as exported bash functions, not files: executing a file just written races with
    # other processes forking meanwhile ("Text file busy") when tests run in parallel
    env = {**os.environ, "BASH_FUNC_scontrol%%": '() { printf "node-a\\nnode-b\\n"; }',
           "BASH_FUNC_srun%%": '() { echo "srun $*"; }', "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "SLURM_GPUS_PER_NODE": "4"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False)


def test_builds_the_multi_node_torchrun_command():
    result = run("paper_1.3b_memory", "data.shards=/data/shards")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("srun --kill-on-bad-exit=1 torchrun ")
    for part in ("--nnodes 2", "--nproc-per-node 4", "--rdzv-id 77", "--rdzv-backend c10d",
                 "--rdzv-endpoint node-a:29500", "-m memlayers.cli train paper_1.3b_memory data.shards=/data/shards"):
        assert part in line, part


def test_refuses_to_run_without_a_config():
    result = run()
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
