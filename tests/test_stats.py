"""The regression decision, on synthetic samples: no pytest plugin, no torch."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_trainperf.fixture import timing_metrics
from pytest_trainperf.records import (
    CellVerdict,
    Direction,
    Measurement,
    Metric,
    MetricVerdict,
    Status,
)
from pytest_trainperf.stats import (
    ALPHA,
    DEFAULT_TOLERANCES,
    NOISE_FACTOR,
    RECORD_TOLERANCE,
    compare_curve,
    compare_exact,
    compare_samples,
    correct_for_grid,
    detectable_change,
    effective_tolerance,
    grid_reject,
    hodges_lehmann_ratio,
    judge,
    noise_band,
    pool_rounds,
)

FAST = settings(max_examples=60, deadline=None)

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> tuple[float, ...]:
    """``n`` positive samples around ``median`` with log-spread ``sigma``."""
    return tuple(float(v) for v in rng.lognormal(math.log(median), sigma, n))


def timing(samples: Sequence[float], name: str = "step_time", unit: str = "s",
           direction: Direction = Direction.LOWER_IS_BETTER) -> Metric:
    """A sampled metric whose value is the median of its samples, as the fixture builds it."""
    return Metric(name, statistics.median(samples), unit, direction, tuple(samples))


def cell(*metrics: Metric, kind: str = "train") -> Measurement:
    return Measurement(test="test_model", cell="batch_size=4", params=(("batch_size", 4),),
                       metrics=metrics, kind=kind, steps=20, warmup=3)


def of(verdict: CellVerdict, name: str) -> MetricVerdict:
    """The verdict on metric ``name``, which must be there."""
    found = verdict.metric(name)
    assert found is not None, f"no verdict on {name!r} among {[m.name for m in verdict.metrics]}"
    return found


# --------------------------------------------------------------------------- Hodges-Lehmann


@FAST
@given(current=st.lists(positive, min_size=1, max_size=25), baseline=st.lists(positive, min_size=1, max_size=25),
       scale=st.floats(min_value=1e-6, max_value=1e6))
def test_hodges_lehmann_ratio_is_invariant_to_a_common_scale(current: list[float], baseline: list[float],
                                                             scale: float) -> None:
    ratio, low, high = hodges_lehmann_ratio(current, baseline)
    s_ratio, s_low, s_high = hodges_lehmann_ratio([scale * v for v in current], [scale * v for v in baseline])

    assert s_ratio == pytest.approx(ratio, rel=1e-9)
    assert (s_low, s_high) == pytest.approx((low, high), rel=1e-9)
    assert low <= ratio <= high


def test_hodges_lehmann_interval_covers_the_true_ratio_at_its_nominal_rate() -> None:
    rng = np.random.default_rng(20240611)
    true_ratio = 1.25
    trials = 300
    covered = 0
    for _ in range(trials):
        baseline = lognormal(rng, 0.05, 0.1, 20)
        current = lognormal(rng, true_ratio * 0.05, 0.1, 20)
        _, low, high = hodges_lehmann_ratio(current, baseline)
        covered += low <= true_ratio <= high

    assert 0.90 <= covered / trials <= 0.99


# --------------------------------------------------------------------------- timings: the decision


@FAST
@given(samples=st.lists(positive, min_size=1, max_size=30), direction=st.sampled_from(Direction),
       tolerance=st.floats(min_value=0.0, max_value=10.0))
def test_identical_samples_never_regress_nor_improve(samples: list[float], direction: Direction,
                                                     tolerance: float) -> None:
    now = cell(timing(samples, direction=direction))
    before = cell(timing(samples, direction=direction))

    verdict = judge(now, before, {"step_time": tolerance})

    assert of(verdict, "step_time").status is Status.UNCHANGED
    assert verdict.status is Status.UNCHANGED


@FAST
@given(seed=seeds, sigma=st.floats(min_value=0.001, max_value=0.02), n_now=st.integers(8, 30),
       n_base=st.integers(8, 30), median=st.floats(min_value=1e-6, max_value=10.0))
def test_a_threefold_slowdown_of_tight_samples_regresses(seed: int, sigma: float, n_now: int, n_base: int,
                                                         median: float) -> None:
    rng = np.random.default_rng(seed)
    baseline = lognormal(rng, median, sigma, n_base)
    current = lognormal(rng, 3 * median, sigma, n_now)

    verdict = compare_samples(timing(current), baseline, DEFAULT_TOLERANCES["step_time"])

    assert verdict.status is Status.REGRESSED
    assert verdict.change == pytest.approx(2.0, abs=0.15)
    assert verdict.interval is not None and verdict.change is not None
    assert verdict.interval[0] <= verdict.change <= verdict.interval[1]
    assert verdict.p_value is not None and verdict.p_value < ALPHA


@FAST
@given(seed=seeds, sigma=st.floats(min_value=0.001, max_value=0.02), n_now=st.integers(8, 30),
       n_base=st.integers(8, 30), median=st.floats(min_value=1e-6, max_value=10.0))
def test_a_threefold_throughput_drop_of_tight_samples_regresses(seed: int, sigma: float, n_now: int,
                                                                n_base: int, median: float) -> None:
    rng = np.random.default_rng(seed)
    items = 64.0
    baseline = tuple(items / s for s in lognormal(rng, median, sigma, n_base))
    current = tuple(items / s for s in lognormal(rng, 3 * median, sigma, n_now))
    metric = timing(current, "throughput", "items/s", Direction.HIGHER_IS_BETTER)

    verdict = compare_samples(metric, baseline, DEFAULT_TOLERANCES["throughput"])

    assert verdict.status is Status.REGRESSED
    assert verdict.change == pytest.approx(-2 / 3, abs=0.05)
    assert verdict.interval is not None and verdict.change is not None
    assert verdict.interval[0] <= verdict.change <= verdict.interval[1]
    assert verdict.p_value is not None and verdict.p_value < ALPHA


def test_a_threefold_speedup_improves() -> None:
    rng = np.random.default_rng(3)
    baseline = lognormal(rng, 0.03, 0.01, 12)
    current = lognormal(rng, 0.01, 0.01, 12)

    verdict = compare_samples(timing(current), baseline, 0.10)

    assert verdict.status is Status.IMPROVED
    assert verdict.change == pytest.approx(-2 / 3, abs=0.02)


def test_a_significant_slowdown_below_tolerance_is_unchanged() -> None:
    rng = np.random.default_rng(7)
    baseline = lognormal(rng, 0.02, 0.005, 30)
    current = lognormal(rng, 0.021, 0.005, 30)

    verdict = compare_samples(timing(current), baseline, 0.10)

    assert verdict.interval is not None and verdict.interval[0] > 0  # significantly slower...
    assert verdict.p_value is not None and verdict.p_value > 0.5  # ...but surely not by more than 10%
    assert verdict.change == pytest.approx(0.05, abs=0.01)
    assert verdict.status is Status.UNCHANGED


def test_a_large_but_not_significant_slowdown_does_not_regress() -> None:
    current = (0.5, 4.0, 0.6, 5.0)
    baseline = (1.0, 1.1, 0.9, 1.2)

    verdict = compare_samples(timing(current), baseline, 0.10)

    assert verdict.change is not None and verdict.change > 0.10
    assert verdict.p_value is not None and verdict.p_value >= ALPHA
    assert verdict.status is not Status.REGRESSED


def test_too_few_samples_fall_back_to_the_exact_rule_on_medians() -> None:
    verdict = compare_samples(timing((2.0, 2.2)), (1.0, 1.1), 0.10)

    assert verdict.status is Status.REGRESSED
    assert verdict.baseline == pytest.approx(1.05)
    assert verdict.change == pytest.approx(2.1 / 1.05 - 1)
    assert verdict.interval is None
    assert verdict.p_value is None


def test_three_samples_a_side_still_catch_a_tenfold_slowdown() -> None:
    verdict = compare_samples(timing((10.0, 10.1, 10.2)), (1.0, 1.01, 1.02), 0.10)

    assert verdict.status is Status.REGRESSED


# --------------------------------------------------------------------------- exact metrics


@pytest.mark.parametrize(
    ("direction", "current", "expected"),
    [
        (Direction.LOWER_IS_BETTER, 110.1, Status.REGRESSED),
        (Direction.LOWER_IS_BETTER, 109.9, Status.UNCHANGED),
        # better is the reciprocal of worse: below 100 / 1.1 = 90.9, above 100 / 0.9 = 111.1
        (Direction.LOWER_IS_BETTER, 91.0, Status.UNCHANGED),
        (Direction.LOWER_IS_BETTER, 90.8, Status.IMPROVED),
        (Direction.HIGHER_IS_BETTER, 111.2, Status.IMPROVED),
        (Direction.HIGHER_IS_BETTER, 111.0, Status.UNCHANGED),
        (Direction.HIGHER_IS_BETTER, 90.1, Status.UNCHANGED),
        (Direction.HIGHER_IS_BETTER, 89.9, Status.REGRESSED),
        (Direction.EXACT, 110.1, Status.REGRESSED),
        (Direction.EXACT, 109.9, Status.UNCHANGED),
        (Direction.EXACT, 90.1, Status.UNCHANGED),
        (Direction.EXACT, 89.9, Status.REGRESSED),
    ],
)
def test_compare_exact_around_the_tolerance(direction: Direction, current: float, expected: Status) -> None:
    verdict = compare_exact(Metric("accuracy", current, "", direction), 100.0, 0.10)

    assert verdict.status is expected
    assert verdict.change == pytest.approx(current / 100.0 - 1)
    assert verdict.baseline == pytest.approx(100.0)
    assert verdict.tolerance == pytest.approx(0.10)
    assert verdict.direction is direction


def test_compare_exact_zero_against_a_zero_baseline_is_unchanged() -> None:
    verdict = compare_exact(Metric("flops", 0.0, "FLOP"), 0.0, 0.001)

    assert verdict.status is Status.UNCHANGED
    assert verdict.change == pytest.approx(0.0)


def test_compare_exact_from_a_zero_baseline_regresses_with_infinite_change() -> None:
    verdict = compare_exact(Metric("flops", 1.0, "FLOP"), 0.0, 0.001)

    assert verdict.status is Status.REGRESSED
    assert verdict.change is not None and math.isinf(verdict.change) and verdict.change > 0


def test_a_lower_loss_beyond_tolerance_regresses() -> None:
    loss = Metric("loss", 1.99, "", Direction.EXACT)

    verdict = judge(cell(loss), cell(Metric("loss", 2.0, "", Direction.EXACT)))

    assert of(verdict, "loss").status is Status.REGRESSED
    assert of(verdict, "loss").tolerance == pytest.approx(DEFAULT_TOLERANCES["loss"])


def test_a_lower_negative_value_improves() -> None:
    verdict = compare_exact(Metric("neg_log_likelihood", -2.0), -1.0, 0.01)

    assert verdict.change == pytest.approx(-1.0)
    assert verdict.status is Status.IMPROVED


# --------------------------------------------------------------------------- judge


def test_judge_without_baseline_makes_everything_new() -> None:
    now = cell(timing((0.01, 0.011, 0.012)), Metric("flops", 1e9, "FLOP"))

    verdict = judge(now, None)

    assert [m.status for m in verdict.metrics] == [Status.NEW, Status.NEW]
    assert all(m.baseline is None for m in verdict.metrics)
    assert verdict.status is Status.NEW
    assert verdict.missing == ()
    assert verdict.measurement is now


def test_judge_lists_baseline_metrics_not_measured_now() -> None:
    now = cell(Metric("flops", 1e9, "FLOP"))
    before = cell(Metric("flops", 1e9, "FLOP"), Metric("peak_memory", 2.0**20, "B"), Metric("accuracy", 0.9))

    verdict = judge(now, before)

    assert verdict.missing == ("peak_memory", "accuracy")
    assert [m.name for m in verdict.metrics] == ["flops"]


def test_judge_a_metric_new_to_an_existing_baseline_is_new() -> None:
    now = cell(Metric("flops", 1e9, "FLOP"), Metric("accuracy", 0.9, direction=Direction.HIGHER_IS_BETTER))

    verdict = judge(now, cell(Metric("flops", 1e9, "FLOP")))

    assert of(verdict, "flops").status is Status.UNCHANGED
    assert of(verdict, "accuracy").status is Status.NEW
    assert verdict.status is Status.NEW


@pytest.mark.parametrize(
    ("recorded", "overrides", "expected"),
    [
        (None, {}, DEFAULT_TOLERANCES["step_time"]),
        (0.3, {}, 0.3),
        (0.3, {"step_time": 0.05}, 0.05),
        (None, {"step_time": 0.05}, 0.05),
        (None, {"throughput": 0.05}, DEFAULT_TOLERANCES["step_time"]),
    ],
)
def test_tolerance_precedence(recorded: float | None, overrides: dict[str, float], expected: float) -> None:
    metric = Metric("step_time", 0.01, "s", tolerance=recorded)

    verdict = judge(cell(metric), cell(Metric("step_time", 0.01, "s")), overrides)

    assert of(verdict, "step_time").tolerance == pytest.approx(expected)


def test_a_recorded_metric_without_tolerance_gets_the_record_tolerance() -> None:
    metric = Metric("accuracy", 0.9, direction=Direction.HIGHER_IS_BETTER)

    verdict = judge(cell(metric, kind="record"), None)

    assert of(verdict, "accuracy").tolerance == pytest.approx(RECORD_TOLERANCE)


def test_an_override_decides_the_verdict() -> None:
    before = cell(Metric("flops", 100.0, "FLOP"))
    now = cell(Metric("flops", 105.0, "FLOP"))

    assert judge(now, before).status is Status.REGRESSED
    assert judge(now, before, {"flops": 0.10}).status is Status.UNCHANGED


@pytest.mark.parametrize("current", [0.0, 2.0**20, 100 * 2.0**30])
def test_reserved_memory_is_never_regressed_by_default(current: float) -> None:
    before = cell(Metric("reserved_memory", 2.0**30, "B"))

    verdict = judge(cell(Metric("reserved_memory", current, "B")), before)

    assert of(verdict, "reserved_memory").status is Status.UNCHANGED
    assert math.isinf(of(verdict, "reserved_memory").tolerance)


def test_report_only_metric_the_baseline_lacks_leaves_the_cell_unchanged() -> None:
    flops = Metric("flops", 100.0, "FLOP")
    before = cell(flops)

    verdict = judge(cell(flops, Metric("peak_rss", 2.0**30, "B")), before)

    assert of(verdict, "peak_rss").status is Status.UNCHANGED and of(verdict, "peak_rss").baseline is None
    assert verdict.status is Status.UNCHANGED
    # a gated metric the baseline lacks is still new, and so is every metric without a baseline
    assert judge(cell(flops, Metric("peak_rss", 1.0, "B"), Metric("extra", 1.0)), before).status is Status.NEW
    assert of(judge(cell(Metric("peak_rss", 1.0, "B")), None), "peak_rss").status is Status.NEW


def test_reserved_memory_from_zero_is_not_regressed_by_default() -> None:
    verdict = judge(cell(Metric("reserved_memory", 2.0**30, "B")), cell(Metric("reserved_memory", 0.0, "B")))

    assert of(verdict, "reserved_memory").status is Status.UNCHANGED


def test_reserved_memory_is_gated_when_a_test_gives_it_a_tolerance() -> None:
    before = cell(Metric("reserved_memory", 2.0**30, "B"))

    verdict = judge(cell(Metric("reserved_memory", 2.0**31, "B")), before, {"reserved_memory": 0.10})

    assert verdict.status is Status.REGRESSED


def _verdict(name: str, status: Status) -> MetricVerdict:
    return MetricVerdict(name=name, status=status, current=1.0, baseline=1.0, tolerance=0.1)


@pytest.mark.parametrize(
    ("statuses", "worst"),
    [
        ((), Status.NEW),
        ((Status.UNCHANGED,), Status.UNCHANGED),
        ((Status.UNCHANGED, Status.NEW), Status.NEW),
        ((Status.NEW, Status.IMPROVED, Status.UNCHANGED), Status.IMPROVED),
        ((Status.IMPROVED, Status.REGRESSED, Status.NEW), Status.REGRESSED),
        ((Status.UNCHANGED, Status.UNCHANGED, Status.REGRESSED), Status.REGRESSED),
    ],
)
def test_cell_status_is_the_worst_metric(statuses: tuple[Status, ...], worst: Status) -> None:
    verdict = CellVerdict(measurement=cell(), metrics=tuple(_verdict(f"m{i}", s) for i, s in enumerate(statuses)))

    assert verdict.status is worst
    assert verdict.regressions == tuple(m for m in verdict.metrics if m.status is Status.REGRESSED)


def test_judge_cell_status_is_the_worst_of_mixed_metrics() -> None:
    before = cell(Metric("flops", 100.0, "FLOP"), Metric("peak_memory", 1000.0, "B"),
                  Metric("accuracy", 0.9, direction=Direction.HIGHER_IS_BETTER))
    now = cell(Metric("flops", 100.0, "FLOP"), Metric("peak_memory", 900.0, "B"),
               Metric("accuracy", 0.5, direction=Direction.HIGHER_IS_BETTER), Metric("extra", 1.0))

    verdict = judge(now, before)

    assert [(m.name, m.status) for m in verdict.metrics] == [
        ("flops", Status.UNCHANGED), ("peak_memory", Status.IMPROVED),
        ("accuracy", Status.REGRESSED), ("extra", Status.NEW),
    ]
    assert verdict.status is Status.REGRESSED
    assert [m.name for m in verdict.regressions] == ["accuracy"]


# --------------------------------------------------------------------------- describe


def test_describe_a_timing() -> None:
    verdict = MetricVerdict(name="step_time", status=Status.REGRESSED, current=0.0345, baseline=0.03,
                            tolerance=0.10, unit="s", change=0.15, interval=(0.10, 0.20), p_value=0.0012)

    assert verdict.describe() == ("step_time: baseline 30.0 ms, now 34.5 ms, change +15.0% "
                                  "(tolerance 10.0%; 95% CI +10.0% to +20.0%; p=0.0012)")


def test_describe_an_exact_metric() -> None:
    verdict = MetricVerdict(name="loss", status=Status.REGRESSED, current=1.99, baseline=2.0, tolerance=0.002,
                            direction=Direction.EXACT, change=-0.005)

    assert verdict.describe() == "loss: baseline 2, now 1.99, change -0.5% (tolerance 0.2% either way)"


def test_describe_a_new_metric() -> None:
    verdict = MetricVerdict(name="flops", status=Status.NEW, current=1.2e9, baseline=None, tolerance=0.001,
                            unit="FLOP")

    assert verdict.describe() == "flops: 1.20 GFLOP (new: no baseline)"


def test_a_slowdown_only_noisily_beyond_tolerance_does_not_regress() -> None:
    """The estimate is past the tolerance but its interval reaches well below it: not a regression
    (the test is of 'slower by more than the tolerance', not of 'slower')."""
    rng = np.random.default_rng(13)  # a draw whose estimate is +14.9%, interval +3.3% to +27.5%
    baseline = lognormal(rng, 0.020, 0.15, 20)
    current = lognormal(rng, 0.0225, 0.15, 20)

    verdict = compare_samples(timing(current), baseline, 0.10)

    assert verdict.change is not None and verdict.change > 0.10
    assert verdict.interval is not None and verdict.interval[0] < 0.10
    assert verdict.status is Status.UNCHANGED


def timed_cell(samples: tuple[float, ...], items: float) -> Measurement:
    """A cell with the step_time and throughput metrics the fixture builds from these samples."""
    return Measurement(test="t", cell="c", params=(), metrics=tuple(timing_metrics(list(samples), items)))


def test_throughput_tolerance_follows_step_time() -> None:
    """Throughput falls beyond its tolerance exactly when step time rises beyond its own."""
    rng = np.random.default_rng(3)
    baseline = lognormal(rng, 0.02, 0.002, 20)
    current = tuple(v * 1.2 for v in lognormal(rng, 0.02, 0.002, 20))  # 20% slower steps
    items = 100.0

    for step_tolerance, expected in ((0.10, Status.REGRESSED), (0.30, Status.UNCHANGED)):
        verdict = judge(timed_cell(current, items), timed_cell(baseline, items), {"step_time": step_tolerance})
        step, rate = verdict.metric("step_time"), verdict.metric("throughput")
        assert step is not None and rate is not None
        assert step.status is expected and rate.status is expected
        assert rate.tolerance == pytest.approx(step_tolerance / (1 + step_tolerance))


def test_an_ungated_step_time_leaves_throughput_ungated_too() -> None:
    """step_time=inf (timing not gated) gives throughput a tolerance of 1 (not inf/inf = NaN): a
    threefold slowdown is unchanged on both figures."""
    rng = np.random.default_rng(4)
    baseline = lognormal(rng, 0.02, 0.002, 20)
    current = tuple(v * 3 for v in lognormal(rng, 0.02, 0.002, 20))

    verdict = judge(timed_cell(current, 100.0), timed_cell(baseline, 100.0), {"step_time": math.inf})

    step, rate = verdict.metric("step_time"), verdict.metric("throughput")
    assert step is not None and rate is not None
    assert rate.tolerance == 1.0
    assert step.status is Status.UNCHANGED and rate.status is Status.UNCHANGED


@pytest.mark.parametrize("change", [0.85, 0.88, 0.90, 0.92, 1.08, 1.12, 1.2])
def test_step_time_and_throughput_always_agree(change: float) -> None:
    """Whatever the change, the throughput verdict mirrors the step-time verdict (both ways)."""
    rng = np.random.default_rng(5)
    baseline = lognormal(rng, 0.02, 0.003, 20)
    current = tuple(v * change for v in lognormal(rng, 0.02, 0.003, 20))
    items = 64.0

    verdict = judge(timed_cell(current, items), timed_cell(baseline, items))
    step, rate = verdict.metric("step_time"), verdict.metric("throughput")
    assert step is not None and rate is not None
    assert step.status is rate.status


# --------------------------------------------------------------------------- the noise band


def test_noise_band_is_the_spread_of_log_round_medians() -> None:
    assert noise_band([]) is None
    assert noise_band([0.02]) is None
    rounds = [0.020, 0.022, 0.019, 0.021]
    assert noise_band(rounds) == pytest.approx(statistics.stdev(math.log(r) for r in rounds))
    assert noise_band([r * 1000 for r in rounds]) == pytest.approx(noise_band(rounds))


@pytest.mark.parametrize(("tolerance", "noise", "expected"), [
    (0.10, None, 0.10),
    (0.10, 0.01, 0.10),  # 3 band widths = 3%: the configured 10% is wider
    (0.10, 0.05, math.expm1(3 * 0.05)),  # 16.2%: the band is wider
    (math.inf, 0.5, math.inf),
])
def test_effective_tolerance_is_the_wider_of_configured_and_band(tolerance: float, noise: float | None,
                                                                  expected: float) -> None:
    assert effective_tolerance(tolerance, noise) == pytest.approx(expected)


@given(noise=st.floats(0.0, 1.0), step_tolerance=st.floats(0.0, 2.0))
def test_band_widened_step_time_and_throughput_tolerances_still_agree(noise: float, step_tolerance: float) -> None:
    step = effective_tolerance(step_tolerance, noise, Direction.LOWER_IS_BETTER)
    rate = effective_tolerance(step_tolerance / (1 + step_tolerance), noise, Direction.HIGHER_IS_BETTER)
    assert 1 + step == pytest.approx(1 / (1 - rate), rel=1e-9)


def test_a_wide_band_keeps_a_slowdown_inside_it_from_regressing() -> None:
    """A 25% slowdown with tight samples regresses against a quiet baseline, not against one whose
    rounds moved by 8% (3 band widths ~ 28%); the verdict says the tolerance was widened."""
    rng = np.random.default_rng(21)
    baseline = lognormal(rng, 0.020, 0.01, 40)
    current = tuple(v * 1.25 for v in lognormal(rng, 0.020, 0.01, 20))

    quiet = compare_samples(timing(current), baseline, 0.10, rounds=(0.0200, 0.0201, 0.0199))
    noisy = compare_samples(timing(current), baseline, 0.10, rounds=(0.018, 0.020, 0.022, 0.0205))

    assert quiet.status is Status.REGRESSED and quiet.configured_tolerance is None
    assert noisy.status is Status.UNCHANGED
    assert noisy.configured_tolerance == 0.10 and noisy.tolerance > 0.25
    assert noisy.noise is not None and noisy.detectable is not None and noisy.detectable > noisy.tolerance
    assert "widened from 10.0% by the baseline's noise band" in noisy.describe()


def test_detectable_change_grows_with_noise_and_starts_at_the_tolerance() -> None:
    assert detectable_change(0.10, 0.0, None, 5) == pytest.approx(0.10)
    small = detectable_change(0.10, 0.01, 0.01, 5)
    large = detectable_change(0.10, 0.01, 0.05, 5)
    assert 0.10 < small < large


def _run_of(rng: np.random.Generator, median: float, within: float, between: float, n: int) -> tuple[float, ...]:
    """One process's samples: its own offset from the band, then per-step noise around it."""
    return lognormal(rng, median * math.exp(rng.normal(0.0, between)), within, n)


