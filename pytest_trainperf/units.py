"""Human-readable numbers with units: the one place values are formatted for people."""

from __future__ import annotations

import math

_BINARY = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_TIME = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))
_SI = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def _sig(x: float) -> str:
    """Three significant digits, without exponent for ordinary magnitudes."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def format_value(value: float, unit: str = "") -> str:
    """Format ``value`` in ``unit`` with a scaled prefix: ``34.1 ms``, ``12.0 MiB``, ``1.20 GFLOP``."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return f"{'-' if value < 0 else ''}inf {unit}".rstrip()
    if unit == "s":
        for name, scale in _TIME:
            if abs(value) >= scale or name == "ns":
                return f"{_sig(value / scale)} {name}"
    if unit == "B":
        for name, scale in _BINARY:
            if abs(value) >= scale:
                return f"{_sig(value / scale)} {name}"
        return f"{value:.0f} B"
    if unit in ("FLOP", "items/s") or unit.endswith("/s"):
        for prefix, scale in _SI:
            if abs(value) >= scale:
                return f"{_sig(value / scale)} {prefix}{unit}"
        return f"{_sig(value)} {unit}"
    if unit:
        return f"{value:.4g} {unit}"
    return f"{value:.4g}"
