"""The judge's pure pieces that the plugin tests do not pin down exactly."""

from __future__ import annotations

import math

from pytest_trainperf import judge
from pytest_trainperf.records import Direction, Measurement, Metric


def rounds(*medians: float) -> list[Measurement]:
    """One measurement per round whose step-time samples have the given median."""
    return [Measurement(test="test_x", cell="default", params=(),
                        metrics=(Metric("step_time", m, "s", Direction.LOWER_IS_BETTER, (m * 0.99, m, m * 1.01)),))
            for m in medians]


def test_spreads_split_the_rounds_into_one_process_and_fresh_ones() -> None:
    line = judge.spreads({"a": rounds(1.0, 1.0, 1.2, 0.8, 1.0), "b": rounds(1.0, 1.1, 1.0)}, in_process=2)
    # a: within the log medians of 1.0, 1.0 (0); between 1.0 (the pool), 1.2, 0.8, 1.0
    logs = [0.0, math.log(1.2), math.log(0.8), 0.0]
    between_a = math.sqrt(sum((x - sum(logs) / 4) ** 2 for x in logs) / 3)
    within_b = abs(math.log(1.1)) / math.sqrt(2)
    assert line.startswith("the step times of this update's 2 cells spread ")
    assert f"±{within_b / 2:.1%} within a process (median; widest ±{within_b:.1%})" in line
    assert f"between processes (median; widest ±{between_a:.1%})" in line


def test_no_spread_line_without_rounds_in_fresh_processes() -> None:
    assert judge.spreads({"a": rounds(1.0, 1.1)}, in_process=2) == ""
    assert judge.spreads({}, in_process=2) == ""
