"""The decoder LM: causality of every FFN kind, shapes, loss, tied embeddings, the shared pool."""

from __future__ import annotations

import copy

import pytest
import torch

from memlayers.memory.layer import MemoryLayer
from memlayers.model import Transformer
from memlayers.model.ffn import FeedForward, MoE

# name -> (config overrides, FFN module type and kind expected in each block)
FFN_CASES = {
    "dense": ({}, ["dense", "dense"]),
    "memory": ({"memory_layers": (1,)}, ["dense", "memory"]),
    "moe": ({"moe_layers": (1,)}, ["dense", "moe"]),
    "peer": ({"memory_layers": (1,), "memory": {"variant": "peer"}}, ["dense", "peer"]),
    "parallel": ({"memory_layers": (1,), "memory_mode": "parallel"}, ["dense", "memory"]),
    "mixed": (
        {
            "n_layers": 3,
            "memory_layers": (0,),
            "moe_layers": (2,),
            "memory": {"gated": True, "qk_norm": True},
        },
        ["memory", "dense", "moe"],
    ),
}
FFN_TYPES = {"dense": FeedForward, "memory": MemoryLayer, "peer": MemoryLayer, "moe": MoE}


def _model(config, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).double().eval()


def _tokens(config, shape, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, shape, generator=generator)


