"""The regression decision: pure functions over plain records (no pytest, no torch).

Exact metrics (FLOPs, CPU peak memory, the loss of a deterministic run, recorded values) compare one
value against one value with a relative tolerance. Timings compare samples against samples:

* the change is the Hodges-Lehmann estimate of the ratio ``now / baseline``: the median of all
  pairwise ratios ``now_i / base_j`` (the shift estimate of log times, so it is invariant to a common
  scale and robust to outlier steps);
* its 95% confidence interval comes from the order statistics of those pairwise ratios at the
  Mann-Whitney critical value (the interval that inverts the rank test);
* a timing regresses only when it is significantly slower **by more than the tolerance**: the
  one-sided Mann-Whitney U test of the new samples divided by ``1 + tolerance`` against the baseline
  samples rejects "not slower" at p < :data:`ALPHA` (a shifted null: a cell that is only noisily
  around the tolerance does not fail), and the estimated slowdown exceeds the tolerance. Improvements
  mirror this beyond ``1 / (1 + tolerance)`` (see :func:`ratio_bounds`).

Noise between processes and warm starts is what a within-run test cannot see: a run's samples are
tight while the next run sits elsewhere. A baseline written by ``--trainperf-update-baselines``
therefore keeps the median of each of several measurement rounds (separate warm starts, interleaved
across the cells); their spread, the standard deviation ``s`` of the log round medians, is the
cell's **noise band**. At compare time:

* the tolerance applied is ``max(tolerance, exp(NOISE_FACTOR * s) - 1)`` (:func:`effective_tolerance`);
* the **smallest detectable change** (:func:`detectable_change`) is the slowdown caught with
  :data:`POWER` probability, given the within-run uncertainty of the estimate and the band;
* across the cells of a grid the p-values are corrected by Benjamini-Hochberg
  (:func:`grid_reject`), so a grid of 36 cells does not get 36 chances of a false alarm.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from pytest_trainperf.records import (
    Breakdown,
    CellVerdict,
    Direction,
    Measurement,
    Metric,
    MetricVerdict,
    Outcome,
    Status,
    relative_change,
)
from pytest_trainperf.units import format_value

ALPHA = 0.05
"""Significance level of the one-sided timing test."""
CONFIDENCE = 0.95
"""Coverage of the reported interval of a timing change."""
MIN_SAMPLES = 3
"""Fewer samples than this on either side, or too few for the rank test to ever reach :data:`ALPHA`
(3 against 3 cannot: the smallest one-sided p is 1/C(6,3) = 0.05): timings fall back to the exact
rule on medians."""

COMPILE_TIME_TOLERANCE = 1.0
"""``compile_time`` (one figure a cell, dynamo's own clock) regresses beyond twice its baseline: a
compile depends on the process's history (the first compile of a process also loads the compiler's
modules) and on disk caches (Inductor's), so only a gross change is gated by default."""

DEFAULT_TOLERANCES: Mapping[str, float] = {
    "step_time": 0.10,
    "throughput": 0.10 / 1.10,  # follows step_time: see tolerance_for
    "data_time": 0.10,
    "compute_time": 0.10,
    "peak_memory": 0.005,
    "peak_memory_forecast": 0.005,
    "flops": 0.001,
    "loss": 0.002,
    "reserved_memory": math.inf,
    "sm_utilization": math.inf,
    "sm_utilization_max": math.inf,
    "memory_utilization": math.inf,
    "memory_utilization_max": math.inf,
    "cpu_utilization": math.inf,
    "mfu": math.inf,
    "peak_rss": math.inf,
    "graph_breaks": 0.0,
    "recompiles": 0.0,
    "unique_graphs": 0.0,
    "compile_time": COMPILE_TIME_TOLERANCE,
    **dict.fromkeys(("flops_fp64", "flops_fp32", "flops_tf32", "flops_bf16", "flops_fp16", "flops_fp8", "flops_other"),
                    math.inf),
    "host_syncs": 0.0,
    "ops": 0.0,
    "memory_traffic": 0.0,
    "low_precision_share": 0.0,
    "arithmetic_intensity": math.inf,
    "comm_calls": 0.0,
    "comm_bytes": 0.0,
    "straggler": math.inf,
    **dict.fromkeys(("memory_traffic_fp64", "memory_traffic_fp32", "memory_traffic_bf16", "memory_traffic_fp16",
                     "memory_traffic_fp8", "memory_traffic_other"), math.inf),
}
"""Relative tolerances of the built-in metrics. ``data_time`` and ``compute_time`` (the split of a
``trainperf.steps`` step into the wait for its batch and the loop's body) are gated like ``step_time``,
each on its own: ``tp.tolerance(step_time=math.inf)`` gates a loop on its compute alone.
``reserved_memory`` (CUDA), the utilizations (GPU through NVML, or the process's CPU), ``mfu``,
``peak_rss`` (the peak resident set size of an isolated cell's process) and the split of ``flops`` by
precision (``flops_bf16``...; ``flops`` itself is gated) are reported, not gated, unless a test gives
them a tolerance; a recorded metric without one gets :data:`RECORD_TOLERANCE`. A compiled cell's
``graph_breaks``, ``recompiles`` and ``unique_graphs`` are counts judged exactly (any rise regresses);
its ``compile_time`` by :data:`COMPILE_TIME_TOLERANCE`.

The exact work counts of the instrumented step (``host_syncs``, ``ops``, ``memory_traffic`` and
``low_precision_share``, :mod:`pytest_trainperf.measure.work`) are judged exactly: any change is a change
of the code that runs, never noise. Their split by dtype and ``arithmetic_intensity`` are reported.

A distributed cell's (``tp.ranks``) communication per step, ``comm_calls`` and ``comm_bytes``
(:mod:`pytest_trainperf.measure.comm`), is exact too; its ``straggler`` (the spread between its
slowest and fastest rank) is reported."""
RECORD_TOLERANCE = 0.01
"""Default relative tolerance of a metric recorded with ``trainperf.record``."""
NOISE_FACTOR = 3.0
"""How many band widths (standard deviations of the log round medians) a timing may move before it
counts as a change: a new process whose median is a normal draw from the band passes 99.9% of the
time; the rest is left to the within-run test, the grid correction and confirmation."""
POWER = 0.95
"""The detection probability at which :func:`detectable_change` is stated."""
TIMING_METRICS = ("step_time", "throughput", "data_time", "compute_time")
"""Metrics decided on samples, which a re-measurement may confirm or clear."""
BUILTIN_METRICS = tuple(DEFAULT_TOLERANCES)
"""The metric names measured by the plugin itself."""


def ratio_bounds(tolerance: float, direction: Direction) -> tuple[float, float]:
    """The ``now / baseline`` ratios beyond which a metric is worse, and better.

    Worse is ``1 + t`` for a lower-is-better metric and ``1 - t`` for a higher-is-better one; better
    is the reciprocal of worse, so the two gates are symmetric in log space and ``step_time`` and
    ``throughput`` (whose tolerance follows step time's) always agree, both ways.
    """
    if direction is Direction.HIGHER_IS_BETTER:
        worse = 1.0 - tolerance
        return worse, (1.0 / worse if worse > 0 else math.inf)
    worse = 1.0 + tolerance
    return worse, 1.0 / worse


def classify(change: float, tolerance: float, direction: Direction, significant_worse: bool = True,
              significant_better: bool = True) -> Status:
    """Status of a relative change beyond ``tolerance`` in the metric's direction."""
    if direction is Direction.EXACT:
        return Status.REGRESSED if abs(change) > tolerance and significant_worse else Status.UNCHANGED
    worse, better = ratio_bounds(tolerance, direction)
    ratio = 1.0 + change
    lower_is_better = direction is Direction.LOWER_IS_BETTER
    if (ratio > worse if lower_is_better else ratio < worse) and significant_worse:
        return Status.REGRESSED
    if (ratio < better if lower_is_better else ratio > better) and significant_better:
        return Status.IMPROVED
    return Status.UNCHANGED


def classify_nan(current: float, baseline: float) -> Status:
    """The status of a change that is no number (a NaN on either side): a value that became NaN
    regressed (a loss that diverged), one that stopped being NaN improved, NaN both times is unchanged."""
    if math.isnan(current):
        return Status.UNCHANGED if math.isnan(baseline) else Status.REGRESSED
    return Status.IMPROVED


def compare_exact(metric: Metric, baseline: float, tolerance: float) -> MetricVerdict:
    """Compare one exact value with its baseline value (a NaN on either side: :func:`classify_nan`)."""
    change = relative_change(metric.value, baseline)
    return MetricVerdict(
        name=metric.name,
        status=(classify_nan(metric.value, baseline) if math.isnan(change)
                else classify(change, tolerance, metric.direction)),
        current=metric.value,
        baseline=baseline,
        tolerance=tolerance,
        unit=metric.unit,
        direction=metric.direction,
        change=change,
    )


def normal_quantile(p: float) -> float:
    """The standard normal quantile at ``p`` (the standard library's, so that scipy loads only where a
    test of its own is needed, not with the plugin in every pytest run)."""
    return statistics.NormalDist().inv_cdf(p)


def hodges_lehmann_ratio(current: Sequence[float], baseline: Sequence[float],
                         confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The Hodges-Lehmann ratio ``current / baseline`` and its distribution-free interval.

    Returns ``(estimate, low, high)``. All samples must be positive.
    """
    x = np.log(np.asarray(current, dtype=float))
    y = np.log(np.asarray(baseline, dtype=float))
    diffs = np.sort(np.subtract.outer(x, y).ravel())
    m, n = len(x), len(y)
    estimate = float(np.median(diffs))
    z = normal_quantile(0.5 + confidence / 2)
    k = int(math.floor(m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)))
    k = min(max(k, 0), len(diffs) - 1)
    low, high = float(diffs[k]), float(diffs[len(diffs) - 1 - k])
    return math.exp(estimate), math.exp(low), math.exp(high)


def noise_band(rounds: Sequence[float]) -> float | None:
    """The standard deviation of the log round medians (None with fewer than two positive rounds)."""
    logs = [math.log(r) for r in rounds if r > 0]
    if len(logs) < 2:
        return None
    return float(np.std(logs, ddof=1))


def effective_tolerance(tolerance: float, noise: float | None, direction: Direction = Direction.LOWER_IS_BETTER,
                        factor: float = NOISE_FACTOR) -> float:
    """The tolerance a timing is judged by: the configured one, widened to ``factor`` band widths when
    the baseline's noise band is wider: ``exp(factor * noise) - 1`` for a time, the same ratio the
    other way, ``1 - exp(-factor * noise)``, for a rate (so step time and throughput still agree)."""
    if noise is None or not math.isfinite(tolerance):
        return tolerance
    if direction is Direction.HIGHER_IS_BETTER:
        return max(tolerance, -math.expm1(-factor * noise))
    return max(tolerance, math.expm1(factor * noise))


def detectable_change(tolerance: float, within: float, noise: float | None, rounds: int,
                      alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest relative slowdown caught with probability ``power``.

    ``within`` is the standard error of the log ratio estimated from the samples of this run (from
    the width of its interval), ``noise`` the baseline's band over ``rounds`` rounds. A new run's log
    ratio is modelled as normal around the true one, with variance ``within**2`` plus the band's
    ``noise**2 * (1 + 1/rounds)`` (a new process draws its own offset; the baseline median averages
    ``rounds`` of them). It is caught when it lies beyond ``log(1 + tolerance)`` by the one-sided
    test's margin ``z(1 - alpha) * within``, so the true log slowdown must be
    ``log(1 + tolerance) + z(1 - alpha) * within + z(power) * sqrt(within**2 + band**2)``, with
    Student's t for ``rounds - 1`` degrees of freedom in place of the normal ``z(power)`` when there is
    a band (it is estimated from few rounds).
    """
    from scipy import stats as sps  # on first use, not as the plugin loads

    band = (noise or 0.0) ** 2 * (1 + 1 / max(rounds, 1))
    z_alpha = normal_quantile(1 - alpha)
    # the band is estimated from a few rounds: Student's t with rounds - 1 degrees of freedom
    z_power = float(sps.t.ppf(power, rounds - 1) if band > 0 and rounds > 1 else normal_quantile(power))
    log_change = math.log1p(tolerance) + z_alpha * within + z_power * math.sqrt(within ** 2 + band)
    return math.expm1(log_change)


def grid_reject(p_values: Sequence[float], total: int, alpha: float = ALPHA) -> list[bool]:
    """Benjamini-Hochberg at false discovery rate ``alpha`` over a grid of ``total`` cells of which
    ``p_values`` are known so far; the cells not yet measured count as p = 1.

    Counting the unknown cells as 1 can only shrink the rejections (the procedure is monotone in
    every p-value), so a cell rejected now stays rejected whatever the rest of the grid brings; with
    every cell known this is plain Benjamini-Hochberg.
    """
    from scipy import stats as sps  # on first use, not as the plugin loads

    if not p_values:
        return []
    padded = list(p_values) + [1.0] * max(total - len(p_values), 0)
    adjusted = sps.false_discovery_control(np.asarray(padded, dtype=float), method="bh")
    return [bool(q < alpha) for q in adjusted[:len(p_values)]]


def _p_beyond(current: Sequence[float], baseline: Sequence[float], factor: float, alternative: str) -> float:
    """One-sided Mann-Whitney p-value that ``current / factor`` is still greater (or less) than
    ``baseline``: that the ratio lies beyond ``factor``. 1 when no ratio can (factor <= 0 or inf)."""
    from scipy import stats as sps  # on first use, not as the plugin loads

    if not 0 < factor < math.inf:
        return 1.0
    scaled = np.asarray(current, dtype=float) / factor
    return float(sps.mannwhitneyu(scaled, np.asarray(baseline, dtype=float), alternative=alternative).pvalue)


def compare_samples(metric: Metric, baseline: Sequence[float], tolerance: float,
                    alpha: float = ALPHA, rounds: Sequence[float] = ()) -> MetricVerdict:
    """Compare sampled timings with baseline samples (see the module docstring); ``rounds`` are the
    baseline's round medians, whose spread widens the tolerance."""
    current = metric.samples
    m, n = len(current), len(baseline)
    too_few = m < MIN_SAMPLES or n < MIN_SAMPLES or 1 / math.comb(m + n, m) >= alpha
    noise = noise_band(rounds)
    applied = effective_tolerance(tolerance, noise, metric.direction)
    configured = tolerance if applied != tolerance else None
    finite = all(math.isfinite(v) for v in (*current, *baseline))
    if too_few or not finite or min(*current, *baseline) <= 0:  # no statistics on these: the point values
        return replace(compare_exact(metric, float(np.median(baseline)), applied), noise=noise,
                       configured_tolerance=configured)
    ratio, low, high = hodges_lehmann_ratio(current, baseline)
    # "beyond tolerance" is the alternative of each test, not only the point estimate
    worse, better = ratio_bounds(applied, metric.direction)
    if metric.direction is Direction.HIGHER_IS_BETTER:
        p_worse = _p_beyond(current, baseline, worse, "less")
        p_better = _p_beyond(current, baseline, better, "greater")
    else:
        p_worse = _p_beyond(current, baseline, worse, "greater")
        p_better = _p_beyond(current, baseline, better, "less")
    change = ratio - 1.0
    status = classify(change, applied, metric.direction,
                       significant_worse=p_worse < alpha, significant_better=p_better < alpha)
    within = math.log(high / low) / (2 * normal_quantile(0.5 + CONFIDENCE / 2))
    higher = metric.direction is Direction.HIGHER_IS_BETTER
    slower = (1 / worse if worse > 0 else math.inf) if higher else worse  # as a time ratio
    slowdown = detectable_change(slower - 1, within, noise, len(rounds), alpha)
    return MetricVerdict(
        name=metric.name,
        status=status,
        current=metric.value,
        baseline=float(np.median(baseline)),
        tolerance=applied,
        unit=metric.unit,
        direction=metric.direction,
        change=change,
        interval=(low - 1.0, high - 1.0),
        p_value=p_worse,
        noise=noise,
        detectable=1 / (1 + slowdown) - 1 if higher else slowdown,
        configured_tolerance=configured,
    )


def tolerance_for(metric: Metric, overrides: Mapping[str, float]) -> float:
    """The tolerance of ``metric``: the test's override, else the recorded one, else the default.

    ``throughput`` is ``items / step_time``: unless given its own, its tolerance follows step time's,
    ``t / (1 + t)``, so that throughput falls beyond it exactly when step time rises beyond ``t``
    (10% slower steps are 9.1% less throughput) and loosening ``step_time`` loosens both. An
    infinite step-time tolerance (step time not gated) gives 1: no throughput fall is beyond it.
    """
    if metric.name in overrides:
        return overrides[metric.name]
    if metric.tolerance is not None:
        return metric.tolerance
    if metric.name == "throughput":
        return throughput_tolerance(overrides.get("step_time", DEFAULT_TOLERANCES["step_time"]))
    return DEFAULT_TOLERANCES.get(metric.name, RECORD_TOLERANCE)


def throughput_tolerance(step: float) -> float:
    """Throughput's tolerance that follows a step-time tolerance ``step``: ``step / (1 + step)``, and 1
    for an infinite one (not gated)."""
    return 1.0 if math.isinf(step) else step / (1.0 + step)


def judge_outcome(now: Outcome, before: Outcome | None) -> Status | None:
    """The verdict on how a cell ended against how its baseline ended; None when both were measured.

    An out-of-memory cell whose baseline ran out of memory too is expected (unchanged); one whose
    baseline was measured regressed; a cell measured now whose baseline ran out of memory improved;
    without a baseline it is new. A crash always regresses.
    """
    if now.died:
        return Status.REGRESSED
    if before is None:
        return Status.NEW if now is not Outcome.MEASURED else None
    if now is Outcome.MEASURED and before is Outcome.MEASURED:
        return None
    if now.out_of_memory and before.out_of_memory:
        return Status.UNCHANGED
    return Status.REGRESSED if now.out_of_memory else Status.IMPROVED


def _uncompared(metric: Metric, tolerance: float, status: Status) -> MetricVerdict:
    """The verdict on a metric with no baseline value to compare with."""
    return MetricVerdict(name=metric.name, status=status, current=metric.value, baseline=None,
                         tolerance=tolerance, unit=metric.unit, direction=metric.direction)


def judge(current: Measurement, baseline: Measurement | None,
          overrides: Mapping[str, float] | None = None) -> CellVerdict:
    """The verdict on every metric of ``current`` against ``baseline`` (None: everything is new), and
    on its outcome when it or its baseline ran out of memory (metrics are compared only when both
    were measured)."""
    overrides = overrides or {}
    outcome = judge_outcome(current.outcome, baseline.outcome if baseline is not None else None)
    if outcome is not None:
        verdicts = [_uncompared(m, tolerance_for(m, overrides), Status.NEW if baseline is None else Status.UNCHANGED)
                    for m in current.metrics]
        return CellVerdict(measurement=current, metrics=tuple(verdicts), outcome=outcome,
                           baseline_outcome=baseline.outcome if baseline is not None else None)
    verdicts = []
    for metric in current.metrics:
        tolerance = tolerance_for(metric, overrides)
        base = baseline.metric(metric.name) if baseline is not None else None
        if base is None:
            # a report-only metric the baseline lacks (peak_rss against a baseline written without
            # isolation) leaves the cell as it is, as it would with a baseline value: never "new"
            report_only = baseline is not None and math.isinf(tolerance)
            verdicts.append(_uncompared(metric, tolerance, Status.UNCHANGED if report_only else Status.NEW))
        elif metric.sampled and base.sampled:
            verdicts.append(compare_samples(metric, base.samples, tolerance, rounds=base.rounds))
        else:
            verdicts.append(with_growth(compare_exact(metric, base.value, tolerance), current, baseline))
    if baseline is not None and current.loss_curve and baseline.loss_curve:
        loss = current.metric("loss")  # the curve follows the final loss's tolerance
        tolerance = (tolerance_for(loss, overrides) if loss is not None
                     else overrides.get("loss", DEFAULT_TOLERANCES["loss"]))
        verdicts.append(compare_curve(current.loss_curve, baseline.loss_curve, tolerance))
    missing = () if baseline is None else tuple(n for n in baseline.names if current.metric(n) is None)
    return CellVerdict(measurement=current, metrics=tuple(verdicts), missing=missing,
                       baseline_outcome=baseline.outcome if baseline is not None else None)


GROWN_SHOWN = 8
"""The most parts of a breakdown a verdict lists as grown (the largest growths)."""


def grown_parts(now: Breakdown, before: Breakdown, limit: int = GROWN_SHOWN) -> tuple[str, ...]:
    """The parts of ``now`` that are new or larger than in ``before``, largest growth first, as
    ``+48 aten.copy_`` (amounts in the breakdown's unit); ``and N more`` past ``limit``. Parts named by
    a source line (``model.py:42 `x.item()` (aten._local_scalar_dense)``) are matched without their line
    number, so that a sync moved by an edit above it is not new."""
    old: dict[str, float] = {}
    for part, amount in before.parts:
        old[_unplaced(part)] = old.get(_unplaced(part), 0.0) + amount
    growth = []
    for part, amount in now.parts:
        key = _unplaced(part)
        if amount > old.get(key, 0.0):
            growth.append((amount - old.get(key, 0.0), part))
        old[key] = max(old.get(key, 0.0) - amount, 0.0)  # the same source text at two lines: each counted once
    growth.sort(key=lambda g: (-g[0], g[1]))
    shown = [f"+{_amount(delta, now.unit)} {part}" for delta, part in growth[:limit]]
    if len(growth) > limit:
        shown.append(f"and {len(growth) - limit} more")
    return tuple(shown)


_LINE = re.compile(r"^([^\s`]+):\d+ ")


def _unplaced(part: str) -> str:
    """A breakdown's part without the line number of its source site (``model.py `x.item()` ...``)."""
    return _LINE.sub(r"\1 ", part, count=1)


def _amount(value: float, unit: str) -> str:
    """A breakdown's amount: a count as an integer, anything else with its unit."""
    return str(int(value)) if not unit and value == int(value) else format_value(value, unit)


def with_growth(verdict: MetricVerdict, current: Measurement, baseline: Measurement | None) -> MetricVerdict:
    """``verdict`` with the parts of its metric's breakdown that appeared or grew since the baseline,
    when both sides have a breakdown and the metric changed."""
    now = current.breakdown(verdict.name)
    before = baseline.breakdown(verdict.name) if baseline is not None else None
    if now is None or before is None or verdict.status is Status.UNCHANGED and not verdict.change:
        return verdict
    return replace(verdict, grown=grown_parts(now, before), grown_label=now.label)


CURVE_WINDOW = 5
"""Steps per window of the loss-curve band: the curve is compared window by window on its means."""


def compare_curve(now: Sequence[float], before: Sequence[float], tolerance: float,
                  window: int = CURVE_WINDOW) -> MetricVerdict:
    """The loss curve against the baseline's: the ``loss_curve`` verdict.

    Both curves are cut into windows of ``window`` steps over their common length; the curve leaves
    its band at the first window whose mean moved beyond ``tolerance`` (relative, either way, as the
    final loss), and the verdict names the first step of that window that moved beyond it (``step``).
    ``current`` and ``baseline`` are the window means there (the last window's when the curve stayed).
    """
    n = min(len(now), len(before))
    last = (0.0, 0.0, 0.0)

    def beyond(change: float, a: float, b: float) -> bool:  # a curve that became NaN left its band
        return classify_nan(a, b) is Status.REGRESSED if math.isnan(change) else abs(change) > tolerance

    for start in range(0, n, window):
        a, b = float(np.mean(now[start:start + window])), float(np.mean(before[start:start + window]))
        change = relative_change(a, b)
        last = (a, b, change)
        if beyond(change, a, b):
            step = next((i for i in range(start, min(start + window, n))
                         if beyond(relative_change(now[i], before[i]), now[i], before[i])), start)
            return MetricVerdict(name="loss_curve", status=Status.REGRESSED, current=a, baseline=b,
                                 tolerance=tolerance, direction=Direction.EXACT, change=change, step=step)
    return MetricVerdict(name="loss_curve", status=Status.UNCHANGED, current=last[0], baseline=last[1],
                         tolerance=tolerance, direction=Direction.EXACT, change=last[2])


def correct_for_grid(verdict: CellVerdict, known: Mapping[str, Sequence[float]], total: int,
                     alpha: float = ALPHA) -> CellVerdict:
    """``verdict`` with each timing regression kept only if it survives :func:`grid_reject` among the
    p-values ``known`` so far for that metric in the same grid of ``total`` cells (a regression that
    does not survive becomes unchanged)."""
    metrics = []
    for m in verdict.metrics:
        if m.status is Status.REGRESSED and m.name in TIMING_METRICS and m.p_value is not None:
            if not grid_reject([*known.get(m.name, ()), m.p_value], total, alpha)[-1]:
                m = replace(m, status=Status.UNCHANGED)
        metrics.append(m)
    return replace(verdict, metrics=tuple(metrics))


def pool_rounds(first: Measurement, others: Sequence[Measurement]) -> Measurement:
    """``first`` with the samples of every sampled metric pooled with those of the other measurement
    rounds of the same cell, its value the median of the pool, and the median of each round kept as
    the noise band (``Metric.rounds``). Other metrics stay as first measured."""
    if not others:
        return first
    metrics = []
    for metric in first.metrics:
        extra = [m for m in (o.metric(metric.name) for o in others) if m is not None and m.sampled]
        if metric.sampled and extra:
            pooled = metric.samples + tuple(s for m in extra for s in m.samples)
            medians = tuple(float(np.median(m.samples)) for m in (metric, *extra))
            metric = replace(metric, value=float(np.median(pooled)), samples=pooled, rounds=medians)
        metrics.append(metric)
    return replace(first, metrics=tuple(metrics))