def test_the_printed_detectable_change_is_caught_at_about_its_power_and_no_change_rarely_is() -> None:
    """On simulated lognormal steps with between-process offsets (the noise model of the band): a
    baseline of 5 rounds, then fresh processes. A slowdown of the detectable size each cell reports
    is caught in at least 90% of runs (95% nominal), and an unchanged process regresses in at most 2%."""
    rng = np.random.default_rng(7)
    within, between, steps, rounds = 0.04, 0.04, 20, 5
    caught, false_alarms, trials = 0, 0, 300
    for _ in range(trials):
        runs = [_run_of(rng, 0.03, within, between, steps) for _ in range(rounds)]
        baseline = tuple(s for run in runs for s in run)
        medians = tuple(statistics.median(run) for run in runs)
        unchanged = compare_samples(timing(_run_of(rng, 0.03, within, between, steps)), baseline, 0.10,
                                    rounds=medians)
        false_alarms += unchanged.status is Status.REGRESSED
        assert unchanged.detectable is not None
        slower = tuple(v * (1 + unchanged.detectable) for v in _run_of(rng, 0.03, within, between, steps))
        caught += compare_samples(timing(slower), baseline, 0.10, rounds=medians).status is Status.REGRESSED
    assert caught / trials >= 0.90
    assert false_alarms / trials <= 0.02


