"""The README's Python example runs and does what its comments say."""

import re
from pathlib import Path

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
