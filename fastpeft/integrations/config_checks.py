"""Checks shared by fastpeft's own config dataclasses (bottleneck / invertible adapters, probing)."""

from __future__ import annotations


def is_int(v) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a valid size or index here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_reduction_factor(value) -> None:
    """``reduction_factor`` (hidden / bottleneck width) must be a positive int or float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"reduction_factor must be a number > 0, got {value!r}")
