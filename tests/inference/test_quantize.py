"""``memlayers quantize`` end to end on a tiny trained memory model: sizes, loading, closeness, refusals."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from memlayers.bench.reliability import write_config
from memlayers.cli import main
from memlayers.kernels.quantized import QuantizedTable
from memlayers.train.checkpoint import resolve_checkpoint
from memlayers.train.pretrained import load_pretrained


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The reliability suite's tiny memory model after 8 steps of `memlayers train`."""
    directory = tmp_path_factory.mktemp("quantize")
    config = write_config(directory / "tiny.yaml", directory / "run")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(config)]) == 0
    return resolve_checkpoint(directory / "run")


@pytest.mark.parametrize("bits,group_size,tolerance", [(8, 32, 0.02), (4, 8, 0.25)])
def test_quantized_checkpoint_is_smaller_loads_and_predicts_like_the_float_one(checkpoint, tmp_path, capsys, bits,
                                                                              group_size, tolerance):
    assert main(["quantize", str(checkpoint), "--bits", str(bits), "--group-size", str(group_size),
                 "--out", str(tmp_path / "q"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    float_model, _, _ = load_pretrained(checkpoint)
    model, tokenizer, run = load_pretrained(result["checkpoint"])
    assert run.model.memory.value_dtype == f"int{bits}" and tokenizer.vocab_size == float_model.config.vocab_size
    (table,) = {id(layer.pool.values): layer.pool.values for layer in model.memory_layers()}.values()
    assert isinstance(table, QuantizedTable) and table.bits == bits
    assert result["quantized_bytes"] == table.nbytes and result["table_bytes"] == table.n_rows * table.dim * 4
    assert result["quantized_bytes"] < result["table_bytes"] * (bits / 32 + 0.2)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        expected, got = float_model(tokens).logits, model(tokens).logits
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < tolerance
    # every other tensor is the float checkpoint's, bit for bit
    floats = float_model.state_dict()
    for name, tensor in model.state_dict().items():
        if ".values." not in name:
            assert torch.equal(tensor, floats[name]), name


def test_bad_requests_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["quantize", str(checkpoint), "--bits", "4", "--group-size", "12", "--out", str(tmp_path / "a")]) == 2
    assert "config error: --group-size: an int4 table's group size must be even and divide its row size" in (
        capsys.readouterr().err)
    assert main(["quantize", str(checkpoint), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    quantized = resolve_checkpoint(tmp_path / "q")
    assert main(["quantize", str(quantized), "--bits", "4", "--out", str(tmp_path / "b")]) == 2
    assert "is quantized already (int8)" in capsys.readouterr().err
    config = write_config(tmp_path / "train.yaml", tmp_path / "run")
    assert main(["train", str(config), "model.memory.value_dtype=int8"]) == 2
    assert "value tables are for inference" in capsys.readouterr().err


def test_a_quantized_checkpoint_exports_to_transformers_and_stays_quantized(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import memlayers.integrations.hf  # noqa: F401 (registers the model with transformers' Auto classes)

    assert main(["quantize", str(checkpoint), "--bits", "4", "--group-size", "8", "--out", str(tmp_path / "q")]) == 0
    quantized = resolve_checkpoint(tmp_path / "q")
    assert main(["export", str(quantized), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model, tokenizer, _ = load_pretrained(quantized)
    assert all(isinstance(layer.pool.values, QuantizedTable) and layer.pool.values.bits == 4
               for layer in hf.model.memory_layers())
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    # training a quantized checkpoint is refused in either direction
    assert main(["shard", str(quantized), "--out", str(tmp_path / "sharded")]) == 2
    assert "has no optimizer state; it cannot resume training" in capsys.readouterr().err
