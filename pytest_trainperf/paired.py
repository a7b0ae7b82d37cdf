"""Paired statistics of a lockstep A/B run (``--trainperf-against``): pure functions, no pytest, no torch.

In a lockstep run the step of the reference tree (A) and the step of this tree (B) alternate, one
pair at a time, so both steps of a pair see the same state of the machine. Each pair gives one ratio
``b_i / a_i``; a slow spell of the machine moves both steps of a pair and cancels in the ratio.

* **Balanced pairs.** The order flips every pair (A B, B A, A B, ...), so the first step of a pair
  runs in the process that ran the step just before it (its caches warm) and the second after a switch
  (its caches cold): on a small step, measured on 2 cores, the second is 15-20% slower than the first,
  whichever tree it is. The per-pair ratios are then two clouds, ~+17% and ~-16%, and their median falls
  anywhere in the gap (the medians of 60 pairs of the same code ranged over ±10%). So each two
  consecutive pairs (one A-first, one B-first) are averaged in log space into one **balanced ratio**,
  in which the order effect cancels exactly (:func:`balanced_logs`); same code, 60 pairs: ±1%.
* The change is the **median of the balanced ratios**, minus one (the median of their logs,
  exponentiated): robust to the odd pair that a stray process hit in one of its steps.
* Its interval is the distribution-free **sign-test interval** of that median: the order statistics
  ``d_(k)`` and ``d_(n+1-k)`` of the sorted balanced log ratios, with ``k`` the largest rank at which
  ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``. It assumes only that the balanced ratios are
  independent draws with a common median (no symmetry, no normality: shared-runner noise is neither).
* **How many pairs: a sequential rule.** The comparison looks at its pairs after the first
  ``min(--trainperf-pairs, SEQUENTIAL_FIRST)`` and after every :data:`SEQUENTIAL_STEP` more, and stops
  at the first look whose interval lies wholly above ``1 + tolerance`` (a regression) or wholly below
  ``1 + tolerance +`` :data:`CATCH_MARGIN` (any slowdown there is smaller than the one the comparison
  is built to catch, +5% at the default 2%). It stops at :data:`MAX_PAIRS_FACTOR` times
  ``--trainperf-pairs`` pairs (or ``--trainperf-max-time`` seconds) undecided. Each look uses a
  sign-test interval of confidence ``1 - 0.05 / K``, ``K`` the number of looks the budget allows
  (:func:`look_confidence`), so by the union bound the chance that any look wrongly clears the lower end
  for code within the tolerance is at most 2.5%; a comparison that ends otherwise is judged on the 95%
  interval of all its pairs, which adds at most 2.5% more. **False alarms: at most 5% per cell for code
  exactly at the tolerance**, far fewer for unchanged code, which sits well below it. **Misses of a
  slowdown of tolerance + CATCH_MARGIN**: the chance that a look stops it early as smaller is at most
  2.5% by the same bound (and the 95% interval of its pairs may still find it). A cell that is clearly
  fine or clearly slower stops after ``SEQUENTIAL_FIRST`` pairs; a noisy machine (a busy neighbour on
  the core) gets more pairs, but only until the interval rules out the slowdown worth catching, not
  until it clears the tolerance itself. These bounds hold for the pairs of one pair of processes.
* **Up to three pairs of processes.** Two processes of the same code differ by an offset of their own
  (below), so the confirmation of a screened cell measures it again on a second pair of worker
  processes when the first found a regression or read the step time beyond the tolerance without
  clearing it (:func:`pytest_trainperf.judge.leaning_slower`), and judges the pairs of both, pooled
  (:func:`pooled`; the second comparison's looks see the pooled pairs); a third pair of processes when
  the two, pooled, still read it beyond the tolerance without a regression
  (:func:`pytest_trainperf.judge.another_pairing`). Simulated with offsets of ±1.2%
  (``tests/test_against.py::confirm_cells``, seed 21, 200 cells each): unchanged code fails 3 cells;
  a +5% slowdown is caught in 197, +4% in 177; code exactly at the tolerance fails 46 (23%, above the
  5% of one pair of processes: it is a 2% slowdown, and a lucky offset no longer clears it alone).
  With two pairs of processes at most (until 2026-12-02): 2, 193, 168 and 41; with the second
  comparison after a regression only and judged alone (until 2026-12-01): 0, 178, 117 and 13.
* A timing **regresses** when the whole interval lies above ``1 + tolerance`` (the tolerance of the
  metric, :data:`PAIRED_TOLERANCE` for step time unless the test sets one), and **improves** when it
  lies below ``1 / (1 + tolerance)``. The one-sided p-value reported is the sign test's of "the median
  ratio is at most ``1 + tolerance``".

Why a tolerance at all, when the pairing cancels the machine: two processes of the same code still
differ by a small offset of their own (not address-space randomisation, not hash seeds: measured),
which no number of pairs averages away (within about ±1.5% on 2 cores, balanced);
:data:`PAIRED_TOLERANCE` covers it (see ``docs/performance.md`` for the measurement behind it).

Exact metrics (FLOPs, peak memory, the loss, recorded values) and the outcome of the cell are judged
as against a stored baseline (:func:`pytest_trainperf.stats.judge`), the reference tree's measurement
standing in for the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pytest_trainperf import stats
from pytest_trainperf.records import CellVerdict, Direction, Measurement, Metric, MetricVerdict, Status

PAIRED_CONFIDENCE = 0.95
"""Coverage of the sign-test interval of the median ratio."""
PAIRED_TOLERANCE = 0.02
"""Step-time tolerance of a lockstep comparison unless the test sets one (``tp.tolerance(step_time=)``):
what two processes of the same code may differ by. Throughput's follows it (``t / (1 + t)``)."""
MAX_PAIRS_FACTOR = 4
"""A comparison still undecided goes on up to this many times ``--trainperf-pairs`` pairs (and
``--trainperf-max-time``)."""
CATCH_MARGIN = 0.03
"""How far beyond its tolerance lies the slowdown that a side-by-side comparison is built to catch
(``tolerance + CATCH_MARGIN``, +5% at the default 2%): the sequential rule stops once the interval lies
wholly below it (:func:`undecided`), and the screen sends such a slowdown to the pairs
(:data:`pytest_trainperf.judge.SCREEN_MARGIN`)."""
SEQUENTIAL_FIRST = 20
"""Timed pairs before the first look of the sequential rule (fewer if ``--trainperf-pairs`` is smaller)."""
SEQUENTIAL_STEP = 10
"""Timed pairs between two looks of the sequential rule."""
POWER = 0.95
"""The detection probability at which the smallest detectable change is stated."""


