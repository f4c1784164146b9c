"""Evaluation: generation, closed-book QA (exact match, answer NLL) and perplexity."""

from memlayers.eval.generate import generate
from memlayers.eval.perplexity import evaluate_perplexity
from memlayers.eval.qa import QAResult, TextCodec, evaluate_qa, exact_match, normalize_answer

__all__ = [
    "QAResult",
    "TextCodec",
    "evaluate_perplexity",
    "evaluate_qa",
    "exact_match",
    "generate",
    "normalize_answer",
]
