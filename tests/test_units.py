"""Numbers for people: format_value and format_change."""

from __future__ import annotations

import math

import pytest

from pytest_trainperf.records import format_change
from pytest_trainperf.units import format_value, in_scale, parse_size

MIB = 2.0**20
GIB = 2.0**30


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        # seconds: ns .. s
        (1.5e-9, "s", "1.50 ns"),
        (2.5e-6, "s", "2.50 µs"),
        (0.0341, "s", "34.1 ms"),
        (1.5, "s", "1.50 s"),
        (120.0, "s", "120 s"),
        (-0.25, "s", "-250 ms"),
        # bytes: B, KiB, MiB, GiB
        (0.0, "B", "0 B"),
        (512.0, "B", "512 B"),
        (1536.0, "B", "1.50 KiB"),
        (12 * MIB, "B", "12.0 MiB"),
        (3.5 * GIB, "B", "3.50 GiB"),
        # FLOP and rates: SI prefixes
        (500.0, "FLOP", "500 FLOP"),
        (3e3, "FLOP", "3.00 kFLOP"),
        (1.2e9, "FLOP", "1.20 GFLOP"),
        (2.5e12, "FLOP", "2.50 TFLOP"),
        (1234.5, "items/s", "1.23 kitems/s"),
        (12.0, "items/s", "12.0 items/s"),
        (0.5, "items/s", "0.50 items/s"),
        (2.5e6, "tokens/s", "2.50 Mtokens/s"),
        # a user unit, no unit: four significant digits
        (0.8765, "acc", "0.8765 acc"),
        (12345.6, "tok", "1.235e+04 tok"),
        (2.0, "", "2"),
        (0.123456, "", "0.1235"),
    ],
)
def test_format_value(value: float, unit: str, expected: str) -> None:
    assert format_value(value, unit) == expected


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (math.nan, "s", "nan"),
        (math.nan, "", "nan"),
        (math.inf, "s", "inf s"),
        (-math.inf, "B", "-inf B"),
        (math.inf, "", "inf"),
    ],
)
def test_format_value_of_non_finite_numbers(value: float, unit: str, expected: str) -> None:
    assert format_value(value, unit) == expected


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (9996.0, "FLOP", "10.0 kFLOP"),
        (999960.0, "FLOP", "1.00 MFLOP"),
        (0.9996, "s", "1.00 s"),
        (0.0009996, "s", "1.00 ms"),
        (9.996e-7, "s", "1.00 µs"),
        (1048565.76, "B", "1.00 MiB"),
        (1023.4, "B", "1023 B"),
    ],
)
def test_format_value_rounds_before_choosing_the_scale(value: float, unit: str, expected: str) -> None:
    assert format_value(value, unit) == expected


def test_format_value_rounds_up_into_kibibytes() -> None:
    assert format_value(1023.6, "B") == "1.00 KiB"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (0.123, "+12.3%"),
        (-0.004, "-0.4%"),
        (0.0, "+0.0%"),
        (1.5, "+150%"),
        (-1.0, "-100%"),
        (10.0, "+1000%"),
        (math.inf, "+inf%"),
        (-math.inf, "-inf%"),
        (math.nan, "nan%"),  # not "+nan%"
    ],
)
def test_format_change(change: float, expected: str) -> None:
    assert format_change(change) == expected


def test_format_change_rounds_before_choosing_the_precision() -> None:
    assert format_change(0.9996) == "+100%"


@pytest.mark.parametrize(
    ("value", "factor", "expected"),
    [
        (0.0341, 1e-3, "34.1"),
        (99999.0, 1.0, "1.00e5"),  # rounds to three digits first
        (2.0, 1e-9, "2.00e9"),  # an outlier in a table scaled for nanoseconds stays short
        (-3.5e7, 1.0, "-3.50e7"),
        (math.inf, 1.0, "inf"),
    ],
)
def test_in_scale_keeps_huge_outliers_short(value: float, factor: float, expected: str) -> None:
    assert in_scale(value, factor) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30),
    ("512 MiB", 512 * 2**20),
    ("1.5GB", 1_500_000_000),
    ("1048576", 2**20),
    ("64kib", 64 * 1024),
    ("2e3B", 2000),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "12 parsecs", "GiB", "0.5", "0.9B", "1e400", "1e400GiB",
                                  "9" * 5000, "8EB" * 100, "16777216TiB"])
def test_parse_size_refuses_what_is_not_a_positive_size(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a size of at least 1 byte \(and below 8 EiB\) such as 24GiB"):
        parse_size(text)
