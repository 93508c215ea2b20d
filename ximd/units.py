"""Byte units and how ximd writes sizes, in one place.

Two families on purpose: the seed's sizes ("100 GB" cache, "16GB VRAM") are
decimal gigabytes like disk vendors count; memory the engine plans with is in
binary units (GiB, MiB) like vLLM and the kernel count.
"""

from __future__ import annotations

MIB = 1024 ** 2
GIB = 1024 ** 3
GB = 10 ** 9


def gb_text(value: float) -> str:
    """``value`` bytes in decimal gigabytes, as the seed writes sizes: ``16.1 GB``."""
    return f"{value / GB:.1f} GB"


def size_text(value: float) -> str:
    """A file's or a model's size: ``16.1 GB``, or megabytes below a tenth of a GB (``6.6 MB``),
    where gb_text would say ``0.0 GB``."""
    return gb_text(value) if value >= GB / 10 else f"{value / 10 ** 6:.1f} MB"


def gib_text(value: float) -> str:
    """``value`` bytes in GiB, or MiB below a tenth of a GiB: ``2.0 GiB``, ``64.0 MiB``."""
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / MIB:.1f} MiB"