# --------------------------------------------------------------------------- the grid correction


@given(p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40))
def test_grid_reject_with_every_cell_known_is_benjamini_hochberg(p: list[float]) -> None:
    from scipy import stats as sps

    expected = [bool(q < ALPHA) for q in sps.false_discovery_control(np.asarray(p), method="bh")]
    assert grid_reject(p, len(p)) == expected


@given(p=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30), known=st.integers(1, 30))
def test_a_cell_rejected_early_stays_rejected_when_the_grid_completes(p: list[float], known: int) -> None:
    known = min(known, len(p))
    early = grid_reject(p[:known], len(p))
    final = grid_reject(p, len(p))
    assert all(f for e, f in zip(early, final, strict=False) if e)


def _regressed(p: float) -> CellVerdict:
    step = MetricVerdict(name="step_time", status=Status.REGRESSED, current=0.03, baseline=0.02,
                         tolerance=0.10, unit="s", change=0.5, interval=(0.3, 0.7), p_value=p)
    flops = MetricVerdict(name="flops", status=Status.REGRESSED, current=2.0, baseline=1.0, tolerance=0.001,
                          unit="FLOP", direction=Direction.LOWER_IS_BETTER, change=1.0)
    return CellVerdict(measurement=cell(), metrics=(step, flops))


