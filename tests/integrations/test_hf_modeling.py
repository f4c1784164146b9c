"""memlayers as a transformers model: Auto registration, save/load, generate(), export/import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from memlayers.cli import main  # noqa: E402
from memlayers.config import ConfigError, to_dict  # noqa: E402
from memlayers.data.text import read_qa  # noqa: E402
from memlayers.eval.generate import generate  # noqa: E402
from memlayers.eval.qa import evaluate_qa  # noqa: E402
from memlayers.integrations.hf import (  # noqa: E402
    MemlayersConfig,
    MemlayersForCausalLM,
    export_to_hf,
    import_from_hf,
)
from memlayers.memory.config import MemoryConfig  # noqa: E402
from memlayers.model import ModelConfig, MoEConfig, Transformer  # noqa: E402
from memlayers.train.checkpoint import CheckpointError  # noqa: E402
from memlayers.train.pretrained import load_pretrained  # noqa: E402

# name -> ModelConfig overrides; init_std is large so that a random model's greedy tokens vary
VARIANTS = {
    "memory-tied": {"memory_layers": (1,), "tie_embeddings": True},
    "peer-gqa": {"memory_layers": (0,), "memory": MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8, variant="peer"), "n_kv_heads": 1},
    "moe-unshared": {"moe_layers": (0,), "memory_layers": (1,), "memory": MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8, shared_values=False)},
}


def random_model(variant: str, seed: int = 0) -> Transformer:
    fields = {
        "dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 97, "max_seq_len": 40, "ffn_hidden_dim": 48, "init_std": 0.3,
        "memory": MemoryConfig(n_keys=6, heads=2, knn=3, k_dim=8), "moe": MoEConfig(n_experts=4, top_k=2, hidden_dim=16),
    }
    fields.update(VARIANTS[variant])
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**fields)).eval()


def tokens(shape: tuple[int, ...], seed: int = 1, vocab: int = 97) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_pretrained_and_auto_from_pretrained_round_trip(tmp_path, variant):
    model = random_model(variant)
    wrapped = MemlayersForCausalLM.from_memlayers(model, eos_token_id=2)
    x = tokens((2, 11))
    torch.testing.assert_close(wrapped(x).logits, model(x).logits, rtol=0, atol=0)
    wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))

    assert type(AutoConfig.from_pretrained(tmp_path)) is MemlayersConfig
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MemlayersForCausalLM
    assert loaded.model.config == model.config
    assert loaded.model.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    if model.config.tie_embeddings:
        assert loaded.model.output.weight is loaded.model.tok_embeddings.weight
    if model.memory_pool is not None:  # the shared pool is still one table read by every memory layer
        assert all(layer.pool is loaded.model.memory_pool for layer in loaded.model.memory_layers())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generate_equals_memlayers_generate(variant):
    model = random_model(variant)
    wrapped = MemlayersForCausalLM.from_memlayers(model)
    for length, seed in ((3, 1), (8, 2)):
        prompt = tokens((2, length), seed=seed)
        ours = generate(model, prompt.tolist(), max_new_tokens=14)
        assert len({t for row in ours for t in row}) > 3  # a varied continuation, so equality means something
        cached = wrapped.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=True)
        uncached = wrapped.generate(prompt, max_new_tokens=14, do_sample=False, use_cache=False)
        assert cached[:, length:].tolist() == ours
        assert uncached[:, length:].tolist() == ours


def test_generate_stops_at_the_eos_token_like_memlayers():
    model = random_model("memory-tied")
    prompt = tokens((1, 5))
    free = generate(model, prompt.tolist(), max_new_tokens=12)[0]
    eos = free[4]  # a token the model emits mid-way
    ours = generate(model, prompt.tolist(), max_new_tokens=12, stop_ids=[eos])[0]
    wrapped = MemlayersForCausalLM.from_memlayers(model, eos_token_id=eos, pad_token_id=0)
    out = wrapped.generate(prompt, max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    assert ours[-1] == eos and len(ours) < 12
    assert out == ours


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    model = random_model("memory-tied")
    wrapped = MemlayersForCausalLM.from_memlayers(model, pad_token_id=0)
    prompts = [tokens((n,), seed=n).tolist() for n in (9, 4, 6)]
    padded = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        padded[i, 9 - len(prompt) :] = torch.tensor(prompt)
        mask[i, 9 - len(prompt) :] = 1
    out = wrapped.generate(input_ids=padded, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert out[:, 9:].tolist() == generate(model, prompts, max_new_tokens=10)


def test_labels_give_the_memlayers_loss_on_shifted_targets():
    model = random_model("moe-unshared")
    wrapped = MemlayersForCausalLM.from_memlayers(model)
    x = tokens((2, 10))
    labels = x.clone()
    labels[0, :3] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected = model(x, targets).loss
    out = wrapped(x, labels=labels)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    out.loss.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_invalid_memlayers_config_names_the_key():
    with pytest.raises(ConfigError, match="n_heads"):
        MemlayersConfig(memlayers={"dim": 30, "n_heads": 4})
    config = MemlayersConfig(memlayers=to_dict(ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=500)))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 3, 500)


def test_export_and_import_round_trip_a_trained_checkpoint(tiny_run, tmp_path):
    model, tokenizer, run = load_pretrained(tiny_run)
    hf_dir = export_to_hf(tiny_run, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = "Question: Where was the first person born?\nAnswer:"
    ids = tokenizer.encode(text, bos=True)
    assert hf_tokenizer(text).input_ids == ids  # BOS first, as memlayers feeds its models
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == ids[1:]
    assert tokenizer.encode(text) == ids[1:]  # the checkpoint's own tokenizer is left as it was
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    x = torch.tensor([ids])
    torch.testing.assert_close(hf_model(x).logits, model(x).logits, rtol=0, atol=0)
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_id

    checkpoint = import_from_hf(hf_dir, tmp_path / "back")
    back, back_tokenizer, back_run = load_pretrained(checkpoint)
    assert to_dict(back_run.data) == to_dict(run.data) and back_run.optim == run.optim
    assert back_run.train.out_dir == str(tmp_path / "back")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    pairs = read_qa(tiny_run / "data" / "qa.jsonl")[:12]
    assert evaluate_qa(back, back_tokenizer, pairs).predictions == evaluate_qa(model, tokenizer, pairs).predictions


def test_export_and_import_commands(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "back/checkpoints/step_00000000" in capsys.readouterr().out
    qa = str(tiny_run / "data" / "qa.jsonl")
    results = []
    for checkpoint in (tiny_run, tmp_path / "back"):
        assert main(["eval", str(checkpoint), "--qa", qa, "--limit", "8", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1]


def test_import_refuses_what_is_not_a_memlayers_model(tmp_path: Path, capsys):
    with pytest.raises(CheckpointError, match="no config.json"):
        import_from_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="holds a 'llama' model"):
        import_from_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text("{not json")
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
