"""Hypothesis strategies every difftest target uses."""

from __future__ import annotations

from hypothesis import strategies as st


def weighted(*weights: int) -> st.SearchStrategy[int]:
    """Kind ``i`` with probability about ``weights[i] / sum(weights)``; shrinks toward
    kind 0. (Hypothesis draws the ends of a range far more often than the middle:
    the draw is spread over 0..999 by a permutation that keeps 0 at 0.)"""
    total = sum(weights)
    bounds = [sum(weights[:i + 1]) * 1000 // total for i in range(len(weights))]

    def kind(x: int) -> int:
        spread = x * 7919 % 1000
        return next(i for i, b in enumerate(bounds) if spread < b)

    return st.integers(0, 999).map(kind)