def test_a_borderline_timing_regression_in_a_large_grid_is_not_a_discovery() -> None:
    """p = 0.01 is a regression alone, not as the first of 36 cells; p = 1e-6 is in either case.
    Exact metrics are never corrected."""
    alone = correct_for_grid(_regressed(0.01), {}, total=1)
    in_grid = correct_for_grid(_regressed(0.01), {"step_time": [0.5, 0.7]}, total=36)
    strong = correct_for_grid(_regressed(1e-6), {"step_time": [0.5, 0.7]}, total=36)

    assert of(alone, "step_time").status is Status.REGRESSED
    assert of(in_grid, "step_time").status is Status.UNCHANGED
    assert of(in_grid, "flops").status is Status.REGRESSED
    assert of(strong, "step_time").status is Status.REGRESSED


def test_pool_rounds_pools_samples_and_keeps_round_medians() -> None:
    first = cell(timing((1.0, 2.0, 3.0)), Metric("flops", 10.0, "FLOP"))
    second = cell(timing((4.0, 5.0, 6.0)))
    third = cell(timing((7.0, 8.0, 9.0)))

    pooled = pool_rounds(first, [second, third])

    step = pooled.metric("step_time")
    assert step is not None
    assert step.samples == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    assert step.rounds == (2.0, 5.0, 8.0)
    assert step.value == 5.0
    assert pooled.metric("flops") == Metric("flops", 10.0, "FLOP")
    assert pool_rounds(first, []) is first
    assert NOISE_FACTOR == 3.0


