"""Held-out metrics and the trivial baselines they are compared against (plain Python floats)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def accuracy(predicted: Sequence[object], expected: Sequence[object]) -> float:
    """Fraction of positions where `predicted` equals `expected` (exact match for strings)."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError(f"need equal, non-empty lists; got {len(predicted)} and {len(expected)}")
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)


def mae(predicted: Sequence[float], expected: Sequence[float]) -> float:
    """Mean absolute error."""
    _check(predicted, expected)
    return sum(abs(p - e) for p, e in zip(predicted, expected, strict=True)) / len(expected)


def rmse(predicted: Sequence[float], expected: Sequence[float]) -> float:
    """Root mean squared error."""
    _check(predicted, expected)
    squares = sum((p - e) ** 2 for p, e in zip(predicted, expected, strict=True))
    return math.sqrt(squares / len(expected))


def majority(train_labels: Sequence[object]) -> object:
    """The most common training label (ties: the first seen)."""
    if not train_labels:
        raise ValueError("no training labels")
    return Counter(train_labels).most_common(1)[0][0]


def _check(predicted: Sequence[float], expected: Sequence[float]) -> None:
    if len(predicted) != len(expected) or not expected:
        raise ValueError(f"need equal, non-empty lists; got {len(predicted)} and {len(expected)}")
