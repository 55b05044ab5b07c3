"""Comparing versions of drivers, glibc and releases (core: the planner, the engines and the box)."""

from __future__ import annotations


def version_tuple(v: str) -> tuple[int, ...]:
    """'580.159.04' → (580, 159, 4); '2.39' → (2, 39): for comparing driver, glibc and release versions."""
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in str(v).split("."))