# --------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize(("now", "before", "expected"), [
    ("measured", None, None),
    ("measured", "measured", None),
    ("oom", None, Status.NEW),
    ("oom", "oom", Status.UNCHANGED),  # an expected OOM passes
    ("oom-emulated", "oom", Status.UNCHANGED),
    ("oom-killed", "oom-emulated", Status.UNCHANGED),
    ("oom", "measured", Status.REGRESSED),  # a new OOM fails
    ("oom-emulated", "measured", Status.REGRESSED),
    ("measured", "oom", Status.IMPROVED),  # an OOM that went away
    ("crashed", None, Status.REGRESSED),
    ("crashed", "oom", Status.REGRESSED),
])
def test_judge_outcome(now: str, before: str | None, expected: Status | None) -> None:
    from pytest_trainperf.records import Outcome
    from pytest_trainperf.stats import judge_outcome

    assert judge_outcome(Outcome(now), Outcome(before) if before else None) is expected


def test_an_oom_cell_against_a_measured_baseline_regresses_without_comparing_metrics() -> None:
    from dataclasses import replace

    from pytest_trainperf.records import Outcome

    measured = cell(timing((0.02,) * 10), Metric("peak_memory", 100.0, "B"))
    oom = replace(cell(Metric("peak_memory", 500.0, "B")), outcome=Outcome.OOM_EMULATED, detail="over budget")

    verdict = judge(oom, measured)
    assert verdict.status is Status.REGRESSED and verdict.outcome is Status.REGRESSED
    assert verdict.regressions == ()  # the outcome regressed, not a metric
    assert of(verdict, "peak_memory").baseline is None
    back = judge(measured, oom)
    assert back.status is Status.IMPROVED and back.baseline_outcome is Outcome.OOM_EMULATED
    assert judge(oom, oom).status is Status.UNCHANGED


