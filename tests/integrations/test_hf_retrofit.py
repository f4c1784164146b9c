"""Retrofitting memory layers into tiny random Llama-family models (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from memlayers.config import ConfigError  # noqa: E402
from memlayers.integrations.hf import (  # noqa: E402
    CausalLMAdapter,
    ParallelMemory,
    add_memory,
    freeze_all_but_memory,
    memory_parameters,
    train_memory,
)
from memlayers.memory.config import MemoryConfig  # noqa: E402
from memlayers.memory.layer import MemoryLayer  # noqa: E402
from memlayers.model.attention import KVCache  # noqa: E402

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
MEMORY = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16)


def tiny_model(family: str, vocab_size: int = 128, seed: int = 0):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=vocab_size, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tokens(shape, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parallel_mode_leaves_outputs_unchanged_at_init(family):
    model = tiny_model(family)
    x = tokens((2, 12))
    before = model(x).logits
    add_memory(model, layers=[0, 2], memory=MEMORY, mode="parallel")
    assert type(model).__name__ == f"{type(model).__mro__[1].__name__.removesuffix('ForCausalLM')}MemoryForCausalLM"
    assert model.config.model_type == f"{family}_memory"
    blocks = [model.model.layers[i].mlp for i in (0, 2)]
    assert all(isinstance(b, ParallelMemory) for b in blocks)
    assert not isinstance(model.model.layers[1].mlp, ParallelMemory)
    assert torch.equal(model(x).logits, before)
    # the memory does compute something: once the gate opens, the outputs move
    with torch.no_grad():
        blocks[0].gate.fill_(1.0)
    assert not torch.allclose(model(x).logits, before)


def test_replace_mode_swaps_the_mlp_for_memory_on_one_shared_pool():
    model = tiny_model("llama")
    x = tokens((2, 12))
    before = model(x).logits
    add_memory(model, layers=[1, 2], memory=MEMORY, mode="replace")
    layers = [model.model.layers[i].mlp for i in (1, 2)]
    assert all(isinstance(m, MemoryLayer) for m in layers)
    assert not any(name.startswith("model.layers.1.mlp.gate_proj") for name, _ in model.named_parameters())
    assert all(m.pool is model.model.memory_pool for m in layers)
    assert not torch.allclose(model(x).logits, before)
    model(x).logits.square().mean().backward()
    grad = model.model.memory_pool.values.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["parallel", "replace"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_pretrained_and_from_pretrained_restore_the_memory(tmp_path, family, mode):
    model = tiny_model(family)
    add_memory(model, layers=[1], memory=MEMORY, mode=mode)
    with torch.no_grad():  # move the memory away from its init, so a fresh one would differ
        for param in memory_parameters(model).values():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"{family}_memory"
    assert saved["memory_retrofit"] == {"layers": [1], "mode": mode, "memory": model.config.memory_retrofit["memory"]}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = tokens((2, 10))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_generate_with_the_cache_equals_generate_without_it_after_retrofit():
    model = tiny_model("llama")
    add_memory(model, layers=[1], memory=MEMORY, mode="replace")
    prompt = tokens((2, 6))
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_adapter_matches_the_model_and_continues_through_a_memlayers_cache():
    model = tiny_model("qwen2")
    add_memory(model, layers=[1], memory=MEMORY, mode="replace")
    adapter = CausalLMAdapter(model)
    x = tokens((2, 9))
    full = adapter(x).logits
    torch.testing.assert_close(full, model(x).logits, rtol=0, atol=0)
    cache = KVCache(adapter.config.max_seq_len)
    pieces = [adapter(x[:, :5], cache=cache).logits, adapter(x[:, 5:7], cache=cache).logits, adapter(x[:, 7:], cache=cache).logits]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6)
    targets = tokens((2, 9), seed=3)
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(adapter(x, targets).loss, expected)


def test_train_memory_moves_only_the_memory_and_reads_the_model_s_own_tokenizer(tiny_run, tmp_path):
    from memlayers.data.tokenizer import Tokenizer

    from .conftest import build_config

    tokenizer = Tokenizer.load(tiny_run / "tokenizer.json")
    tiny_model("llama", vocab_size=tokenizer.vocab_size).save_pretrained(tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    add_memory(model, layers=[1], memory=MEMORY, mode="parallel")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained_names = set(memory_parameters(model))
    # no data.tokenizer: the one beside the model is used, not a fresh one of data.vocab_size=400 tokens
    config = build_config(tmp_path / "run", [
        "train.steps=4", f"data.train={tiny_run / 'data' / 'train.jsonl'}", f"data.qa={tiny_run / 'data' / 'qa.jsonl'}",
        "train.eval_qa=3", "data.vocab_size=400",
    ])
    summary = train_memory(model, config)
    assert summary["step"] == 4 and (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    assert Tokenizer.load(tmp_path / "run").backend.get_vocab() == tokenizer.backend.get_vocab()
    assert summary["trained_params"] == sum(p.numel() for p in memory_parameters(model).values())
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == trained_names  # every memory parameter moved, nothing else did
    assert any("memory1/coverage" in record for record in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))


def test_train_memory_refuses_without_a_tokenizer_or_with_one_larger_than_the_model(tiny_run, tmp_path, capsys):
    from memlayers.cli import main
    from memlayers.data.tokenizer import Tokenizer

    from .conftest import build_config

    data = f"data.train={tiny_run / 'data' / 'train.jsonl'}"
    tiny_model("llama").save_pretrained(tmp_path / "base")  # no tokenizer.json beside it
    loaded = add_memory(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), layers=[1], memory=MEMORY)
    with pytest.raises(ConfigError, match=rf"data.tokenizer: not set, and {tmp_path / 'base'} has no tokenizer.json"):
        train_memory(loaded, build_config(tmp_path / "run", [data]))
    built = add_memory(tiny_model("llama"), layers=[1], memory=MEMORY)
    with pytest.raises(ConfigError, match="data.tokenizer: not set, and the model was not loaded from a directory"):
        train_memory(built, build_config(tmp_path / "run", [data]))
    vocab = Tokenizer.load(tiny_run / "tokenizer.json").vocab_size
    assert vocab > 128  # the tiny model embeds 128 ids: the tiny run's tokenizer would index past them
    named = build_config(tmp_path / "run", [data, f"data.tokenizer={tiny_run / 'tokenizer.json'}"])
    with pytest.raises(ConfigError, match=f"has {vocab} tokens but the model embeds only 128"):
        train_memory(built, named)
    assert not (tmp_path / "run").exists()  # refused before anything was written

    code = main(["retrofit", str(tmp_path / "base"), "--layers", "1", "--out", str(tmp_path / "out"), data])
    assert code == 2
    assert f"memlayers: config error: data.tokenizer: not set, and {tmp_path / 'base'} has no tokenizer.json" in capsys.readouterr().err


@pytest.mark.slow
def test_train_memory_resumes_exactly(tiny_run, tmp_path):
    """6 steps straight equal 3 steps, then a resume for 3 more, on a fresh copy of the model."""
    from memlayers.data.tokenizer import Tokenizer

    from .conftest import build_config

    vocab = Tokenizer.load(tiny_run / "tokenizer.json").vocab_size

    def retrofitted():
        model = tiny_model("qwen3", vocab_size=vocab)
        torch.manual_seed(5)
        return add_memory(model, layers=[2], memory=MEMORY, mode="replace")

    def config(run: str, steps: int):
        return build_config(tmp_path / run, [
            f"train.steps={steps}", "train.checkpoint_every=3", "train.eval_qa=2", "train.schedule=constant",
            f"data.tokenizer={tiny_run / 'tokenizer.json'}", f"data.train={tiny_run / 'data' / 'train.jsonl'}",
        ])

    straight = retrofitted()
    train_memory(straight, config("straight", 6))
    interrupted = retrofitted()
    train_memory(interrupted, config("resumed", 3))
    resumed = retrofitted()  # a new process would start from the saved model the same way
    summary = train_memory(resumed, config("resumed", 6), resume=True)
    assert summary["step"] == 6
    for name, param in memory_parameters(straight).items():
        assert torch.equal(memory_parameters(resumed)[name], param), name
    assert not torch.equal(memory_parameters(interrupted)["model.memory_pool.values"], memory_parameters(resumed)["model.memory_pool.values"])


def test_freeze_all_but_memory_names_what_is_trained():
    model = tiny_model("mistral")
    add_memory(model, layers=[2], memory=MEMORY, mode="parallel")
    trained = freeze_all_but_memory(model)
    assert trained == sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert "model.layers.2.mlp.gate" in trained and "model.memory_pool.values" in trained
    assert not any(name.startswith("model.layers.2.mlp.mlp.") for name in trained)
    assert "lm_head.weight" not in trained


def test_bf16_models_get_memory_in_their_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    x = tokens((1, 8))
    before = model(x).logits
    add_memory(model, layers=[0], memory=MEMORY, mode="parallel")
    assert model.model.layers[0].mlp.memory.w1.weight.dtype == torch.bfloat16
    assert torch.equal(model(x).logits, before)


def test_bad_retrofits_are_config_errors():
    with pytest.raises(ConfigError, match="layer 3 is outside the model"):
        add_memory(tiny_model("llama"), layers=[3], memory=MEMORY)
    with pytest.raises(ConfigError, match="lists a layer twice"):
        add_memory(tiny_model("llama"), layers=[1, 1], memory=MEMORY)
    with pytest.raises(ConfigError, match="mode"):
        add_memory(tiny_model("llama"), layers=[1], memory=MEMORY, mode="beside")
    with pytest.raises(ConfigError, match="at least one"):
        add_memory(tiny_model("llama"), layers=[], memory=MEMORY)
    model = add_memory(tiny_model("llama"), layers=[1], memory=MEMORY)
    with pytest.raises(ConfigError, match="already has memory layers"):
        add_memory(model, layers=[2], memory=MEMORY)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match="cannot retrofit a 'gpt2' model"):
        add_memory(gpt2, layers=[0], memory=MEMORY)


def test_retrofit_command_adds_trains_and_saves_the_memory(tiny_run, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    from memlayers.cli import main
    from memlayers.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_run / "tokenizer.json")
    base = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    base.save_pretrained(tmp_path / "base")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|eos|>").save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    code = main([
        "retrofit", str(tmp_path / "base"), "--layers", "0,2", "--mode", "parallel", "--out", str(out),
        "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.knn=4", "model.memory.k_dim=16",
        "train.steps=3", "train.batch_size=4", "train.eval_qa=2", "train.threads=1", "data.seq_len=32",
        f"data.train={tiny_run / 'data' / 'train.jsonl'}",
    ])
    assert code == 0
    assert (out / "training" / "checkpoints" / "step_00000003").is_dir() and (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.memory_retrofit["layers"] == [0, 2] and loaded.config.memory_retrofit["memory"]["n_keys"] == 8
    trained = memory_parameters(loaded)
    for name, param in base.state_dict().items():  # the base model's weights are untouched
        for index in (0, 2):  # in parallel mode the original MLP sits inside the new block
            name = name.replace(f"layers.{index}.mlp.", f"layers.{index}.mlp.mlp.")
        assert torch.equal(loaded.state_dict()[name], param), name
    assert trained["model.layers.0.mlp.gate"].abs().sum() > 0  # the gates moved off zero: it trained

    assert main(["retrofit", str(tmp_path / "base"), "--layers", "0,x", "--out", str(out)]) == 2
    assert main(["retrofit", str(tmp_path / "nothing"), "--layers", "1", "--out", str(out), "--no-train"]) == 2
    err = capsys.readouterr().err
    assert "layers: must be comma-separated layer indices" in err and "has no config.json" in err


def test_retrofit_without_training_under_torchrun_is_saved_by_rank_0_only(tmp_path, monkeypatch):
    """--no-train never forms a process group, so the ranks tell themselves apart by torchrun's RANK."""
    from memlayers.cli import main

    tiny_model("llama").save_pretrained(tmp_path / "base")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        args = ["retrofit", str(tmp_path / "base"), "--layers", "1", "--out", str(tmp_path / f"out{rank}"), "--no-train",
                "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.knn=4", "model.memory.k_dim=16"]
        assert main(args) == 0
    assert not (tmp_path / "out1").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out0").config.memory_retrofit["layers"] == [1]