@dataclass(frozen=True)
class PairedChange:
    """The median balanced ratio of B to A (:func:`balanced_logs`) and its sign-test interval."""

    ratio: float
    """The median of the balanced ratios."""
    low: float
    """The lower end of the interval of the median ratio (0 with too few pairs for one)."""
    high: float
    """The upper end of the interval (inf with too few pairs)."""
    pairs: int
    """The number of pairs (twice the balanced ratios, less one if odd)."""


def sign_rank(n: int, confidence: float = PAIRED_CONFIDENCE) -> int:
    """The 1-based rank ``k`` of the lower end of the sign-test interval of a median of ``n`` values:
    the largest ``k`` with ``P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2``; 0 when even
    ``k = 1`` is too wide a bet (too few values)."""
    from scipy import stats as sps  # on first use, not as the plugin loads

    tail = (1 - confidence) / 2
    k = int(sps.binom.ppf(tail, n, 0.5))  # smallest k with cdf(k) >= tail
    while k >= 0 and sps.binom.cdf(k, n, 0.5) > tail:
        k -= 1
    return k + 1 if k >= 0 else 0


def balanced_logs(a: Sequence[float], b: Sequence[float]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The balanced log ratios of pairs taken in alternating order: ``log(b_i / a_i)`` of each two
    consecutive pairs ``2j`` and ``2j + 1`` (one with A first, one with B first), averaged, so that the
    order effect (the second step of a pair runs after a switch of process) cancels; a last odd pair is
    left out. A single pair gives its own log ratio."""
    logs: np.ndarray[Any, np.dtype[np.float64]] = np.log(np.asarray(b, dtype=np.float64)) - np.log(
        np.asarray(a, dtype=np.float64))
    half = len(logs) // 2
    if not half:
        return logs
    balanced: np.ndarray[Any, np.dtype[np.float64]] = (logs[0:2 * half:2] + logs[1:2 * half:2]) / 2
    return balanced


def paired_change(a: Sequence[float], b: Sequence[float], confidence: float = PAIRED_CONFIDENCE) -> PairedChange:
    """The median balanced ratio of ``b`` to ``a`` (:func:`balanced_logs`; the pairs in the order they
    were taken, alternating) and its sign-test interval; all times positive."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"expected two equally long, non-empty sequences of paired times, got {len(a)} and {len(b)}")
    logs = np.sort(balanced_logs(a, b))
    n = len(logs)
    k = sign_rank(n, confidence)
    low, high = (math.exp(float(logs[k - 1])), math.exp(float(logs[n - k]))) if k else (0.0, math.inf)
    return PairedChange(ratio=math.exp(float(np.median(logs))), low=low, high=high, pairs=len(a))


def sign_p_value(a: Sequence[float], b: Sequence[float], bound: float, worse_above: bool = True) -> float:
    """One-sided sign-test p-value that the median balanced ratio ``b / a`` lies beyond ``bound``
    (above it when ``worse_above``, else below): the chance of at least this many balanced ratios beyond
    it if the median were ``bound`` itself. Ratios exactly at ``bound`` are dropped, as the sign test
    drops ties."""
    from scipy import stats as sps  # on first use, not as the plugin loads

    logs = balanced_logs(a, b)
    edge = math.log(bound)
    beyond = int(np.sum(logs > edge if worse_above else logs < edge))
    n = beyond + int(np.sum(logs < edge if worse_above else logs > edge))
    if n == 0:
        return 1.0
    return float(sps.binom.sf(beyond - 1, n, 0.5))


def first_look(pairs: int) -> int:
    """Timed pairs before the sequential rule's first look, for a ``--trainperf-pairs`` of ``pairs``."""
    return max(1, min(pairs, SEQUENTIAL_FIRST))


def look_confidence(pairs: int, confidence: float = PAIRED_CONFIDENCE) -> float:
    """The confidence of each look of the sequential rule: ``1 - (1 - confidence) / K``, ``K`` the looks
    that a budget of :data:`MAX_PAIRS_FACTOR` times ``pairs`` pairs allows (Bonferroni over the looks)."""
    looks = 1 + math.ceil(max(MAX_PAIRS_FACTOR * pairs - first_look(pairs), 0) / SEQUENTIAL_STEP)
    return 1.0 - (1.0 - confidence) / looks


def undecided(change: PairedChange, tolerance: float, margin: float = CATCH_MARGIN) -> bool:
    """Whether the pairs so far leave it open if the step time regressed beyond ``tolerance`` by as much
    as the comparison must catch: the interval's lower end is not above ``1 + tolerance`` and its upper
    end is above ``1 + tolerance + margin``."""
    worse = 1.0 + tolerance
    return change.low <= worse and worse + margin < change.high


def detectable_change(tolerance: float, change: PairedChange, confidence: float = PAIRED_CONFIDENCE,
                      power: float = POWER) -> float:
    """The smallest relative slowdown this many pairs with this spread catch with probability ``power``:
    the interval's half-width in log space is ``z((1 + confidence) / 2)`` standard errors of the median,
    and the interval's lower end must clear ``log(1 + tolerance)`` with ``z(power)`` standard errors to spare."""
    if not (change.low > 0 and math.isfinite(change.high)):
        return math.inf
    z_ci = stats.normal_quantile((1 + confidence) / 2)
    se = math.log(change.high / change.low) / (2 * z_ci)
    return math.expm1(math.log1p(tolerance) + (z_ci + stats.normal_quantile(power)) * se)


def compare_paired(metric: Metric, reference: Metric, tolerance: float,
                   confidence: float = PAIRED_CONFIDENCE) -> MetricVerdict:
    """The verdict on a paired timing: ``metric.samples[i]`` (this tree) against ``reference.samples[i]``
    (the reference tree), pair by pair (see the module docstring)."""
    a, b = reference.samples, metric.samples
    if metric.direction is Direction.HIGHER_IS_BETTER:  # a rate: judge the time ratio, report the rate's
        a, b = tuple(1 / x for x in a), tuple(1 / x for x in b)
        tolerance_time = 1 / (1 - tolerance) - 1 if tolerance < 1 else math.inf
    else:
        tolerance_time = tolerance
    found = paired_change(a, b, confidence)
    worse, better = stats.ratio_bounds(tolerance_time, Direction.LOWER_IS_BETTER)
    if found.low > worse:
        status = Status.REGRESSED
    elif found.high < better:
        status = Status.IMPROVED
    else:
        status = Status.UNCHANGED
    ratio, low, high = found.ratio, found.low, found.high
    slowdown = detectable_change(tolerance_time, found, confidence)
    detectable = slowdown
    if metric.direction is Direction.HIGHER_IS_BETTER:  # the same ratios as rates: 1 / time ratio
        ratio, low, high = 1 / ratio, (1 / high if high > 0 else 0.0), (1 / low if low > 0 else math.inf)
        detectable = 1 / (1 + slowdown) - 1
    return MetricVerdict(
        name=metric.name, status=status, current=metric.value, baseline=reference.value, tolerance=tolerance,
        unit=metric.unit, direction=metric.direction, change=ratio - 1.0, interval=(low - 1.0, high - 1.0),
        p_value=sign_p_value(a, b, worse), detectable=detectable)


def even(samples: Sequence[float]) -> tuple[float, ...]:
    """The pairs of a comparison less a last odd one: whole balanced ratios (:func:`balanced_logs`), so
    that the pairs of a later comparison, pooled behind them, still start A-first."""
    return tuple(samples[:len(samples) - len(samples) % 2])


def pooled(first: Measurement, then: Measurement) -> Measurement:
    """``then``, a side of a comparison, with the paired timing samples of the same side of an earlier
    comparison of the cell (``first``, on other workers) in front of its own (:func:`even`): one
    measurement whose balanced ratios hold both pairs of processes, so that each one's offset
    (two processes of the same code differ by one of their own) counts in proportion to its pairs.
    Every other metric, and each timing's value, is ``then``'s."""
    metrics = []
    for m in then.metrics:
        before = first.metric(m.name)
        if m.name in stats.TIMING_METRICS and before is not None and before.samples and m.samples:
            m = replace(m, samples=even(before.samples) + tuple(m.samples))
        metrics.append(m)
    return replace(then, metrics=tuple(metrics))


def tolerance_for(metric: Metric, overrides: Mapping[str, float]) -> float:
    """A metric's tolerance in a lockstep comparison: as against a stored baseline
    (:func:`pytest_trainperf.stats.tolerance_for`), except that step time defaults to
    :data:`PAIRED_TOLERANCE` and throughput follows it."""
    if metric.name not in stats.TIMING_METRICS or metric.name in overrides or metric.tolerance is not None:
        return stats.tolerance_for(metric, overrides)
    step = overrides.get("step_time", PAIRED_TOLERANCE)
    return step if metric.name == "step_time" else stats.throughput_tolerance(step)


def judge_paired(current: Measurement, reference: Measurement,
                 overrides: Mapping[str, float] | None = None) -> CellVerdict:
    """The verdict on this tree's measurement of a cell against the reference tree's, taken in lockstep:
    timings pair by pair (:func:`compare_paired`), everything else as against a stored baseline."""
    overrides = dict(overrides or {})
    verdict = stats.judge(current, reference, overrides)
    metrics = []
    for m in verdict.metrics:
        now, before = current.metric(m.name), reference.metric(m.name)
        if (m.name in stats.TIMING_METRICS and now is not None and before is not None
                and len(now.samples) == len(before.samples) and now.samples
                and min(*now.samples, *before.samples) > 0):
            m = compare_paired(now, before, tolerance_for(now, overrides))
        metrics.append(m)
    return replace(verdict, metrics=tuple(metrics))
