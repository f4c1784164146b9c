"""Text formats shared by training data and evaluation."""

from __future__ import annotations

QA_SEPARATOR = "\nAnswer:"


def qa_prompt(question: str) -> str:
    """The prompt a model sees for a question; the answer follows after a space."""
    return f"Question: {question.strip()}{QA_SEPARATOR}"


def qa_text(question: str, answer: str) -> str:
    """A question and its answer as one training document."""
    return f"{qa_prompt(question)} {answer.strip()}"
