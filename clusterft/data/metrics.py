"""The demo task's metric: exact match of the generated answer with the reference."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Collapse runs of whitespace and strip the ends: "  4 2\\n" and "4 2" are the same answer."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether `prediction` equals `reference` up to whitespace."""
    return normalize_answer(prediction) == normalize_answer(reference)
