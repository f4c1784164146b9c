"""QA evaluation: answer normalisation, exact match and answer NLL on a hand-made bigram
model with known probabilities, and against naive per-question loops on a random Transformer."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memlayers.data.text import qa_prompt
from memlayers.eval import QAResult, TextCodec, evaluate_qa, exact_match, normalize_answer
from memlayers.model import ModelConfig, Transformer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .?:\nQA"


class CharCodec:
    """One id per character of ALPHABET, then BOS and EOS (or no BOS)."""

    def __init__(self, with_bos: bool = True):
        self.ids = {ch: i for i, ch in enumerate(ALPHABET)}
        self.bos_id: int | None = len(ALPHABET) if with_bos else None
        self.eos_id: int | None = len(ALPHABET) + 1
        self.vocab_size = len(ALPHABET) + 2

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of the characters of ``text``, with BOS / EOS when asked."""
        ids = [self.ids[ch] for ch in text]
        if bos:
            assert self.bos_id is not None
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: list[int]) -> str:
        """The characters of ``ids``; BOS and EOS decode to ``<s>`` and ``</s>``."""
        return "".join(
            ALPHABET[i] if i < len(ALPHABET) else ("<s>" if i == self.bos_id else "</s>")
            for i in ids
        )


def _as_codec(codec: CharCodec) -> TextCodec:
    """The test codec satisfies the protocol (checked by type checkers)."""
    return codec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat!", "cat"),
        ("  a  quick,\tbrown   fox. ", "quick brown fox"),
        ("An apple", "apple"),
        ("theater at the anthem", "theater at anthem"),
        ("the-end", "theend"),
        ("Paris", "paris"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_compares_normalised_strings():
    assert exact_match("The Paris.", "paris")
    assert exact_match("  PARIS ", "a paris")
    assert not exact_match("paris france", "paris")
    assert not exact_match("", "paris")


class BigramLM(nn.Module):
    """Next-token logits that depend only on the current token: ``table[token]``."""

    def __init__(self, table: torch.Tensor, max_seq_len: int):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.table = nn.Parameter(table)  # (V, V)

    def forward(self, tokens: torch.Tensor, targets=None, cache=None) -> SimpleNamespace:
        """Logits ``(B, T, V)``; a bigram needs no keys or values, only the cache's position."""
        if cache is not None:
            cache.length += tokens.shape[1]
        return SimpleNamespace(logits=self.table[tokens])


def _bigram(
    codec: CharCodec, successor: dict[str, str], default: int, max_seq_len: int = 128
) -> BigramLM:
    """Each token's successor (``default`` id when not listed) gets probability 1/2,
    every other id 1/(2(V-1))."""
    V = codec.vocab_size
    table = torch.full((V, V), math.log(0.5 / (V - 1)), dtype=torch.float64)  # (V, V)
    for row in range(V):
        table[row, default] = math.log(0.5)
    for current, following in successor.items():
        row = codec.ids[current]
        table[row] = math.log(0.5 / (V - 1))
        table[row, codec.eos_id if following == "<eos>" else codec.ids[following]] = math.log(0.5)
    return BigramLM(table, max_seq_len)


PAIRS = [
    {"question": "capital of france?", "answer": "paris"},
    {"question": "capital of texas?", "answer": "the paris."},
    {"question": "capital of england?", "answer": "london"},
]


@pytest.mark.parametrize("ending", ["eos", "newline"])
@pytest.mark.parametrize("with_bos", [True, False])
def test_hand_made_bigram_model_gives_known_scores(ending, with_bos):
    codec = CharCodec(with_bos)
    chain = {":": " ", " ": "p", "p": "a", "a": "r", "r": "i", "i": "s"}
    if ending == "eos":  # " paris" then EOS
        model = _bigram(codec, {**chain, "s": "<eos>"}, default=codec.eos_id)
    else:  # " paris\nqqqq...": never EOS, cut at the newline
        model = _bigram(codec, {**chain, "s": "\n", "\n": "q"}, default=codec.ids["q"])
    first_tokens = []
    model.register_forward_pre_hook(  # calls that start a sequence: not a KV-cached continuation
        lambda module, args, kwargs: first_tokens.extend(args[0][:, 0].tolist())
        if kwargs.get("cache") is None or kwargs["cache"].length == 0
        else None,
        with_kwargs=True,
    )

    result = evaluate_qa(model, _as_codec(codec), PAIRS, max_new_tokens=16, batch_size=2)

    # Every prompt ends with ":", whose successor " " starts the answer. Per answer token the NLL
    # is log 2 when it is its predecessor's successor (hit), else log(2 (V - 1)) (miss).
    hit, miss = math.log(2), math.log(2 * (codec.vocab_size - 1))
    # " paris": 6 hits; " the paris.": ':'>' ', ' '>'p'..'i'>'s' hit (6), ' '>'t', 't'>'h',
    # 'h'>'e', 'e'>' ', 's'>'.' miss (5); " london": ':'>' ' hit, 6 misses.
    per_question = [hit, (6 * hit + 5 * miss) / 11, (hit + 6 * miss) / 7]
    assert result.n == 3
    assert result.exact_match == pytest.approx(2 / 3, abs=1e-12)
    assert result.answer_nll == pytest.approx((13 * hit + 11 * miss) / 24, rel=1e-12)
    assert [p["prediction"] for p in result.predictions] == ["paris"] * 3
    assert [p["correct"] for p in result.predictions] == [True, True, False]
    assert [p["nll"] for p in result.predictions] == pytest.approx(per_question, rel=1e-12)
    assert [(p["question"], p["answer"]) for p in result.predictions] == [
        (q["question"], q["answer"]) for q in PAIRS
    ]
    assert result.as_dict() == {
        "exact_match": result.exact_match,
        "answer_nll": result.answer_nll,
        "n": 3,
    }
    # prompts start with BOS exactly when the tokenizer has one
    assert set(first_tokens) == ({codec.bos_id} if with_bos else {codec.ids["Q"]})


def _random_pairs(n: int, seed: int) -> list[dict]:
    """Questions and answers of random lowercase words (some of equal lengths)."""
    rng = random.Random(seed)

    def words(count: int) -> str:
        return " ".join(
            "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4)))
            for _ in range(count)
        )

    return [
        {"question": words(rng.randint(1, 4)) + "?", "answer": words(rng.randint(1, 3))}
        for _ in range(n)
    ]


def _naive_qa(
    model: nn.Module, codec: CharCodec, pair: dict, max_new_tokens: int
) -> tuple[str, float, int]:
    """One question at a time: greedy prediction text, summed answer NLL and answer length."""
    max_len = model.config.max_seq_len
    prompt = codec.encode(qa_prompt(pair["question"]), bos=True)
    answer = codec.encode(" " + pair["answer"])
    with torch.no_grad():
        sequence = list(prompt)
        for _ in range(max_new_tokens):
            sequence.append(int(model(torch.tensor([sequence[-max_len:]])).logits[0, -1].argmax()))
            if sequence[-1] == codec.eos_id:
                sequence.pop()  # EOS ends the answer and is not part of its text
                break
        text = codec.decode(sequence[len(prompt) :]).split("\n")[0].strip()
        full = (prompt + answer)[-(max_len + 1) :]
        logits = model(torch.tensor([full[:-1]])).logits[0].double()  # (T-1, V)
        log_probs = F.log_softmax(logits, dim=-1)  # (T-1, V)
        start = len(full) - 1 - len(answer)  # logits at position t predict token t + 1
        nll = -sum(float(log_probs[start + j, token]) for j, token in enumerate(answer))
    return text, nll, len(answer)


@pytest.mark.parametrize("max_seq_len", [64, 24])
def test_random_transformer_matches_naive_per_question_loop(max_seq_len):
    codec = CharCodec()
    torch.manual_seed(0)
    config = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=2,
        vocab_size=codec.vocab_size,
        max_seq_len=max_seq_len,
        ffn_hidden_dim=48,
        init_std=0.3,
    )
    model = Transformer(config).double()
    model.train()
    pairs = _random_pairs(7, seed=max_seq_len)
    result = evaluate_qa(model, codec, pairs, max_new_tokens=8, batch_size=2)
    assert model.training

    naive = [_naive_qa(model, codec, pair, 8) for pair in pairs]
    assert [p["prediction"] for p in result.predictions] == [text for text, _, _ in naive]
    assert [p["nll"] for p in result.predictions] == pytest.approx(
        [s / n for _, s, n in naive], rel=1e-9
    )
    total = sum(s for _, s, _ in naive) / sum(n for _, _, n in naive)
    assert result.answer_nll == pytest.approx(total, rel=1e-9)
    # token-weighted, not the mean of per-question means (answer lengths differ)
    assert len({n for _, _, n in naive}) > 1
    assert result.answer_nll != pytest.approx(
        sum(s / n for _, s, n in naive) / len(naive), rel=1e-6
    )
    expected_em = sum(
        exact_match(text, pair["answer"]) for (text, _, _), pair in zip(naive, pairs, strict=True)
    ) / len(pairs)
    assert result.exact_match == expected_em


