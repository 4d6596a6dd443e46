"""Argument checks shared by every module: numeric ranges and "did you mean" suggestions."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["check_range", "check_betas", "closest"]


def check_range(name: str, value: float, lo: float, hi: float | None) -> None:
    """``value`` must be a number in ``[lo, hi)`` (``hi`` None: no upper bound)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < lo or (hi is not None and value >= hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"invalid {name}: {value} (must be {bound})")


def check_betas(name: str, betas: Iterable[float]) -> None:
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0)


def closest(name: str, options: Iterable[str]) -> str:
    """' Did you mean X?' suffix for error messages, or ''."""
    m = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {m[0]!r}?" if m else ""
