"""generate(): greedy against a naive loop, batching by length, stop ids, cropping, sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memlayers.eval import generate
from memlayers.model import ModelConfig, Transformer

VOCAB = 40
MAX_LEN = 16


def _model(seed: int = 0) -> Transformer:
    """A tiny random float64 Transformer; init_std is large so that argmax varies by context."""
    torch.manual_seed(seed)
    config = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=2,
        vocab_size=VOCAB,
        max_seq_len=MAX_LEN,
        ffn_hidden_dim=48,
        init_std=0.5,
    )
    return Transformer(config).double().eval()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    """Random prompts of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def _naive_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Append the argmax of the last position one token at a time, cropping to max_seq_len."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            context = torch.tensor([sequence[-MAX_LEN:]])  # (1, T)
            sequence.append(int(model(context).logits[0, -1].argmax()))
    return sequence[len(prompt) :]


def test_greedy_matches_naive_loop():
    model = _model()
    [prompt] = _prompts([5])
    out = generate(model, [prompt], max_new_tokens=9)
    assert out == [_naive_greedy(model, prompt, 9)]
    assert len(out[0]) == 9
    assert len(set(out[0])) > 1  # the model is not a constant predictor


def test_batched_prompts_of_different_lengths_match_single_runs():
    model = _model()
    prompts = _prompts([3, 5, 3, 7, 5, 1, 3])
    batched = generate(model, prompts, max_new_tokens=6, batch_size=2)
    singles = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    naive = [_naive_greedy(model, p, 6) for p in prompts]
    assert batched == singles == naive
    assert len({tuple(o) for o in batched}) > 1


def test_stop_ids_truncate_after_first_stop():
    model = _model()
    prompts = _prompts([4, 6, 4, 2], seed=3)
    full = generate(model, prompts, max_new_tokens=10)
    stop = full[0][3]
    other = full[1][5]
    stopped = generate(model, prompts, max_new_tokens=10, stop_ids={stop, other})
    for out, ref in zip(stopped, full, strict=True):
        hits = [i for i, t in enumerate(ref) if t in (stop, other)]
        expected = ref[: hits[0] + 1] if hits else ref
        assert out == expected
    assert len(stopped[0]) <= 4 and stopped[0][-1] in (stop, other)
    assert len(stopped[1]) <= 6


def test_crops_context_to_max_seq_len():
    model = _model()
    prompts = _prompts([12, 20, 12], seed=4)  # 12 + 10 and 20 exceed max_seq_len = 16
    out = generate(model, prompts, max_new_tokens=10, batch_size=1)
    assert out == [_naive_greedy(model, p, 10) for p in prompts]
    # cropping the wrong end would give a different continuation
    wrong = []
    with torch.no_grad():
        sequence = list(prompts[0])
        for _ in range(10):
            sequence.append(int(model(torch.tensor([sequence[:MAX_LEN]])).logits[0, -1].argmax()))
        wrong = sequence[len(prompts[0]) :]
    assert out[0] != wrong


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = _model()
    prompts = _prompts([4, 4, 6], seed=5)

    def sample(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompts, max_new_tokens=12, temperature=1.5, generator=generator)

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    assert first != generate(model, prompts, max_new_tokens=12)


def test_top_k_1_sampling_equals_greedy():
    model = _model()
    prompts = _prompts([3, 8, 3], seed=6)
    generator = torch.Generator().manual_seed(0)
    sampled = generate(
        model, prompts, max_new_tokens=8, temperature=2.0, top_k=1, generator=generator
    )
    assert sampled == generate(model, prompts, max_new_tokens=8)


def test_top_k_samples_only_among_the_k_largest_logits():
    model = _model()
    [prompt] = _prompts([3], seed=7)
    generator = torch.Generator().manual_seed(0)
    k = 3
    [out] = generate(
        model, [prompt], max_new_tokens=12, temperature=10.0, top_k=k, generator=generator
    )
    sequence = torch.tensor([prompt + out])  # (1, T)
    with torch.no_grad():
        logits = model(sequence[:, :-1]).logits[0, len(prompt) - 1 :]  # (12, V): predicts out
    ranks = (logits > logits.gather(-1, torch.tensor(out)[:, None])).sum(-1)  # (12,)
    assert ranks.max() < k
    assert ranks.max() > 0  # at a flat temperature, not always the argmax


class _FixedLM(nn.Module):
    """Predicts the same next-token logits everywhere."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=8)
        self.logits = nn.Parameter(logits)

    def forward(self, tokens: torch.Tensor, targets=None, cache=None) -> SimpleNamespace:
        """Logits ``(B, T, V)``, identical at every position (no cache needed)."""
        return SimpleNamespace(logits=self.logits.expand(*tokens.shape, -1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    model = _FixedLM(probs.log())
    n = 4000
    generator = torch.Generator().manual_seed(0)
    out = generate(
        model,
        [[0]] * n,
        max_new_tokens=1,
        temperature=temperature,
        generator=generator,
        batch_size=n,
    )
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=4).double()  # (4,)
    expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()  # (4,)
    assert torch.allclose(counts / n, expected, atol=0.03)


def test_eval_mode_during_generation_and_mode_restored():
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    generate(model, _prompts([3]), max_new_tokens=2)
    assert seen == [False, False] and model.training
    model.eval()
    generate(model, _prompts([3]), max_new_tokens=2)
    assert not model.training


def test_invalid_arguments_and_edge_cases():
    model = _model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[1]], max_new_tokens=1, temperature=1.0, top_k=0)
    assert generate(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]
    assert generate(model, [], max_new_tokens=3) == []
