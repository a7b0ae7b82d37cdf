"""Figures derived from the cells of one grid, and their verdicts: pure functions (no pytest, no torch).

**Relative views** (``tp.relative(variant="plain")``). In every cell of the other axes, each variant's
metric is divided by the reference variant's: ``value = variant / reference - 1`` (a recompute cost of
+42%, a memory saving of -30%). Timings use the Hodges-Lehmann ratio of the two cells' step samples
with its rank interval; exact metrics their values. A figure moves by the *ratio of ratios*
``(1 + now) / (1 + baseline) - 1``: 42% -> 55% is a move of +9.2%. Both cells of a figure run in the
same process minutes apart, so a slow machine slows both and the ratio is steadier than either cell:
timing figures get the tighter :data:`RELATIVE_TIMING_TOLERANCE`, widened by the figure's own noise
band (its spread over the baseline's measurement rounds, :data:`stats.NOISE_FACTOR` band widths), and
regress only when the interval of the figure now lies beyond the baseline's figure too.

**Scaling fits** (``tp.scaling(x="seq_len", metrics=[...])``). For every cell of the other axes the
points ``(x, metric)`` along the axis are fitted as ``metric = a * x^b`` on log-log axes with the
Theil-Sen slope (the median of pairwise slopes: robust with few points) and its 95% interval
(:func:`scipy.stats.theilslopes`). The exponent regresses when it rose by more than
:data:`SCALING_TOLERANCE` (or three noise bands of the baseline's per-round exponents) and the
interval now lies above the baseline's exponent: linear attention that went quadratic fails even when
each cell stays within its own tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from pytest_trainperf import stats
from pytest_trainperf.records import (
    Direction,
    Figure,
    FigureKind,
    FigureVerdict,
    Measurement,
    Metric,
    Outcome,
    RelativeSpec,
    Scalar,
    ScalingSpec,
    Status,
    cell_id,
    format_scalar,
)

RELATIVE_TIMING_TOLERANCE = 0.05
"""Default tolerance of a relative timing figure (the ratio of ratios): tighter than a cell's own
``step_time`` tolerance, since a machine's drift moves both cells of the ratio."""
SCALING_TOLERANCE = 0.25
"""Default tolerance of a scaling exponent, in exponent units (``x^1.0`` may drift to ``x^1.25``)."""
MIN_SCALING_POINTS = 3
"""Points a scaling fit needs along its axis (two points always fit a line exactly)."""


def _measured(cells: Sequence[Measurement]) -> list[Measurement]:
    return [m for m in cells if m.outcome is Outcome.MEASURED]


def figure_tolerance(kind: FigureKind, metric: str, given: float | None,
                     overrides: Mapping[str, float] | None = None) -> float:
    """The tolerance of a figure: the one given to ``tp.relative``/``tp.scaling``; else, for a
    relative timing :data:`RELATIVE_TIMING_TOLERANCE`, for another relative figure its metric's
    tolerance (``tp.tolerance`` overrides included), for an exponent :data:`SCALING_TOLERANCE`."""
    if given is not None:
        return given
    if kind is FigureKind.SCALING:
        return SCALING_TOLERANCE
    if metric in stats.TIMING_METRICS:
        return RELATIVE_TIMING_TOLERANCE
    overrides = overrides or {}
    return overrides.get(metric, stats.DEFAULT_TOLERANCES.get(metric, stats.RECORD_TOLERANCE))


def _ratio(variant: Metric, reference: Metric) -> tuple[float, tuple[float, float] | None] | None:
    """``variant / reference`` and its interval; None when it cannot be formed."""
    if variant.sampled and reference.sampled and min(variant.samples + reference.samples) > 0:
        estimate, low, high = stats.hodges_lehmann_ratio(variant.samples, reference.samples)
        return estimate, (low, high)
    if reference.value == 0 or not math.isfinite(variant.value / reference.value):
        return None
    return variant.value / reference.value, None


def relative_figures(spec: RelativeSpec, cells: Sequence[Measurement]) -> list[Figure]:
    """Every variant's figure against the reference variant in the same cell of the other axes, for
    each metric of ``spec`` both cells measured; cells that did not end measured give none."""
    reference = format_scalar(spec.reference)
    refs: dict[tuple[tuple[str, Scalar], ...], Measurement] = {}
    variants: list[tuple[tuple[tuple[str, Scalar], ...], Measurement]] = []
    for m in _measured(cells):
        params = dict(m.params)
        if spec.axis not in params:
            continue
        rest = tuple((k, v) for k, v in m.params if k != spec.axis)
        if format_scalar(params[spec.axis]) == reference:
            refs[rest] = m
        else:
            variants.append((rest, m))
    out = []
    for rest, m in variants:
        ref = refs.get(rest)
        if ref is None:
            continue
        for name in spec.metrics:
            a, b = m.metric(name), ref.metric(name)
            if a is None or b is None:
                continue
            ratio = _ratio(a, b)
            if ratio is None:
                continue
            value, interval = ratio
            rounds: tuple[float, ...] = ()
            if len(a.rounds) == len(b.rounds) >= 2 and min(b.rounds) > 0:
                rounds = tuple(x / y - 1.0 for x, y in zip(a.rounds, b.rounds, strict=True))
            out.append(Figure(kind=FigureKind.RELATIVE, metric=name, axis=spec.axis, cell=m.cell,
                              reference=reference, value=value - 1.0, params=m.params,
                              interval=None if interval is None else (interval[0] - 1.0, interval[1] - 1.0),
                              rounds=rounds, points=((b.value, a.value),), unit=a.unit,
                              direction=a.direction))
    return out


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, tuple[float, float]]:
    """Fit ``y = a * x^b`` by the Theil-Sen slope on log-log axes: ``(b, a, (b_low, b_high))`` with
    the 95% interval of ``b``. Every x and y must be positive, and two x distinct."""
    from scipy import stats as sps  # on first use, not as the plugin loads

    lx, ly = np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float))
    fit = sps.theilslopes(ly, lx, alpha=0.95)
    return float(fit.slope), float(math.exp(fit.intercept)), (float(fit.low_slope), float(fit.high_slope))


