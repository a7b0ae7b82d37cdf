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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

from pytest_trainperf.records import (
    CellVerdict,
    Direction,
    Measurement,
    Metric,
    MetricVerdict,
    Status,
    relative_change,
)

ALPHA = 0.05
"""Significance level of the one-sided timing test."""
CONFIDENCE = 0.95
"""Coverage of the reported interval of a timing change."""
MIN_SAMPLES = 3
"""Fewer samples than this on either side, or too few for the rank test to ever reach :data:`ALPHA`
(3 against 3 cannot: the smallest one-sided p is 1/C(6,3) = 0.05): timings fall back to the exact
rule on medians."""

DEFAULT_TOLERANCES: Mapping[str, float] = {
    "step_time": 0.10,
    "throughput": 0.10 / 1.10,  # follows step_time: see tolerance_for
    "peak_memory": 0.005,
    "flops": 0.001,
    "loss": 0.002,
    "reserved_memory": math.inf,
}
"""Relative tolerances of the built-in metrics (``reserved_memory``, CUDA only, is reported, not gated,
unless a test gives it a tolerance); a recorded metric without one gets :data:`RECORD_TOLERANCE`."""
RECORD_TOLERANCE = 0.01
"""Default relative tolerance of a metric recorded with ``trainperf.record``."""
TIMING_METRICS = ("step_time", "throughput")
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


def _classify(change: float, tolerance: float, direction: Direction, significant_worse: bool = True,
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


def compare_exact(metric: Metric, baseline: float, tolerance: float) -> MetricVerdict:
    """Compare one exact value with its baseline value."""
    change = relative_change(metric.value, baseline)
    return MetricVerdict(
        name=metric.name,
        status=_classify(change, tolerance, metric.direction),
        current=metric.value,
        baseline=baseline,
        tolerance=tolerance,
        unit=metric.unit,
        direction=metric.direction,
        change=change,
    )


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
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    k = int(math.floor(m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12)))
    k = min(max(k, 0), len(diffs) - 1)
    low, high = float(diffs[k]), float(diffs[len(diffs) - 1 - k])
    return math.exp(estimate), math.exp(low), math.exp(high)


def _p_beyond(current: Sequence[float], baseline: Sequence[float], factor: float, alternative: str) -> float:
    """One-sided Mann-Whitney p-value that ``current / factor`` is still greater (or less) than
    ``baseline``: that the ratio lies beyond ``factor``. 1 when no ratio can (factor <= 0 or inf)."""
    if not 0 < factor < math.inf:
        return 1.0
    scaled = np.asarray(current, dtype=float) / factor
    return float(sps.mannwhitneyu(scaled, np.asarray(baseline, dtype=float), alternative=alternative).pvalue)


def compare_samples(metric: Metric, baseline: Sequence[float], tolerance: float,
                    alpha: float = ALPHA) -> MetricVerdict:
    """Compare sampled timings with baseline samples (see the module docstring)."""
    current = metric.samples
    m, n = len(current), len(baseline)
    too_few = m < MIN_SAMPLES or n < MIN_SAMPLES or 1 / math.comb(m + n, m) >= alpha
    if too_few or min(*current, *baseline) <= 0:
        return compare_exact(metric, float(np.median(baseline)), tolerance)
    ratio, low, high = hodges_lehmann_ratio(current, baseline)
    # "beyond tolerance" is the alternative of each test, not only the point estimate
    worse, better = ratio_bounds(tolerance, metric.direction)
    if metric.direction is Direction.HIGHER_IS_BETTER:
        p_worse = _p_beyond(current, baseline, worse, "less")
        p_better = _p_beyond(current, baseline, better, "greater")
    else:
        p_worse = _p_beyond(current, baseline, worse, "greater")
        p_better = _p_beyond(current, baseline, better, "less")
    change = ratio - 1.0
    status = _classify(change, tolerance, metric.direction,
                       significant_worse=p_worse < alpha, significant_better=p_better < alpha)
    return MetricVerdict(
        name=metric.name,
        status=status,
        current=metric.value,
        baseline=float(np.median(baseline)),
        tolerance=tolerance,
        unit=metric.unit,
        direction=metric.direction,
        change=change,
        interval=(low - 1.0, high - 1.0),
        p_value=p_worse,
    )


def tolerance_for(metric: Metric, overrides: Mapping[str, float]) -> float:
    """The tolerance of ``metric``: the test's override, else the recorded one, else the default.

    ``throughput`` is ``items / step_time``: unless given its own, its tolerance follows step time's,
    ``t / (1 + t)``, so that throughput falls beyond it exactly when step time rises beyond ``t``
    (10% slower steps are 9.1% less throughput) and loosening ``step_time`` loosens both.
    """
    if metric.name in overrides:
        return overrides[metric.name]
    if metric.tolerance is not None:
        return metric.tolerance
    if metric.name == "throughput":
        step = overrides.get("step_time", DEFAULT_TOLERANCES["step_time"])
        return step / (1.0 + step)
    return DEFAULT_TOLERANCES.get(metric.name, RECORD_TOLERANCE)


def judge(current: Measurement, baseline: Measurement | None,
          overrides: Mapping[str, float] | None = None) -> CellVerdict:
    """The verdict on every metric of ``current`` against ``baseline`` (None: everything is new)."""
    overrides = overrides or {}
    verdicts = []
    for metric in current.metrics:
        tolerance = tolerance_for(metric, overrides)
        base = baseline.metric(metric.name) if baseline is not None else None
        if base is None:
            verdicts.append(MetricVerdict(
                name=metric.name, status=Status.NEW, current=metric.value, baseline=None,
                tolerance=tolerance, unit=metric.unit, direction=metric.direction,
            ))
        elif metric.sampled and base.sampled:
            verdicts.append(compare_samples(metric, base.samples, tolerance))
        else:
            verdicts.append(compare_exact(metric, base.value, tolerance))
    missing = () if baseline is None else tuple(n for n in baseline.names if current.metric(n) is None)
    return CellVerdict(measurement=current, metrics=tuple(verdicts), missing=missing)