def _changed(tokens: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """Tokens that differ from ``tokens`` at every position."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, vocab, tokens.shape, generator=generator)
    return (tokens + shift) % vocab


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa2", "gqa1"])
@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_future_tokens_do_not_change_past_logits(tiny_config, case, n_kv_heads):
    overrides, kinds = FFN_CASES[case]
    config = tiny_config(n_heads=4, n_kv_heads=n_kv_heads, **overrides)
    model = _model(config)
    assert [block.kind for block in model.layers] == kinds
    for block, kind in zip(model.layers, kinds, strict=True):
        beside = config.memory_mode == "parallel" and kind == "memory"  # the FFN stays, the memory beside it
        assert isinstance(block.ffn, FeedForward if beside else FFN_TYPES[kind])
        assert isinstance(block.memory, MemoryLayer) if beside else block.memory is None
    assert model.layers[0].attention.n_kv_heads == (n_kv_heads or 4)

    T = config.max_seq_len
    tokens = _tokens(config, (2, T))
    with torch.no_grad():
        base = model(tokens).logits  # (2, T, vocab)
        for t in (1, 5, T - 1):
            future = tokens.clone()
            future[:, t:] = _changed(tokens[:, t:], config.vocab_size, seed=t)
            logits = model(future).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-12)
            # The changed positions themselves do see the change.
            assert (logits[:, t] - base[:, t]).abs().amax() > 1e-8


@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_past_tokens_change_later_logits(tiny_config, case):
    overrides, _ = FFN_CASES[case]
    config = tiny_config(n_heads=4, n_kv_heads=2, **overrides)
    model = _model(config)
    T = config.max_seq_len
    tokens = _tokens(config, (2, T))
    s = 3
    past = tokens.clone()
    past[:, s] = _changed(tokens[:, s], config.vocab_size, seed=7)
    with torch.no_grad():
        base = model(tokens).logits
        logits = model(past).logits
    torch.testing.assert_close(logits[:, :s], base[:, :s], rtol=0, atol=1e-12)
    difference = (logits - base).abs().amax(dim=-1)  # (2, T)
    assert (difference[:, s:] > 1e-8).all(), difference


@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_batch_rows_are_independent(tiny_config, case):
    overrides, _ = FFN_CASES[case]
    config = tiny_config(**overrides)
    model = _model(config)
    tokens = _tokens(config, (3, 8))
    other = tokens.clone()
    other[1:] = _changed(tokens[1:], config.vocab_size, seed=3)
    with torch.no_grad():
        base = model(tokens).logits
        logits = model(other).logits
        alone = model(tokens[:1]).logits
    torch.testing.assert_close(logits[0], base[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(alone[0], base[0], rtol=0, atol=1e-12)
    assert (logits[1:] - base[1:]).abs().amax() > 1e-8


# ---------------------------------------------------------------- shapes and loss


@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_forward_shapes(tiny_config, case):
    overrides, kinds = FFN_CASES[case]
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    model = Transformer(config)
    tokens = _tokens(config, (3, 7))
    out = model(tokens)
    assert out.logits.shape == (3, 7, config.vocab_size)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert out.loss is None
    if "moe" in kinds:
        assert out.aux_loss is not None and out.aux_loss.shape == ()
    else:
        assert out.aux_loss is None
    out = model(tokens, targets=_tokens(config, (3, 7), seed=5))
    assert out.loss.shape == () and torch.isfinite(out.loss)


def test_parallel_memory_is_added_beside_the_dense_ffn(tiny_config):
    """memory_mode=parallel: the block keeps its dense FFN and adds the memory's output to it,
    reading the same normed input; replace mode has the memory instead of the FFN."""
    config = tiny_config(memory_layers=(1,), memory_mode="parallel")
    model = _model(config)
    block = model.layers[1]
    assert isinstance(block.ffn, FeedForward) and isinstance(block.memory, MemoryLayer)
    assert model.layers[0].memory is None and model.memory_layers() == [block.memory]
    h = torch.randn(2, 5, config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen = {}
    block.ffn_norm.register_forward_hook(lambda module, args, out: seen.setdefault("normed", out))
    block.attention.register_forward_hook(lambda module, args, out: seen.setdefault("attended", out))
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    out = block(h, cos, sin)
    after_attention = h + seen["attended"]
    expected = after_attention + block.ffn(seen["normed"]) + block.memory(seen["normed"])
    torch.testing.assert_close(out, expected)
    assert (block.memory(seen["normed"]).abs() > 0).any()  # the memory contributes
    replaced = _model(tiny_config(memory_layers=(1,)))
    assert isinstance(replaced.layers[1].ffn, MemoryLayer) and replaced.layers[1].memory is None


@pytest.mark.parametrize("memory_mode", ["replace", "parallel"])
def test_memory_output_starts_at_the_paper_or_the_model_residual_scale(tiny_config, memory_mode):
    """output_init=paper: W_2 ~ normal(0, value_dim^-1/2), a scale of its own; output_init=model:
    the std of the model's other residual outputs, init_std / sqrt(2 n_layers); W_1 unchanged."""
    stds = {}
    for output_init in ("paper", "model"):
        config = tiny_config(dim=64, n_layers=4, init_std=0.02, memory_layers=(1, 3), memory_mode=memory_mode,
                             memory={"output_init": output_init})
        memories = _model(config).memory_layers()
        assert len(memories) == 2
        stds[output_init] = [(m.w1.weight.std().item(), m.w2.weight.std().item()) for m in memories]
    residual = 0.02 / (2 * 4) ** 0.5
    for (w1_paper, w2_paper), (w1_model, w2_model) in zip(stds["paper"], stds["model"], strict=True):
        assert w2_paper == pytest.approx(64**-0.5, rel=0.05)
        assert w2_model == pytest.approx(residual, rel=0.05)
        assert w1_paper == pytest.approx(64**-0.5, rel=0.05) and w1_model == pytest.approx(64**-0.5, rel=0.05)


def _manual_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over positions whose target is not -100."""
    logits = logits.double().flatten(0, 1)  # (N, V)
    targets = targets.flatten()  # (N,)
    keep = targets != -100
    log_z = logits.exp().sum(dim=-1).log()  # (N,)
    picked = logits[keep, targets[keep]]  # (n,)
    return (log_z[keep] - picked).sum() / keep.sum()


LOSS_CASES = {
    "dense": {},
    "moe": {"moe_layers": (1,)},
    "mixed": FFN_CASES["mixed"][0],
    "two_moe": {"n_layers": 3, "moe_layers": (0, 2)},
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_is_cross_entropy_plus_weighted_aux(tiny_config, case):
    config = tiny_config(moe={"aux_loss_weight": 0.5}, **LOSS_CASES[case])
    model = _model(config)
    tokens = _tokens(config, (2, 9))
    targets = _tokens(config, (2, 9), seed=2)
    out = model(tokens, targets)
    expected = _manual_cross_entropy(out.logits, targets)
    moes = [b.ffn for b in model.layers if isinstance(b.ffn, MoE)]
    assert len(moes) == len(config.moe_layers)
    if moes:
        # The balancing losses of all MoE blocks are summed.
        torch.testing.assert_close(out.aux_loss, sum(moe.aux_loss for moe in moes))
        assert all(moe.aux_loss.item() > 0.5 for moe in moes)  # about 1, so the weight matters
        expected = expected + 0.5 * out.aux_loss.double()
    else:
        assert out.aux_loss is None
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)


def test_ignore_index_positions_do_not_count(tiny_config):
    config = tiny_config()
    model = _model(config)
    tokens = _tokens(config, (2, 9))
    targets = _tokens(config, (2, 9), seed=2)
    ignored = targets.clone()
    ignored[0, :4] = -100
    ignored[1, 6:] = -100
    out = model(tokens, ignored)
    full = _manual_cross_entropy(out.logits.detach(), targets)
    kept = _manual_cross_entropy(out.logits.detach(), ignored)
    assert abs(full.item() - kept.item()) > 1e-4  # the ignored positions would matter
    torch.testing.assert_close(out.loss.double(), kept, rtol=1e-6, atol=1e-6)
    # No gradient flows from an ignored position's logits.
    logits = out.logits
    logits.retain_grad()
    out.loss.backward()
    assert logits.grad[0, :4].abs().amax() == 0
    assert logits.grad[1, 6:].abs().amax() == 0
    assert logits.grad[0, 4:].abs().amax() > 0


def test_tied_embeddings_share_one_tensor(tiny_config):
    model = Transformer(tiny_config(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    names = [name for name, _ in model.named_parameters()]
    assert "tok_embeddings.weight" in names and "output.weight" not in names
    model = model.double()
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.dtype == torch.float64
    # Gradients from the input and the output use both land in the one tensor.
    model(_tokens(model.config, (2, 5)), _tokens(model.config, (2, 5), seed=3)).loss.backward()
    assert model.tok_embeddings.weight.grad is model.output.weight.grad

    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert not torch.equal(untied.output.weight, untied.tok_embeddings.weight)


def test_sequence_longer_than_max_seq_len_raises(tiny_config):
    config = tiny_config(max_seq_len=6)
    model = Transformer(config)
    model(_tokens(config, (1, 6)))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(config, (1, 7)))


# ---------------------------------------------------------------- shared value pool


def _pool_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if "pool" in name]


def test_shared_pool_is_one_table(tiny_config):
    config = tiny_config(n_layers=4, memory_layers=(1, 3), memory={"shared_values": True})
    model = Transformer(config)
    assert _pool_names(model) == ["memory_pool.values"]
    assert [k for k in model.state_dict() if "pool" in k] == ["memory_pool.values"]
    layers = model.memory_layers()
    assert len(layers) == 2
    for layer in layers:
        assert layer.pool is model.memory_pool
        assert not layer.owns_pool
    assert model.memory_pool.values.shape == (config.memory.n_slots, config.dim)
    # After a dtype change the layers still read the model's (converted) table.
    model = model.double()
    assert all(layer.pool.values is model.memory_pool.values for layer in model.memory_layers())
    assert model.memory_pool.values.dtype == torch.float64


def test_shared_peer_pool_has_values_and_up(tiny_config):
    config = tiny_config(n_layers=3, memory_layers=(0, 2), memory={"variant": "peer"})
    model = Transformer(config)
    assert sorted(_pool_names(model)) == ["memory_pool.up", "memory_pool.values"]


def test_unshared_pools_are_distinct_tables(tiny_config):
    config = tiny_config(n_layers=4, memory_layers=(1, 3), memory={"shared_values": False})
    model = Transformer(config)
    assert model.memory_pool is None
    assert sorted(_pool_names(model)) == ["layers.1.ffn.pool.values", "layers.3.ffn.pool.values"]
    first, second = model.memory_layers()
    assert first.owns_pool and second.owns_pool
    assert first.pool is not second.pool
    assert first.pool.values.data_ptr() != second.pool.values.data_ptr()
    assert not torch.equal(first.pool.values, second.pool.values)

    model = model.double()
    tokens = _tokens(config, (2, 8))
    reads = _record_reads(model)
    model(tokens, _tokens(config, (2, 8), seed=4)).loss.backward()
    for layer in (first, second):
        touched = layer.pool.values.grad.abs().sum(dim=-1) > 0  # (n_slots,)
        assert torch.equal(touched, reads[id(layer)])


def _record_reads(model) -> dict[int, torch.Tensor]:
    """Hooks that record, per memory layer, a mask of the slots its forward reads."""
    reads = {}

    def hook(layer, args, _output):
        with torch.no_grad():
            _, indices = layer.lookup(args[0])
        mask = torch.zeros(layer.config.n_slots, dtype=torch.bool)
        mask[indices.flatten()] = True
        reads[id(layer)] = mask

    for layer in model.memory_layers():
        layer.register_forward_hook(hook)
    return reads


@pytest.mark.parametrize("variant", ["plus", "peer"])
def test_shared_pool_gradient_is_sum_of_every_layer_read(tiny_config, variant):
    config = tiny_config(n_layers=4, memory_layers=(1, 3), memory={"variant": variant})
    model = _model(config)
    tokens = _tokens(config, (2, 10))
    targets = _tokens(config, (2, 10), seed=6)
    reads = _record_reads(model)

    out = model(tokens, targets)
    out.loss.backward()
    shared_grad = model.memory_pool.values.grad.clone()
    model.zero_grad()

    # Give each memory layer a private copy of the table with the same numbers:
    # the function is unchanged, and each copy's gradient is that layer's contribution.
    copies = []
    for layer in model.memory_layers():
        private = copy.deepcopy(model.memory_pool)
        object.__setattr__(layer, "pool", private)
        copies.append(private)
    again = model(tokens, targets)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=1e-12)
    again.loss.backward()
    contributions = [private.values.grad for private in copies]

    for layer, contribution in zip(model.memory_layers(), contributions, strict=True):
        touched = contribution.abs().sum(dim=-1) > 0
        # Each layer's read puts gradient on exactly the rows it read.
        assert torch.equal(touched, reads[id(layer)])
    assert not torch.equal(reads[id(model.memory_layers()[0])], reads[id(model.memory_layers()[1])])
    torch.testing.assert_close(
        shared_grad, contributions[0] + contributions[1], rtol=1e-10, atol=1e-14
    )
    # Neither layer alone explains the shared gradient.
    for contribution in contributions:
        assert (shared_grad - contribution).abs().amax() > 1e-8


def test_deepcopy_keeps_one_shared_pool(tiny_config):
    config = tiny_config(n_layers=4, memory_layers=(1, 3))
    model = _model(config)
    clone = copy.deepcopy(model)
    assert clone.memory_pool is not model.memory_pool
    assert all(layer.pool is clone.memory_pool for layer in clone.memory_layers())
    with torch.no_grad():
        clone.memory_pool.values.mul_(2.0)  # the copy's layers read the copy's table
    tokens = _tokens(config, (1, 6))
    with torch.no_grad():
        assert (clone(tokens).logits - model(tokens).logits).abs().amax() > 1e-8


@pytest.mark.parametrize("shared", [True, False])
def test_state_dict_round_trip_reproduces_logits(tiny_config, shared):
    config = tiny_config(
        n_layers=4, memory_layers=(1, 3), moe_layers=(2,), memory={"shared_values": shared}
    )
    source = _model(config, seed=0)
    target = _model(config, seed=1)
    tokens = _tokens(config, (2, 7))
    with torch.no_grad():
        assert (source(tokens).logits - target(tokens).logits).abs().amax() > 1e-6
        target.load_state_dict(source.state_dict())
        torch.testing.assert_close(target(tokens).logits, source(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("n_kv_heads", [None, 1], ids=["mha", "gqa1"])
@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_kv_cache_continuations_equal_the_full_forward(tiny_config, case, n_kv_heads):
    """Prefill 4 tokens, then 3 at once, then one at a time: the logits of every
    position equal those of one forward over the whole sequence."""
    from memlayers.model.attention import KVCache

    overrides, _ = FFN_CASES[case]
    config = tiny_config(**copy.deepcopy(overrides), n_kv_heads=n_kv_heads, n_heads=4)
    model = _model(config)
    tokens = _tokens(config, (3, config.max_seq_len))
    full = model(tokens).logits  # (3, T, V)
    cache = KVCache(config.max_seq_len)
    pieces, start = [], 0
    for size in [4, 3] + [1] * (config.max_seq_len - 7):
        pieces.append(model(tokens[:, start : start + size], cache=cache).logits)
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(tokens[:, :1], cache=cache)


def test_generation_with_the_cache_equals_rerunning_the_whole_sequence(tiny_config):
    from memlayers.eval.generate import generate

    config = tiny_config(memory_layers=(1,), max_seq_len=16)
    model = _model(config)
    prompts = _tokens(config, (4, 5)).tolist()
    cached = generate(model, prompts, max_new_tokens=11)  # 5 + 11 <= 16: prefill once, then a token a step
    tokens = torch.tensor(prompts)
    for _ in range(11):  # the plain loop: the whole sequence every step
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached == tokens[:, 5:].tolist()


@pytest.mark.parametrize("n_kv_heads", [None, 1], ids=["mha", "gqa1"])
@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_left_padded_rows_compute_what_they_would_alone(tiny_config, case, n_kv_heads):
    """Rows of lengths 9, 5 and 2 padded on the left, with an attention mask:
    every real position's logits equal those of the row run alone, in one
    forward and when continued through the cache."""
    from memlayers.model.attention import KVCache

    overrides, _ = FFN_CASES[case]
    config = tiny_config(**copy.deepcopy(overrides), n_kv_heads=n_kv_heads, n_heads=4)
    model = _model(config)
    rows = [_tokens(config, (n,), seed=n) for n in (9, 5, 2)]
    padded = torch.zeros(3, 9, dtype=torch.long)  # pad id 0 is an ordinary token: the mask must hide it
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 9 - len(row) :] = row
        mask[i, 9 - len(row) :] = 1
    logits = model(padded, attention_mask=mask).logits  # (3, 9, V)
    assert torch.isfinite(logits).all()
    alone = [model(row[None]).logits[0] for row in rows]
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i, 9 - len(row) :], alone[i], rtol=1e-9, atol=1e-10)
    # unmasked, the padding changes the short rows: the mask is what hides it
    assert not torch.allclose(model(padded).logits[2, -1], alone[2][-1])

    cache = KVCache(config.max_seq_len)
    model(padded, cache=cache, attention_mask=mask)
    new = _tokens(config, (3, 2), seed=7)
    step_mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], dim=1)  # (3, 11)
    step = model(new, cache=cache, attention_mask=step_mask).logits  # (3, 2, V)
    for i, row in enumerate(rows):
        whole = model(torch.cat([row, new[i]])[None]).logits[0, -2:]
        torch.testing.assert_close(step[i], whole, rtol=1e-9, atol=1e-10)


def test_attention_mask_of_the_wrong_shape_is_refused(tiny_config):
    config = tiny_config()
    model = _model(config)
    tokens = _tokens(config, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        model(tokens, attention_mask=torch.ones(2, 4))
