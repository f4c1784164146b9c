"""The README's Python example runs and does what its comments say."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def readme_examples() -> list[str]:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    return re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)


def run(code: str) -> dict:
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_readme_example():
    scope = run(readme_examples()[0])
    assert scope["y"].shape == (2, 128, 512)
    assert torch.isfinite(scope["loss"])
    model = scope["model"]
    assert [layer.pool for layer in model.memory_layers()] == [model.memory_pool] * 2


def test_readme_row_sparse_example_touches_only_read_rows():
    torch.manual_seed(0)
    code = readme_examples()[1]
    scope = run(code.replace("RowAdagrad([table], lr=1e-2).step()", "before = table.detach().clone()\nRowAdagrad([table], lr=1e-2).step()"))
    table, indices = scope["table"], scope["indices"]
    assert table.grad is None and scope["out"].shape == (512, 256)
    moved = (table.detach() != scope["before"]).any(dim=1)
    read = torch.zeros(table.shape[0], dtype=torch.bool)
    read[indices.unique()] = True
    assert torch.equal(moved, read)


def test_readme_retrofit_example_keeps_outputs_and_saves_the_memory(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    code = next(block for block in readme_examples() if "add_memory" in block)
    code = code.replace("add_memory(llama,", "x = torch.randint(0, 1000, (1, 16)); before = llama(x).logits\nadd_memory(llama,")
    scope = run("import torch\n" + code)
    llama = scope["llama"]
    assert torch.equal(llama(scope["x"]).logits, scope["before"])
    assert scope["trained"] == sorted(n for n, p in llama.named_parameters() if p.requires_grad)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama-memory")
    assert type(loaded) is type(llama)
    assert torch.equal(loaded(scope["x"]).logits, scope["before"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_readme_distributed_example_trains_under_torchrun_on_two_gloo_ranks(tmp_path):
    script = tmp_path / "train_mp.py"
    script.write_text(next(block for block in readme_examples() if "init_distributed()" in block))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    printed = re.findall(r"rank (\d) step (\d) loss ([\d.]+)", run.stdout)
    for rank in "01":
        losses = [float(loss) for r, _, loss in printed if r == rank]
        assert len(losses) == 5
        assert losses[-1] < losses[0]  # both ranks' models learn their own batch
