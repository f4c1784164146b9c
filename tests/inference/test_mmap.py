"""Memory-mapped loading: the same model, its weights views of the file, the table not read into RAM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlayers.cli import main
from memlayers.config import to_dict
from memlayers.data.tokenizer import Tokenizer
from memlayers.memory import MemoryConfig
from memlayers.model import ModelConfig, Transformer
from memlayers.train.checkpoint import CheckpointError, save_checkpoint
from memlayers.train.config import RunConfig
from memlayers.train.pretrained import load_pretrained


def write_checkpoint(directory: Path, value_dim: int = 32, n_keys: int = 16) -> Path:
    """A random memory model (one layer, ``n_keys**2`` x ``value_dim`` table) as a checkpoint with a tokenizer."""
    tokenizer = Tokenizer.train(["the river runs by the old mill"] * 4, 280)
    model_config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=32,
                               memory_layers=(1,), memory=MemoryConfig(n_keys=n_keys, heads=2, knn=4, k_dim=16,
                                                                       value_dim=value_dim))
    torch.manual_seed(0)
    tokenizer.save(directory / "tokenizer.json")
    return save_checkpoint(directory / "run", 1, Transformer(model_config), None,
                           {"config": to_dict(RunConfig(model=model_config))},
                           tokenizer_path=directory / "tokenizer.json")


def test_mapped_model_equals_the_loaded_one_and_reads_the_file(tmp_path):
    checkpoint = write_checkpoint(tmp_path)
    loaded, tokenizer, _ = load_pretrained(checkpoint)
    mapped, _, _ = load_pretrained(checkpoint, mmap=True)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(mapped(tokens).logits, loaded(tokens).logits)
    file_bytes = (checkpoint / "model.safetensors").stat().st_size
    table = mapped.memory_pool.values
    assert table.untyped_storage().nbytes() == file_bytes  # a view of the whole mapped file
    assert loaded.memory_pool.values.untyped_storage().nbytes() == table.numel() * 4
    assert not any(t.is_meta for t in [*mapped.parameters(), *mapped.buffers()])


def test_a_quantized_checkpoint_maps_too(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path)
    assert main(["quantize", str(checkpoint), "--bits", "4", "--group-size", "8", "--out", str(tmp_path / "q"),
                 "--json"]) == 0
    quantized = json.loads(capsys.readouterr().out)["checkpoint"]
    loaded, tokenizer, _ = load_pretrained(quantized)
    mapped, _, _ = load_pretrained(quantized, mmap=True)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(mapped(tokens).logits, loaded(tokens).logits)


def test_refusals_are_one_line(tmp_path):
    checkpoint = write_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="memory-mapped loading is for the CPU"):
        load_pretrained(checkpoint, "meta", mmap=True)
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(checkpoint, mmap=True)


RSS_PROBE = """
import sys, torch
from memlayers.model import ModelConfig, Transformer
from memlayers.train.pretrained import load_pretrained
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
with torch.device("meta"):  # the first model built on the meta device imports ~100 MB of torch, once
    Transformer(ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, max_seq_len=4))
before = rss()
model, _, _ = load_pretrained(sys.argv[1], mmap=sys.argv[2] == "mmap")
print(rss() - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
def test_mapping_leaves_the_table_on_disk(tmp_path):
    checkpoint = write_checkpoint(tmp_path, value_dim=256, n_keys=256)  # a 64 MiB table
    table = 256**2 * 256 * 4
    growth = {}
    for how in ("load", "mmap"):  # fresh processes: nothing cached in the allocator
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(checkpoint), how], capture_output=True, text=True,
                             check=True)
        growth[how] = int(out.stdout.split()[-1])
    assert growth["load"] > table  # read, and allocated by the model
    assert growth["mmap"] < table / 4
