"""Byte counts for people: what the command line and the demo print."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units (1 KB = 1000 B), as ``du --si`` counts."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