def test_ranks_but_0_build_the_base_on_the_meta_device_without_reading_its_weights(tmp_path, monkeypatch):
    from memlayers.cli import main
    from memlayers.integrations.hf.finetune import meta_model

    base = tiny_model("llama").to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    meta = meta_model(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert type(meta) is type(loaded) and meta.name_or_path == str(tmp_path / "base")
    layout = [(n, t.dtype, t.shape) for n, t in loaded.state_dict().items()]
    assert [(n, t.dtype, t.shape) for n, t in meta.state_dict().items()] == layout  # bfloat16 kept
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))

    def refuse(*args, **kwargs):
        raise AssertionError("rank 1 read the base model's weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = ["retrofit", str(tmp_path / "base"), "--layers", "1", "--out", str(tmp_path / "out"), "--no-train",
            "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.knn=4", "model.memory.k_dim=16"]
    assert main(args) == 0 and not (tmp_path / "out").exists()


def test_a_model_on_the_meta_device_is_refused_in_one_process(tiny_run, tmp_path):
    from memlayers.data.tokenizer import Tokenizer
    from memlayers.integrations.hf.finetune import meta_model

    from .conftest import build_config

    tiny_model("llama", vocab_size=Tokenizer.load(tiny_run / "tokenizer.json").vocab_size).save_pretrained(tmp_path / "base")
    model = meta_model(tmp_path / "base")
    add_memory(model, layers=[1], memory=MEMORY, mode="parallel")
    config = build_config(tmp_path / "run", ["train.steps=1", f"data.train={tiny_run / 'data' / 'train.jsonl'}",
                                             f"data.tokenizer={tiny_run / 'tokenizer.json'}"])
    with pytest.raises(ValueError, match="the model is on the meta device .no weights.; only a distributed run"):
        train_memory(model, config)