def abscissa(spec: ScalingSpec, m: Measurement) -> float | None:
    """The x of cell ``m`` in a fit of ``spec``: its axis value, or its ``x_metric``; None when not positive."""
    if spec.x_metric is not None:
        metric = m.metric(spec.x_metric)
        value: object = None if metric is None else metric.value
    else:
        value = dict(m.params).get(spec.x)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return float(value)


def scaling_figures(spec: ScalingSpec, cells: Sequence[Measurement]) -> list[Figure]:
    """The fit of each metric of ``spec`` along its axis, for every cell of the other axes with at
    least :data:`MIN_SCALING_POINTS` measured points of distinct x."""
    groups: dict[tuple[tuple[str, Scalar], ...], list[Measurement]] = {}
    for m in _measured(cells):
        if spec.x not in dict(m.params):
            continue
        groups.setdefault(tuple((k, v) for k, v in m.params if k != spec.x), []).append(m)
    out = []
    for rest, members in groups.items():
        for name in spec.metrics:
            points: list[tuple[float, Metric]] = []
            for m in members:
                x, metric = abscissa(spec, m), m.metric(name)
                if x is not None and metric is not None and metric.value > 0:
                    points.append((x, metric))
            points.sort(key=lambda p: p[0])
            if len({x for x, _ in points}) < MIN_SCALING_POINTS:
                continue
            xs = [x for x, _ in points]
            exponent, coefficient, interval = fit_power_law(xs, [metric.value for _, metric in points])
            rounds: tuple[float, ...] = ()
            counts = {len(metric.rounds) for _, metric in points}
            if len(counts) == 1 and (count := counts.pop()) >= 2 and all(min(m.rounds) > 0 for _, m in points):
                rounds = tuple(fit_power_law(xs, [metric.rounds[i] for _, metric in points])[0]
                               for i in range(count))
            out.append(Figure(kind=FigureKind.SCALING, metric=name, axis=spec.x,
                              cell=cell_id([k for k, _ in rest], [v for _, v in rest]),
                              reference=spec.abscissa, value=exponent, params=rest, interval=interval,
                              rounds=rounds, points=tuple((x, metric.value) for x, metric in points),
                              coefficient=coefficient, unit=points[0][1].unit,
                              direction=Direction.LOWER_IS_BETTER))
    return out


def figure_noise(figure: Figure) -> float | None:
    """A baseline figure's noise band: the SD of the log ratios over its rounds (relative), or of
    its per-round exponents (scaling); None with fewer than two rounds."""
    if len(figure.rounds) < 2:
        return None
    if figure.kind is FigureKind.RELATIVE:
        return stats.noise_band([1.0 + r for r in figure.rounds])
    return float(np.std(figure.rounds, ddof=1))


def judge_figure(now: Figure, before: Figure | None, tolerance: float) -> FigureVerdict:
    """The verdict on ``now`` against the baseline's figure ``before`` (None: new)."""
    if before is None:
        return FigureVerdict(figure=now, status=Status.NEW, tolerance=tolerance)
    noise = figure_noise(before)
    if now.kind is FigureKind.SCALING:
        applied = max(tolerance, stats.NOISE_FACTOR * noise) if noise is not None else tolerance
        change = now.value - before.value
        low, high = now.interval if now.interval is not None else (now.value, now.value)
        if change > applied and low > before.value:
            status = Status.REGRESSED
        elif change < -applied and high < before.value:
            status = Status.IMPROVED
        else:
            status = Status.UNCHANGED
        return FigureVerdict(figure=now, status=status, tolerance=applied, baseline=before, change=change,
                             noise=noise)
    applied = stats.effective_tolerance(tolerance, noise, now.direction)
    base = 1.0 + before.value
    if base <= 0:
        change = 0.0 if now.value == before.value else math.inf
        status = Status.UNCHANGED if change == 0 else Status.REGRESSED
        return FigureVerdict(figure=now, status=status, tolerance=applied, baseline=before, change=change,
                             noise=noise)
    change = (1.0 + now.value) / base - 1.0
    worse_significant = better_significant = True
    if now.interval is not None:  # the figure now must lie beyond the baseline's, not only its estimate
        low, high = ((1.0 + now.interval[0]) / base, (1.0 + now.interval[1]) / base)
        higher_worse = now.direction is not Direction.HIGHER_IS_BETTER
        worse_significant = low > 1.0 if higher_worse else high < 1.0
        better_significant = high < 1.0 if higher_worse else low > 1.0
    status = stats.classify(change, applied, now.direction, worse_significant, better_significant)
    return FigureVerdict(figure=now, status=status, tolerance=applied, baseline=before, change=change,
                         noise=noise)


def judge_figures(now: Sequence[Figure], before: Sequence[Figure], tolerance: Callable[[Figure], float],
                  where: tuple[str, str, tuple[tuple[str, tuple[Scalar, ...]], ...]]) -> list[FigureVerdict]:
    """Every figure now against the baseline's figure of the same key, with ``tolerance(figure)``;
    ``where`` (test file, test, grid axes) is kept on each verdict for the report."""
    stored = {f.key: f for f in before}
    test_file, test, axes = where
    return [replace(judge_figure(f, stored.get(f.key), tolerance(f)), test_file=test_file, test=test, axes=axes)
            for f in now]
