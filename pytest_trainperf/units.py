"""Human-readable numbers with units: the one place values are formatted for people."""

from __future__ import annotations

import math
import re

_BINARY = (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))
_TIME = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))
_SI = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0))


def _sig(x: float) -> str:
    """Three significant digits, without exponent for ordinary magnitudes (rounded first); a short
    exponent (``2.00e9``) past 99999, where a shared heatmap scale leaves an outlier huge."""
    x = float(f"{x:.3g}")
    if x == 0:
        return "0"
    if abs(x) >= 1e5:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(x) < 0.01:
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _scales(unit: str) -> tuple[tuple[str, float], ...]:
    """``(label, factor)`` from the largest scale down, for the units that scale."""
    if unit == "s":
        return _TIME
    if unit == "B":
        return _BINARY
    if unit == "FLOP" or unit.endswith("/s"):
        return tuple((f"{prefix}{unit}", factor) for prefix, factor in _SI)
    return ((unit, 1.0),)


def _pick(magnitude: float, unit: str) -> tuple[str, float]:
    """The largest scale in which ``magnitude`` rounds to at least 1 (the smallest otherwise)."""
    scales = _scales(unit)
    for name, factor in scales:
        if abs(float(_sig(magnitude / factor))) >= 1:
            return name, factor
    return scales[-1]


def format_value(value: float, unit: str = "") -> str:
    """Format ``value`` in ``unit`` with a scaled prefix: ``34.1 ms``, ``12.0 MiB``, ``1.20 GFLOP``."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return f"{'-' if value < 0 else ''}inf {unit}".rstrip()
    if unit == "B" and abs(round(value)) < 1024:
        return f"{value:.0f} B"
    if len(_scales(unit)) == 1:
        return f"{value:.4g} {unit}".rstrip()
    label, factor = _pick(value, unit)
    return f"{in_scale(value, factor)} {label}"


def common_scale(values: list[float], unit: str) -> tuple[str, float]:
    """One display unit for a set of values (a heatmap's cells): the one :func:`format_value` picks
    for their median magnitude. Returns ``(unit label, factor)``; show values with :func:`in_scale`."""
    finite = sorted(abs(v) for v in values if math.isfinite(v))
    if not finite:
        return unit, 1.0
    return _pick(finite[len(finite) // 2], unit)


def in_scale(value: float, factor: float) -> str:
    """``value`` divided by a :func:`common_scale` factor, to three significant digits."""
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("-inf" if value < 0 else "inf")
    return _sig(value / factor)


_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


MAX_SIZE_CHARS = 64
"""The longest size text read (a size is a handful of characters; this bounds the work on any input)."""
MAX_SIZE = 2**63
"""Sizes must be below this many bytes (8 EiB): beyond any device, and within a 64-bit integer."""
SIZE_EXPECTED = "a size of at least 1 byte (and below 8 EiB) such as 24GiB, 512MiB, 1.5GB or a number of bytes"
"""What :func:`parse_size` accepts, for messages."""


def parse_size(text: str) -> int:
    """A memory size: ``24GiB``, ``512 MiB``, ``1.5GB``, ``1048576`` (bytes), at least one byte and
    below :data:`MAX_SIZE`. Raises ValueError with the expected form and the text received otherwise
    (``0``, ``0.5``, ``1e400``, ``-1``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text[:MAX_SIZE_CHARS + 1])
    unit = match.group(2).lower() if match else ""
    size = float(match.group(1)) * _SIZE_UNITS[unit] if match and unit in _SIZE_UNITS else math.nan
    if len(text) > MAX_SIZE_CHARS or not 1 <= size < MAX_SIZE:
        raise ValueError(f"expected {SIZE_EXPECTED}, got {text[:MAX_SIZE_CHARS]!r}"
                         f"{'...' if len(text) > MAX_SIZE_CHARS else ''}")
    return int(size)
