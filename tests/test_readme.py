"""The README's Python example runs and does what its comments say."""

import re
from pathlib import Path

import torch


def test_readme_example():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 128, 512)
    assert torch.isfinite(scope["loss"])
    model = scope["model"]
    assert [layer.pool for layer in model.memory_layers()] == [model.memory_pool] * 2