# --------------------------------------------------------------------------- the loss-curve band


def test_an_identical_curve_stays_in_its_band() -> None:
    from pytest_trainperf.stats import compare_curve

    curve = [5.0 - 0.1 * i for i in range(23)]
    verdict = compare_curve(curve, list(curve), 0.002)
    assert verdict.status is Status.UNCHANGED and verdict.step is None and verdict.change == 0.0


def test_a_curve_that_departs_names_the_first_step_beyond_tolerance() -> None:
    from pytest_trainperf.stats import compare_curve

    before = [5.0 - 0.1 * i for i in range(23)]
    now = before[:12] + [v * 1.05 for v in before[12:]]  # 5% higher from step 12 on

    verdict = compare_curve(now, before, 0.002)

    assert verdict.status is Status.REGRESSED and verdict.step == 12
    assert verdict.change is not None and 0 < verdict.change < 0.05  # the mean of the window 10-14
    assert "loss_curve: left its band at step 12" in verdict.describe()


def test_a_lower_curve_regresses_too_and_a_change_within_tolerance_does_not() -> None:
    from pytest_trainperf.stats import compare_curve

    before = [2.0] * 20
    assert compare_curve([1.9] * 20, before, 0.002).step == 0
    assert compare_curve([2.001] * 20, before, 0.002).status is Status.UNCHANGED
    assert compare_curve([1.9] * 20, before, 0.1).status is Status.UNCHANGED