def test_em_counts_a_random_models_correct_answers():
    codec = CharCodec()
    torch.manual_seed(1)
    config = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=2,
        vocab_size=codec.vocab_size,
        max_seq_len=64,
        ffn_hidden_dim=48,
        init_std=0.3,
    )
    model = Transformer(config).double()
    pairs = _random_pairs(6, seed=5)
    first = evaluate_qa(model, codec, pairs, max_new_tokens=6)
    said = [p["prediction"] for p in first.predictions]
    # make the gold answers of two questions what the model says, with an article and a full stop
    chosen = [i for i, text in enumerate(said) if normalize_answer(text)][:2]
    assert len(chosen) == 2
    pairs = [dict(pair) for pair in pairs]
    for index in chosen:
        pairs[index]["answer"] = "the " + said[index] + "."
    second = evaluate_qa(model, codec, pairs, max_new_tokens=6)
    correct = [p["correct"] for p in second.predictions]
    assert [correct[i] for i in chosen] == [True, True]
    assert second.exact_match == sum(correct) / 6
    assert (
        first.exact_match == sum(p["correct"] for p in first.predictions) / 6 < second.exact_match
    )


def test_invalid_inputs():
    codec = CharCodec()
    model = _bigram(codec, {}, default=codec.eos_id, max_seq_len=8)
    with pytest.raises(ValueError, match="empty"):
        evaluate_qa(model, codec, [])
    with pytest.raises(ValueError, match="empty answer"):
        evaluate_qa(model, codec, [{"question": "q?", "answer": "   "}])
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_qa(model, codec, [{"question": "q?", "answer": "abcdefghijk"}])
    assert isinstance(evaluate_qa(model, codec, [{"question": "q?", "answer": "abc"}]), QAResult)


def test_progress_bars_count_questions_only_when_asked(capsys):
    codec = CharCodec()
    model = _bigram(codec, {}, default=codec.eos_id)
    quiet = evaluate_qa(model, codec, PAIRS)
    assert capsys.readouterr().err == ""
    shown = evaluate_qa(model, codec, PAIRS, progress=True)
    err = capsys.readouterr().err
    for phase in ("QA answers", "QA answer NLL"):
        assert f"{phase}: 100%" in err and "3/3 [" in err, err
    assert "question/s]" in err  # the rate; the elapsed and remaining time come before it
    assert shown == quiet
