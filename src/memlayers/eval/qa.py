"""Closed-book question answering: exact match of greedy answers and answer NLL.

Each question is shown as :func:`memlayers.data.text.qa_prompt` (after BOS when
the tokenizer has one); the gold answer follows after a space, as in
:func:`memlayers.data.text.qa_text`.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from memlayers.data.text import qa_prompt
from memlayers.eval.generate import generate, length_buckets
from memlayers.eval.lockstep import Ranks
from memlayers.eval.loglikelihood import score_continuations

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


class TextCodec(Protocol):
    """What evaluation needs from a tokenizer."""

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        ...

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the tokenizer has none."""
        ...

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with BOS first and EOS last."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of token ``ids``."""
        ...


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles
    a/an/the (whole words), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    """Whether ``prediction`` and ``gold`` are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(gold)


@dataclass
class QAResult:
    """Scores of :func:`evaluate_qa`.

    ``exact_match`` is the fraction of questions answered exactly;
    ``answer_nll`` the teacher-forced negative log-likelihood of the gold
    answers in nats per answer token (token-weighted over all questions);
    ``predictions`` has one dict per question with keys ``question``,
    ``answer``, ``prediction``, ``correct`` and ``nll`` (that question's mean
    NLL per answer token).
    """

    exact_match: float
    answer_nll: float
    n: int
    predictions: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The scalar scores (no predictions), e.g. for logging."""
        return {"exact_match": self.exact_match, "answer_nll": self.answer_nll, "n": self.n}


def _greedy_answers(
    model: nn.Module,
    ranks: Ranks,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    batch_size: int,
    progress: bool,
) -> list[list[int]]:
    """Per question, its greedy continuation (up to and including a stop id).

    Prompts of equal length share a batch; the ranks of ``ranks`` take turns
    at the batches, and every rank returns all the continuations.
    """
    batches = length_buckets([len(p) for p in prompts], batch_size)
    bar = ranks.progress(len(prompts), "QA answers", progress)
    mine: list[tuple[int, list[int]]] = []
    for indices in ranks.rounds(batches, bar):
        indices = indices or []  # a rank with no batch left still generates along, for nothing
        new = generate(model, [prompts[i] for i in indices], max_new_tokens, stop_ids=stop_ids, batch_size=batch_size)
        mine.extend(zip(indices, new, strict=True))
    bar.close()
    outputs: list[list[int]] = [[] for _ in prompts]
    for index, ids in ranks.gather(mine):
        outputs[index] = ids
    return outputs


def _answer_nll(
    model: nn.Module,
    ranks: Ranks,
    prompts: list[list[int]],
    answers: list[list[int]],
    batch_size: int,
    progress: bool,
) -> list[tuple[float, int]]:
    """Per question, the summed NLL (nats) of its answer tokens given its prompt, and their count.

    Each sequence is ``prompt + answer``, cropped on the left to
    ``model.config.max_seq_len + 1`` tokens (the model reads all but the
    last); sequences of equal length share a batch; the ranks of ``ranks``
    take turns at the batches, and every rank returns all the results.
    """
    max_len = model.config.max_seq_len
    sequences = [(p + a)[-(max_len + 1) :] for p, a in zip(prompts, answers, strict=True)]
    batches = length_buckets([len(s) for s in sequences], batch_size)
    bar = ranks.progress(len(sequences), "QA answer NLL", progress)
    mine: list[tuple[int, tuple[float, int]]] = []
    for indices in ranks.rounds(batches, bar):
        if indices is None:
            ranks.idle_forward(model)
            continue
        counts = [len(answers[i]) for i in indices]
        scores = score_continuations(model, [sequences[i] for i in indices], counts)
        for index, (log_prob, _), count in zip(indices, scores, counts, strict=True):
            mine.append((index, (-log_prob, count)))
    bar.close()
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for index, result in ranks.gather(mine):
        results[index] = result
    return results


def _encode(
    tokenizer: TextCodec, pairs: list[dict], max_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and gold answer ids of every pair; ValueError for a pair that cannot be scored."""
    if not pairs:
        raise ValueError("pairs is empty: nothing to evaluate")
    use_bos = tokenizer.bos_id is not None
    prompts = [tokenizer.encode(qa_prompt(pair["question"]), bos=use_bos) for pair in pairs]
    answers = [tokenizer.encode(" " + pair["answer"].strip()) for pair in pairs]
    for pair, answer in zip(pairs, answers, strict=True):
        if not pair["answer"].strip():
            raise ValueError(f"empty answer for question {pair['question']!r}")
        if not 1 <= len(answer) <= max_len:
            raise ValueError(
                f"answer {pair['answer']!r} has {len(answer)} tokens; "
                f"need 1 to max_seq_len = {max_len}"
            )
    return prompts, answers


@torch.no_grad()
def evaluate_qa(
    model: nn.Module,
    tokenizer: TextCodec,
    pairs: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    progress: bool = False,
) -> QAResult:
    """Exact match and gold-answer NLL of ``model`` on question/answer ``pairs``.

    ``pairs`` are dicts with ``"question"`` and ``"answer"``. Prompt ids are
    ``tokenizer.encode(qa_prompt(question), bos=True)`` (without BOS when
    ``tokenizer.bos_id`` is None); gold ids are ``tokenizer.encode(" " + answer)``
    (answer stripped, as in ``qa_text``).

    Exact match: greedy generation of up to ``max_new_tokens`` tokens, stopping
    at EOS (when the tokenizer has one, dropped before decoding); the decoded
    text is cut at its first newline, stripped and compared with the gold
    answer by :func:`exact_match`. Answer NLL: teacher-forced, in nats per
    answer token, computed in float32 or better. Both run batched, at most
    ``batch_size`` sequences of equal length at a time, with the model in eval
    mode; its train/eval mode is restored afterwards. ``progress`` shows a
    progress bar of each (on rank 0 of a torchrun job).

    A model sharded over the ranks of a process group (DTensor parameters)
    needs every rank to call this with the same pairs (checked): the ranks
    split the batches between them and each returns the result of all pairs,
    the same batches as in one process.
    """
    ranks = Ranks(model)
    try:
        prompts, answers = _encode(tokenizer, pairs, model.config.max_seq_len)
        error = None
    except ValueError as refused:
        prompts, answers, error = [], [], refused
    ranks.agree(error, same=repr((prompts, answers)).encode())
    eos = tokenizer.eos_id
    stop_ids = () if eos is None else (eos,)

    was_training = model.training
    model.eval()
    try:
        outputs = _greedy_answers(model, ranks, prompts, max_new_tokens, stop_ids, batch_size, progress)
        nlls = _answer_nll(model, ranks, prompts, answers, batch_size, progress)
    finally:
        model.train(was_training)

    predictions = []
    for pair, ids, (nll_sum, n_tokens) in zip(pairs, outputs, nlls, strict=True):
        if eos is not None and ids and ids[-1] == eos:
            ids = ids[:-1]
        text = tokenizer.decode(ids).split("\n", 1)[0].strip()
        predictions.append(
            {
                "question": pair["question"],
                "answer": pair["answer"],
                "prediction": text,
                "correct": exact_match(text, pair["answer"]),
                "nll": nll_sum / n_tokens,
            }
        )
    total_nll = math.fsum(s for s, _ in nlls)
    total_tokens = sum(n for _, n in nlls)
    return QAResult(
        exact_match=sum(p["correct"] for p in predictions) / len(predictions),
        answer_nll=total_nll / total_tokens,
        n=len(predictions),
        predictions=predictions,
    )
