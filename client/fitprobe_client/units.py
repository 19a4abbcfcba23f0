"""Sizes as people read them. Here, not in probe/, because the client prints them without torch."""

from __future__ import annotations


def format_bytes(n_bytes: int | float | None) -> str:
    """Human-readable size with binary units, as nvidia-smi and the allocator report them."""
    if n_bytes is None:
        return "-"
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.2f}TiB"
