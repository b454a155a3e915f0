"""Pareto fronts over measured candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pareto_front(points: Sequence[dict[str, Any]], x: str, y: str, *, minimize_x: bool = True
                 ) -> list[dict[str, Any]]:
    """The points no other point beats on both ``x`` (smaller, or larger if not ``minimize_x``)
    and ``y`` (larger). Points missing either value are ignored. Sorted by ``x``."""
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    sign = 1 if minimize_x else -1
    pts.sort(key=lambda p: (sign * p[x], -p[y]))
    front, best = [], float("-inf")
    for p in pts:
        if p[y] > best:
            front.append(p)
            best = p[y]
    return front
