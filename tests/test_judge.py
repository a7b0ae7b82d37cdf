"""The judge's pure pieces that the plugin tests do not pin down exactly."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pytest_trainperf import judge
from pytest_trainperf.records import (
    Direction,
    Figure,
    FigureKind,
    FigureVerdict,
    Measurement,
    Metric,
    MetricVerdict,
    Status,
)


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


def timed(median: float, rounds: tuple[float, ...] = ()) -> Measurement:
    samples = tuple(median * (1 + d) for d in (-0.004, -0.002, 0.0, 0.0, 0.002, 0.004) * 4)
    return Measurement(test="test_x", cell="default", params=(),
                       metrics=(Metric("step_time", median, "s", Direction.LOWER_IS_BETTER, samples, rounds=rounds),))


def test_the_screen_suspects_a_slowdown_that_the_stored_noise_band_hides() -> None:
    """A baseline whose rounds spread ±10% widens the stored tolerance past 30%: 5% slower passes the
    stored verdict, and is still sent to side-by-side confirmation. So is the same step time: a band
    that wide cannot clear a +5% change, only a side-by-side comparison can."""
    from pytest_trainperf.records import Status

    baseline = timed(1.0, rounds=(0.9, 1.0, 1.1, 1.0, 0.95))
    slower = timed(1.05)
    assert judge.cell(slower, baseline, {}).status is Status.UNCHANGED
    assert judge.suspect(slower, baseline, {})
    assert judge.suspect(timed(1.0), baseline, {})
    assert not judge.suspect(slower, baseline, {"step_time": 0.25})  # the test's own tolerance rules
    assert not judge.suspect(slower, baseline, {"step_time": math.inf, "throughput": math.inf})  # not gated


def test_the_screen_passes_what_a_tight_band_clears_and_flags_a_slowdown_within_the_tolerance() -> None:
    """With rounds that agree to ±0.5%, the same step time passes the screen and +4.5% (inside the
    stored verdict's 10% tolerance) is sent to confirmation."""
    from pytest_trainperf.records import Status

    baseline = timed(1.0, rounds=(0.995, 1.0, 1.005, 1.0, 0.998))
    assert not judge.suspect(timed(1.0), baseline, {})
    assert not judge.suspect(timed(1.01), baseline, {})
    assert judge.cell(timed(1.045), baseline, {}).status is Status.UNCHANGED
    assert judge.suspect(timed(1.045), baseline, {})
    assert not judge.suspect(timed(0.995), baseline, {})


def test_the_screen_suspects_a_cell_faster_than_the_band_allows() -> None:
    """A runner 30% faster than the baseline's hides a +10% commit under its head start: 0.77 of the stored
    time passes the stored verdict (improved, not regressed), and the screen sends it to confirmation,
    since no new process on the baseline's machine runs that fast by the band. So does 10% faster with a
    tight band; a wide band (±10%) lets 10% faster through, as it does the same time."""
    from pytest_trainperf.records import Status

    tight = timed(1.0, rounds=(0.995, 1.0, 1.005, 1.0, 0.998))
    hidden = timed(0.7 * 1.1)
    assert judge.cell(hidden, tight, {}).status is not Status.REGRESSED
    assert judge.suspect(hidden, tight, {})
    assert judge.suspect(timed(0.9), tight, {})
    wide = timed(1.0, rounds=(0.9, 1.0, 1.1, 1.0, 0.95))
    assert not judge.suspect(timed(0.9), wide, {"step_time": 0.25})
    assert not judge.suspect(timed(1.0), wide, {"step_time": 0.25})
    assert judge.suspect(timed(0.7), wide, {"step_time": 0.25})
    assert not judge.suspect(timed(0.7), wide, {"step_time": math.inf, "throughput": math.inf})  # not gated


def test_the_screen_threshold_falls_as_the_band_widens() -> None:
    """The threshold is tolerance + margin with no spread, and drops below a ratio of 1 once the band is
    too wide for a stored comparison to clear a slowdown of that size."""
    assert judge.screen_threshold(0.0, None, 0, 0.02) == pytest.approx(1 + 0.02 + judge.SCREEN_MARGIN)
    assert 1.0 < judge.screen_threshold(0.002, 0.005, 5, 0.02) < 1.05
    assert judge.screen_threshold(0.002, 0.05, 5, 0.02) < 1.0



def test_the_screen_floor_falls_as_the_band_widens() -> None:
    """The floor is 1 with no spread (any faster cell is suspect), lies below the threshold by the margin
    and the tolerance, and falls with the band."""
    assert judge.screen_floor(0.0, None, 0) == pytest.approx(1.0)
    assert judge.screen_floor(0.002, 0.05, 5) < judge.screen_floor(0.002, 0.005, 5) < 1.0
    assert judge.screen_threshold(0.002, 0.005, 5, 0.02) / judge.screen_floor(0.002, 0.005, 5) == pytest.approx(
        1 + 0.02 + judge.SCREEN_MARGIN)


def test_a_runner_beyond_the_window_makes_every_later_cell_suspect() -> None:
    """A cell whose own ratio lies in the screen's window passes it, unless the session's earlier cells ran,
    by their median, outside that window too: then its ratio is the runner's head start and its change
    together, and it is sent to confirmation. A runner inside the window changes nothing."""
    tight = timed(1.0, rounds=(0.995, 1.0, 1.005, 1.0, 0.998))
    assert not judge.suspect(timed(1.01), tight, {})
    assert not judge.suspect(timed(1.01), tight, {}, runner=1.0)
    assert not judge.suspect(timed(1.01), tight, {}, runner=1.01)
    assert judge.suspect(timed(1.01), tight, {}, runner=0.8)  # a runner 20% faster than the baselines'
    assert judge.suspect(timed(1.01), tight, {}, runner=1.3)  # one 30% slower
    assert not judge.suspect(timed(1.01), tight, {"step_time": math.inf, "throughput": math.inf}, runner=0.8)


def figure_verdict(direction: Direction = Direction.LOWER_IS_BETTER) -> FigureVerdict:
    """A relative figure that regressed against its stored baseline: +100% now, -60% stored."""
    now = Figure(kind=FigureKind.RELATIVE, metric="step_time", axis="variant", cell="variant=heavy",
                 reference="plain", value=1.0, params=(("variant", "heavy"),), direction=direction)
    before = replace(now, value=-0.6)
    return FigureVerdict(figure=now, status=Status.REGRESSED, tolerance=0.05, baseline=before, change=4.0)


def paired(change: float, low: float, high: float, name: str = "step_time") -> MetricVerdict:
    return MetricVerdict(name=name, status=Status.UNCHANGED, current=1.0, baseline=1.0, tolerance=0.02,
                         change=change, interval=(low, high))


def test_a_figure_side_by_side_moves_by_the_ratio_of_its_cells_paired_changes() -> None:
    # both cells read 10% slower than the reference commit (this runner, that day): the figure did not move
    same = judge.side_by_side_figure(figure_verdict(), paired(0.10, 0.08, 0.12), paired(0.10, 0.08, 0.12),
                                     "abc123", 0.05)
    assert same.status is Status.UNCHANGED and same.confirmed_against == "abc123"
    assert same.side_change == pytest.approx(0.0)
    assert same.change == 4.0 and same.baseline is not None and same.baseline.value == -0.6  # the stored stage kept
    # the two intervals combine in log space: each half-width is 1.96 standard errors, so is their root sum
    half = math.log(1.12 / 1.08) / 2
    assert same.side_interval == pytest.approx((math.exp(-math.hypot(half, half)) - 1,
                                                math.exp(math.hypot(half, half)) - 1))
    # the variant 60% slower, the reference unchanged: regressed beyond 50%
    slower = judge.side_by_side_figure(figure_verdict(), paired(0.60, 0.55, 0.65), paired(0.0, -0.02, 0.02),
                                       "abc123", 0.5)
    assert slower.status is Status.REGRESSED and slower.side_change == pytest.approx(0.60)
    assert "side by side with abc123: the ratio moved +60.0% (95% CI +5" in slower.describe()
    # beyond the tolerance, but the interval reaches below no move: not a regression
    unsure = judge.side_by_side_figure(figure_verdict(), paired(0.08, -0.10, 0.30), paired(0.0, -0.10, 0.10),
                                       "abc123", 0.05)
    assert unsure.status is Status.UNCHANGED
    # a rate (throughput) is worse lower
    rate = judge.side_by_side_figure(figure_verdict(Direction.HIGHER_IS_BETTER),
                                     paired(-0.4, -0.42, -0.38, "throughput"), paired(0.0, -0.01, 0.01, "throughput"),
                                     "abc123", 0.2)
    assert rate.status is Status.REGRESSED and rate.side_change == pytest.approx(-0.4)


def test_a_figure_without_intervals_side_by_side_keeps_its_verdict() -> None:
    verdict = figure_verdict()
    bare = MetricVerdict(name="step_time", status=Status.UNCHANGED, current=1.0, baseline=1.0, tolerance=0.02,
                         change=0.0)
    assert judge.side_by_side_figure(verdict, bare, paired(0.0, -0.01, 0.01), "abc123", 0.05) is verdict


def test_a_relative_figure_s_cells_are_its_variant_and_its_reference() -> None:
    def cell(variant: str, batch: int) -> Measurement:
        return Measurement(test="test_x", cell=f"batch={batch}-variant={variant}",
                           params=(("batch", batch), ("variant", variant)), metrics=())

    cells = [cell(v, b) for b in (2, 4) for v in ("plain", "heavy")]
    figure = Figure(kind=FigureKind.RELATIVE, metric="step_time", axis="variant", cell="batch=4-variant=heavy",
                    reference="plain", value=1.0, params=(("batch", 4), ("variant", "heavy")))
    variant, reference = judge.figure_cells(figure, cells)
    assert variant is cells[3] and reference is cells[2]


def test_a_scaling_fit_side_by_side_moves_by_the_slope_of_its_cells_paired_changes() -> None:
    now = Figure(kind=FigureKind.SCALING, metric="step_time", axis="n", cell="default", reference="n", value=1.0,
                 interval=(0.9, 1.1))
    verdict = FigureVerdict(figure=now, status=Status.REGRESSED, tolerance=0.25, baseline=replace(now, value=0.0),
                            change=1.0)
    xs = (1.0, 2.0, 4.0, 8.0)
    # every cell reads 30% slower side by side (this runner): no move of the exponent
    flat = judge.side_by_side_scaling(verdict, [(x, paired(0.30, 0.28, 0.32)) for x in xs], "abc123", 0.25)
    assert flat.status is Status.UNCHANGED and flat.side_change == pytest.approx(0.0, abs=1e-9)
    assert flat.confirmed_against == "abc123" and flat.change == 1.0
    # each cell slower in proportion to its x: the exponent moved by +1
    grown = judge.side_by_side_scaling(verdict, [(x, paired(x - 1, x - 1.1, x - 0.9)) for x in xs], "abc123", 0.25)
    assert grown.status is Status.REGRESSED and grown.side_change == pytest.approx(1.0)
    assert "side by side with abc123: the exponent moved +1.00 (95% CI +1.00 to +1.00)" in grown.describe()
    # fewer than three distinct x: no fit, the verdict stands
    assert judge.side_by_side_scaling(verdict, [(1.0, paired(0.0, -0.01, 0.01))] * 3, "abc123", 0.25) is verdict