def test_judge_compares_the_curve_with_the_loss_tolerance() -> None:
    from dataclasses import replace

    before = replace(cell(Metric("loss", 1.0, "", Direction.EXACT)), loss_curve=(3.0, 2.0, 1.5, 1.2, 1.0, 1.0))
    now = replace(before, loss_curve=(3.0, 2.0, 1.5, 1.2, 1.1, 1.0))

    assert of(judge(now, before), "loss_curve").status is Status.REGRESSED
    assert of(judge(now, before, {"loss": 0.05}), "loss_curve").status is Status.UNCHANGED
    assert judge(now, None).metric("loss_curve") is None


# ------------------------------------------------------------------ NaN never turns the gate off (issue 18)


@pytest.mark.parametrize(("now", "before", "status"), [
    (math.nan, 0.5, Status.REGRESSED),   # a loss that diverged
    (0.5, math.nan, Status.IMPROVED),    # and came back
    (math.nan, math.nan, Status.UNCHANGED),
])
def test_a_nan_value_is_judged_not_waved_through(now: float, before: float, status: Status) -> None:
    verdict = compare_exact(Metric("loss", now, "", Direction.EXACT), before, 0.002)

    assert verdict.status is status


def test_nan_samples_fall_back_to_the_point_values_without_an_interval() -> None:
    now = Metric("step_time", math.nan, "s", samples=(0.01,) * 5 + (math.nan,) * 5)

    verdict = compare_samples(now, [0.01 + i * 1e-5 for i in range(10)], 0.1)

    assert verdict.status is Status.REGRESSED
    assert verdict.interval is None and verdict.p_value is None


def test_a_loss_curve_that_turns_nan_leaves_its_band_where_it_did() -> None:
    before = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3]
    verdict = compare_curve([*before[:6], math.nan, math.nan], before, 0.02, window=3)

    assert verdict.status is Status.REGRESSED and verdict.step == 6
