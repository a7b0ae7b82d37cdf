"""The one decision: a cell's measurement (or a pair of them) and what it is compared with -> a
verdict and, when it regressed, the message that fails it.

Every way of running a cell ends here: the in-process cell, the isolated child's cell re-judged by its
parent, the lockstep pair, and the figures of a whole grid. Pure: imports neither pytest nor torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pytest_trainperf import derived, paired, stats
from pytest_trainperf.records import (
    CellVerdict,
    Direction,
    Figure,
    FigureKind,
    FigureVerdict,
    Measurement,
    MetricVerdict,
    Outcome,
    RelativeSpec,
    Scalar,
    ScalingSpec,
    Status,
    format_change,
    format_scalar,
)

UPDATE_HINT = "pytest --trainperf-update-baselines"
"""The command that accepts intended changes."""


@dataclass(frozen=True)
class Against:
    """What a cell is compared with, as its failure message names it."""

    where: str
    """The message's second line: ``tests/x.py::t[a] against its baseline in baselines/x.json``."""
    environment: str
    """The environment's fingerprint key."""
    other: str = ""
    """A git revision measured side by side (``main``); empty: the stored baseline."""
    shown: str = ""
    """The baseline file as shown, for the hint to commit it (empty: no baseline file involved)."""

    @property
    def hint(self) -> str:
        """The last line: how to accept an intended change (none in a side-by-side comparison)."""
        return f"If the change is intended, run `{UPDATE_HINT}` and commit {self.shown}." if self.shown else ""


@dataclass(frozen=True)
class Retimed:
    """How a cell's timings were confirmed before its verdict was given."""

    rounds: int = 0
    """Re-measurements made."""
    skipped_for: float | None = None
    """The ``--trainperf-max-time`` (seconds) that left a due re-measurement undone; None: none was."""


ACROSS_HOSTS = ("flops", "host_syncs", "ops", "memory_traffic", "low_precision_share", "arithmetic_intensity",
                "graph_breaks", "recompiles", "unique_graphs")
"""The metrics judged against a baseline from another host (same device type, torch, threads; another
CPU): counts of what the code dispatches and compiles, the same on any CPU; and their splits by dtype
(:data:`ACROSS_HOSTS_FAMILIES`). Timings, memory and the loss (CPU kernels round differently) are not."""
ACROSS_HOSTS_FAMILIES = ("flops_", "memory_traffic_")
"""Prefixes of the by-dtype splits of :data:`ACROSS_HOSTS` metrics (``flops_bf16``, ``memory_traffic_fp32``)."""


def across_hosts(metric: str) -> bool:
    """Whether ``metric`` is judged against a baseline measured on another host's CPU."""
    return metric in ACROSS_HOSTS or metric.startswith(ACROSS_HOSTS_FAMILIES)


def from_another_host(baseline: Measurement) -> Measurement:
    """A baseline measured on another host, cut to what judges this one: its :func:`across_hosts`
    metrics and their breakdowns, no loss curve. The cell's other metrics then have no baseline value
    and are not judged (``new``)."""
    return replace(baseline, metrics=tuple(m for m in baseline.metrics if across_hosts(m.name)),
                   breakdowns=tuple(b for b in baseline.breakdowns if across_hosts(b.metric)), loss_curve=())


def across_hosts_environment(here: str, there: str) -> str:
    """The ``environment:`` line of a cell judged against a baseline from another host."""
    return (f"{here} (judged across hosts: same device type, torch and threads; another CPU; against the "
            f"baseline of {there}: the exact work metrics only, timings not judged)")


def cell(now: Measurement, baseline: Measurement | None, overrides: Mapping[str, float],
         grid: Mapping[str, Sequence[float]] | None = None, grid_size: int = 1) -> CellVerdict:
    """The verdict on a cell against its stored baseline, its timings corrected for the other cells
    of its grid judged so far (``grid``: their p-values per metric)."""
    verdict = stats.judge(now, baseline, overrides)
    return stats.correct_for_grid(verdict, grid or {}, grid_size)


def side_by_side(now: Measurement, reference: Measurement | None, overrides: Mapping[str, float]) -> CellVerdict:
    """The verdict on a cell measured in lockstep with ``reference`` (None: nothing to compare with,
    the cell is new)."""
    if reference is None:
        return stats.judge(now, None, overrides)
    return paired.judge_paired(now, reference, overrides)


def confirmed(screen: CellVerdict, pair: CellVerdict, against: str, pairings: int) -> CellVerdict:
    """The verdict of a cell whose timings regressed against the stored baseline (``screen``), or were
    suspect (:func:`suspect`: slower than its threshold or faster than its floor), and were measured again
    side by side with ``against`` (``pair``, the pooled pairs of ``pairings`` pairs of processes): the
    timings as the pair judged them, every other metric (the exact ones: FLOPs, memory, loss) as the
    stored baseline judged it."""
    timing = {m.name: m for m in pair.metrics if m.name in stats.TIMING_METRICS}
    return replace(screen, metrics=tuple(timing.get(m.name, m) for m in screen.metrics),
                   screen=tuple(m for m in screen.metrics if m.name in timing), confirmed_against=against,
                   confirmed_pairings=pairings)


SCREEN_MARGIN = paired.CATCH_MARGIN
"""How far beyond its side-by-side tolerance a slowdown may lie and still be passed by the screen: the
screen is built to send a cell that is ``tolerance + SCREEN_MARGIN`` slower (+5% at the default 2%) to
confirmation :data:`SCREEN_RECALL` of the time; the pairs stop once they rule that size out."""
SCREEN_RECALL = 0.95
"""The chance that the screen sends a cell slowed by ``tolerance +`` :data:`SCREEN_MARGIN` to confirmation,
by the model of :func:`stats.detectable_change` (a new process's median is a normal draw from the stored
noise band around the true one)."""


def screen_spread(within: float, noise: float | None, rounds: int) -> float:
    """The standard deviation (of a log time ratio) of what a new process's estimate scatters by around
    the stored one: ``within`` of this run's estimate, and the stored band ``noise`` over ``rounds`` rounds."""
    band = (noise or 0.0) ** 2 * (1 + 1 / max(rounds, 1))
    return math.sqrt(within ** 2 + band)


def screen_threshold(within: float, noise: float | None, rounds: int, tolerance: float) -> float:
    """The time ratio now / stored above which the screen suspects a cell: ``log(1 + tolerance +
    SCREEN_MARGIN)`` less ``z(SCREEN_RECALL)`` standard deviations of what a new process's estimate
    scatters by (:func:`screen_spread`). Below 1 when the band is too wide for a stored comparison to clear
    such a slowdown: then every cell is confirmed side by side."""
    spread = screen_spread(within, noise, rounds)
    return math.exp(math.log1p(tolerance + SCREEN_MARGIN) - stats.normal_quantile(SCREEN_RECALL) * spread)


def screen_floor(within: float, noise: float | None, rounds: int) -> float:
    """The time ratio now / stored *below* which the screen suspects a cell as well: ``z(SCREEN_RECALL)``
    standard deviations (:func:`screen_spread`) under 1. A cell faster than that ran faster than the
    stored band lets a new process run: the band, the premise of :func:`screen_threshold`, does not hold
    for it (a faster runner than the baseline's, or faster code), and a slowdown as large as the runner's
    head start would pass a one-sided screen unseen (measured: a +10% commit on a runner 30% faster than
    its baselines passed 7 of 8 cells). So it is confirmed side by side like a slower one. Unchanged code
    on the baseline's machine falls below it 5% of the time, by the band's model."""
    return math.exp(-stats.normal_quantile(SCREEN_RECALL) * screen_spread(within, noise, rounds))


RUNNER_CELLS = 3
"""Cells of a session judged against stored baselines before their median step-time ratio (the runner
against the baselines' machine, :func:`pytest_trainperf.results.compare_machine`) takes part in the screen
(:func:`suspect`'s ``runner``)."""


def suspect(now: Measurement, baseline: Measurement, overrides: Mapping[str, float],
            runner: float | None = None) -> bool:
    """Whether the screen sends a cell to side-by-side confirmation: one of its timings is slower than the
    stored baseline's by more than :func:`screen_threshold`, or faster by more than :func:`screen_floor`
    allows (the Hodges-Lehmann ratio of its samples to the stored ones, as a time ratio), whatever its
    significance. Looser than the stored verdict on purpose: a false flag costs a confirmation, not a
    failure, while a +5% slowdown hides inside the stored noise band of a shared runner, inside a
    tolerance of 10%, and under the head start of a runner faster than the baseline's. A timing whose
    tolerance is infinite (not gated) is never suspected.

    ``runner``: the median step-time ratio of the session's earlier cells to their stored baselines
    (None before :data:`RUNNER_CELLS` of them). Where it lies outside this timing's window too, the
    runner itself differs from the baselines' machine by more than the band allows, and the cell is
    suspect whatever its own ratio: its ratio is the runner's head start (or lag) and its own change
    together, and a change the size of the head start lands inside the window (measured: a +10% commit
    on a runner whose processes ran 21% faster passed the screen in 1 of 16 cell-runs)."""
    for metric in now.metrics:
        before = baseline.metric(metric.name)
        if metric.name not in stats.TIMING_METRICS or before is None:
            continue
        tolerance = paired.tolerance_for(metric, overrides)
        current, stored = metric.samples, before.samples
        if (not math.isfinite(tolerance) or len(current) < 2 or len(stored) < 2
                or min(*current, *stored) <= 0 or not all(map(math.isfinite, (*current, *stored)))):
            continue
        if metric.direction is Direction.HIGHER_IS_BETTER:  # a rate: its times, and the time tolerance
            current, stored = tuple(1 / x for x in current), tuple(1 / x for x in stored)
            tolerance = 1 / (1 - tolerance) - 1 if tolerance < 1 else math.inf
            if not math.isfinite(tolerance):
                continue
        ratio, low, high = stats.hodges_lehmann_ratio(current, stored)
        within = math.log(high / low) / (2 * stats.normal_quantile(0.5 + stats.CONFIDENCE / 2))
        noise, rounds = stats.noise_band(before.rounds), len(before.rounds)
        floor, threshold = screen_floor(within, noise, rounds), screen_threshold(within, noise, rounds, tolerance)
        if not floor <= ratio <= threshold or (runner is not None and not floor <= runner <= threshold):
            return True
    return False


def timing_regressed(verdict: CellVerdict) -> bool:
    """Whether a timing metric is among the verdict's regressions (what confirmation re-times)."""
    return any(m.name in stats.TIMING_METRICS for m in verdict.regressions)


def leaning_slower(verdict: CellVerdict) -> bool:
    """Whether a side-by-side verdict regressed in a timing, or measured its step time slower than its
    tolerance without the interval to clear it: another pair of processes then measures the cell
    (:func:`another_pairing`), and the pairs of every pair of processes are judged pooled
    (:func:`pytest_trainperf.paired.pooled`). One pair of processes reads a change with an offset of its
    own, and its sequential rule stops once the interval rules out tolerance + ``CATCH_MARGIN``: a +5%
    commit that one pair of processes reads as +4% is stopped there, unchanged, and only another pair of
    processes can say otherwise."""
    step = verdict.metric("step_time")
    return timing_regressed(verdict) or (step is not None and step.change is not None and step.change > step.tolerance)


SIDE_BY_SIDE_PAIRINGS = 3
"""The most pairs of worker processes (each kept for the session) that measure one cell side by side,
their pairs pooled (:func:`another_pairing`). Two processes of the same code differ by an offset of their
own (within about ±1.5% in balanced ratios on a 2-core runner), which another pair of processes draws
anew. (Until 2026-12-01 a second pair's pairs alone judged a regression: a slowdown had to clear the
tolerance twice, which missed slowdowns near it. Until 2026-12-02 there were two at most: a +5% commit
read +3.5% by the two, its interval still reaching below the tolerance, passed.)"""


DECIDED_BY_TWO = 2.0
"""A regression that two pairs of worker processes, pooled, read at this many times its tolerance or more
is decided; below it a third pair of processes measures the cell (:func:`another_pairing`). One pair of
processes whose offset is high can carry a pooled reading of unchanged code just past the tolerance
(+3.9% at a 2% tolerance in a run of the examples, 2026-12-02; the same cell read -1.3%, -1.3% and -0.9%
in the next three runs), never far past it. Simulated (``tests/test_against.py::confirm_cells``, 4000
cells each): unchanged code failed 7 → 1 with offsets of ±1.2%, 96 → 42 with offsets of ±2%; +5% caught
3903 → 3900 and +4% 3482 → 3445 (±1.2%)."""


def another_pairing(verdict: CellVerdict, pairings: int) -> bool:
    """Whether another pair of worker processes measures a cell side by side after ``pairings`` pairs of
    processes whose pooled pairs gave ``verdict``. After the first: when it regressed or leaned slower
    (:func:`leaning_slower`), so that no regression rests on one pair of processes' offset. After the
    second: when the pooled verdict still leans slower without a regression, its interval reaching below
    the tolerance, or found a regression of its step time below :data:`DECIDED_BY_TWO` times the
    tolerance (a regression that reads further is decided). Never more than
    :data:`SIDE_BY_SIDE_PAIRINGS`. Unchanged code rarely leans slower after two, so a third pair of
    processes costs little where nothing changed."""
    if pairings >= SIDE_BY_SIDE_PAIRINGS or not leaning_slower(verdict):
        return False
    if pairings < 2 or not timing_regressed(verdict):
        return True
    step = verdict.metric("step_time")
    return step is not None and step.change is not None and step.change < DECIDED_BY_TWO * step.tolerance


def failure(verdict: CellVerdict, against: Against, retimed: Retimed = Retimed()) -> str:
    """The failure message of a cell that regressed; empty when it did not."""
    other = against.other
    now = verdict.measurement
    if verdict.outcome is Status.REGRESSED:
        before = verdict.baseline_outcome
        if other:
            head = f"{now.outcome.value} in this tree, {before.value if before is not None else 'nothing'} at {other}"
        else:
            head = (now.outcome.value if now.outcome.died else
                    f"out of memory ({now.outcome.value}), where the baseline was measured")
            if before is not None and before is not Outcome.MEASURED and now.outcome.died:
                head += f" (the baseline: {before.value})"
        lines = [f"trainperf regression: {head}", against.where]
        lines += [] if other else [f"environment: {against.environment}"]
        lines.append(f"  {now.detail}")
        return "\n".join(lines + ([against.hint] if against.hint else []))
    if not verdict.regressions:
        return ""
    worst = ", ".join(f"{m.name} {format_change(m.change)}" for m in verdict.regressions if m.change is not None)
    side = verdict.confirmed_against
    lines = [f"trainperf regression: {worst}" + (f" (confirmed side by side with {side})" if side else ""),
             against.where + (f", confirmed side by side with {side} on this machine" if side else ""),
             f"environment: {against.environment}"]
    screened = {m.name: m for m in verdict.screen}
    for m in verdict.regressions:
        line = m.describe()
        if other:
            line = line.replace(": baseline ", f": at {other} ", 1)
        elif m.name in screened:
            lines.append(f"  stored: {screened[m.name].describe()}")
            line = f"side by side: {line.replace(': baseline ', f': at {side} ', 1)}"
        lines.append(f"  {line}")
        if m.grown:
            lines.append(f"    {m.grown_label or 'grew'}: {', '.join(m.grown)}")
    if timing_regressed(verdict):
        pairs = now.metric("step_time")
        if (other or side) and pairs is not None:
            count = f"{len(pairs.samples)} pairs' " if other else ""
            by = verdict.confirmed_pairings
            processes = f", pooled over {by} pairs of worker processes" if side and by > 1 else ""
            lines.append(f"  (timings side by side: the median of the {count}balanced ratios (an A-first and a "
                         f"B-first pair each), this tree / {other or side}{processes}, with its 95% sign-test "
                         "interval)")
        if retimed.rounds:
            lines.append(f"  (timings confirmed by {retimed.rounds} re-measurement{'s' * (retimed.rounds > 1)}; "
                         "figures from the last)")
        if retimed.skipped_for is not None:
            lines.append(f"  (not re-measured to confirm: the cell used its --trainperf-max-time of "
                         f"{retimed.skipped_for:g} s)")
    return "\n".join(lines + ([against.hint] if against.hint else []))


def crashed_in_update(nodeid: str, detail: str, outcome: str = "crashed") -> str:
    """The failure of a cell that crashed (or timed out) during an update: no baseline is written for it."""
    return f"trainperf: {nodeid} {outcome}: {detail}\nIts baseline was not updated."


def missing_baseline(nodeid: str, shown: str, environment: str) -> str:
    """The failure of a cell without a baseline for its environment under ``--trainperf-strict``."""
    return (f"trainperf: {nodeid} has no baseline for this environment in {shown} (--trainperf-strict)\n"
            f"environment: {environment}\nCreate it with `{UPDATE_HINT}`.")


# --------------------------------------------------------------------------- figures of a grid


@dataclass(frozen=True)
class FigureSpecs:
    """The figures one grid test asks for: ``tp.relative`` and any ``tp.scaling`` fits."""

    relative: RelativeSpec | None
    """The relative view, if any."""
    scaling: tuple[ScalingSpec, ...]
    """The scaling fits, in decoration order."""

    def derive(self, cells: Sequence[Measurement]) -> list[Figure]:
        """Every figure of these cells."""
        out = derived.relative_figures(self.relative, cells) if self.relative is not None else []
        for fit in self.scaling:
            out += derived.scaling_figures(fit, cells)
        return out

    def tolerance(self, figure: Figure, overrides: Mapping[str, float]) -> float:
        """The tolerance of one of its figures."""
        if figure.kind is FigureKind.RELATIVE:
            given = self.relative.tolerance if self.relative is not None else None
        else:
            given = next((f.tolerance for f in self.scaling if f.abscissa == figure.reference), None)
        return derived.figure_tolerance(figure.kind, figure.metric, given, dict(overrides))


def figures(specs: FigureSpecs, now: Sequence[Measurement], before: Sequence[Measurement],
            overrides: Mapping[str, float], where: tuple[str, str, tuple[tuple[str, tuple[Scalar, ...]], ...]]
            ) -> list[FigureVerdict]:
    """The figures of a grid's cells measured now against those of the baseline's same cells;
    ``where`` is the test file, the test and its axes."""
    return derived.judge_figures(specs.derive(now), specs.derive(before),
                                 lambda f: specs.tolerance(f, overrides), where)


def feeds(figure: Figure, cell: Measurement) -> bool:
    """Whether ``cell`` is one of the cells ``figure`` is derived from."""
    params = dict(cell.params)
    if figure.kind is FigureKind.RELATIVE:
        own = dict(figure.params)
        same_elsewhere = all(params.get(k) == v for k, v in own.items() if k != figure.axis)
        variant = params.get(figure.axis)
        return same_elsewhere and variant is not None and format_scalar(variant) in (
            format_scalar(own[figure.axis]), figure.reference)
    return all(params.get(k) == v for k, v in figure.params)


def figure_cells(figure: Figure, cells: Sequence[Measurement]) -> tuple[Measurement | None, Measurement | None]:
    """The cells a relative figure comes from among ``cells``: its variant's and its reference's."""
    variant = reference = None
    for cell in cells:
        if feeds(figure, cell):
            if cell.cell == figure.cell:
                variant = cell
            else:
                reference = cell
    return variant, reference


def side_by_side_figure(verdict: FigureVerdict, variant: MetricVerdict, reference: MetricVerdict, against: str,
                        tolerance: float) -> FigureVerdict:
    """A relative timing figure judged side by side: ``variant`` and ``reference`` are the paired verdicts
    of its two cells, this tree against ``against`` on this machine (:func:`side_by_side`). The figure
    moved by the ratio of their changes, ``(1 + variant) / (1 + reference) - 1``: where neither cell's
    code changed, both read about 0 and so does the figure, whatever the stored baseline's machine
    measured. Its 95% interval combines the two cells' intervals (independent, in log space, each read
    as normal); it regresses beyond ``tolerance`` (the figure's own, not widened: no stored band is
    involved) when that interval lies beyond no move too, as :func:`derived.judge_figure` asks of a
    stored figure. Unchanged when either cell has no interval."""
    if None in (variant.change, reference.change, variant.interval, reference.interval):
        return verdict
    assert variant.change is not None and reference.change is not None
    assert variant.interval is not None and reference.interval is not None
    move = (1.0 + variant.change) / (1.0 + reference.change)
    halves = [math.log((1.0 + hi) / (1.0 + lo)) / 2 for lo, hi in (variant.interval, reference.interval)]
    if not all(math.isfinite(h) for h in halves) or move <= 0:
        return verdict
    spread = math.hypot(*halves)  # each half-width is z standard errors: so is their combination
    low, high = move * math.exp(-spread), move * math.exp(spread)
    higher_worse = verdict.figure.direction is not Direction.HIGHER_IS_BETTER
    worse = low > 1.0 if higher_worse else high < 1.0
    better = high < 1.0 if higher_worse else low > 1.0
    status = stats.classify(move - 1.0, tolerance, verdict.figure.direction, worse, better)
    return replace(verdict, status=status, confirmed_against=against, side_change=move - 1.0,
                   side_interval=(low - 1.0, high - 1.0))


def side_by_side_scaling(verdict: FigureVerdict, points: Sequence[tuple[float, MetricVerdict]], against: str,
                         tolerance: float) -> FigureVerdict:
    """A scaling fit of a timing judged side by side: ``points`` are ``(x, paired verdict)`` of the cells it
    is fitted on, each this tree against ``against`` on this machine. The exponent moved by the slope of
    the paired changes along x (``log(1 + change)`` over ``log x``, Theil-Sen, with its 95% interval):
    where the code did not change, every cell reads about 0 and the slope is about 0. It regresses beyond
    ``tolerance`` (in exponent units) when the interval lies above 0, as :func:`derived.judge_figure` asks
    of a stored fit. Unchanged with fewer than :data:`derived.MIN_SCALING_POINTS` distinct x."""
    usable = sorted((x, m.change) for x, m in points if m.change is not None and m.change > -1.0)
    if len({x for x, _ in usable}) < derived.MIN_SCALING_POINTS:
        return verdict
    move, _, (low, high) = derived.fit_power_law([x for x, _ in usable], [1.0 + c for _, c in usable])
    if move > tolerance and low > 0:
        status = Status.REGRESSED
    elif move < -tolerance and high < 0:
        status = Status.IMPROVED
    else:
        status = Status.UNCHANGED
    return replace(verdict, status=status, confirmed_against=against, side_change=move, side_interval=(low, high))


def figure_failure(regressed: Sequence[FigureVerdict], shown: str, environment: str, confirmed: int = 0) -> str:
    """The failure message of a grid's regressed figures."""
    worst = regressed[0]
    assert worst.baseline is not None
    more = len(regressed) - 1
    lines = [f"trainperf regression: {worst.figure.title()} {worst.baseline.shown()} -> {worst.figure.shown()}"
             + (f" (and {more} more figure{'s' * (more > 1)})" if more else ""),
             f"{worst.test_file}::{worst.test}: the figures of its grid (judged when its last cell finished) "
             f"against the baseline's same cells in {shown}",
             f"environment: {environment}"]
    lines += [f"  {v.describe()}" for v in regressed]
    if confirmed:
        lines.append(f"  (confirmed by {confirmed} re-measurement{'s' * (confirmed > 1)} of the cells they come "
                     "from, taken in turn; figures from the re-measurements)")
    side = sorted({v.confirmed_against for v in regressed if v.confirmed_against})
    if side:
        lines.append(f"  (confirmed side by side with {', '.join(side)} on this machine: the cells they come from "
                     "measured in lockstep with the commit the baseline measured)")
    lines.append(f"If the change is intended, run `{UPDATE_HINT}` and commit {shown}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- an update's noise


def spreads(rounds: Mapping[str, Sequence[Measurement]], in_process: int) -> str:
    """The line that reports an update's two spreads of the step time: within a process (the
    standard deviation of the log medians of the first ``in_process`` rounds, which ran in one
    process) and between processes (of the process medians: the pool of those rounds, then each later
    round, each a fresh process); the median over the cells and the widest. Empty when no cell has
    rounds of both kinds."""
    within: list[float] = []
    between: list[float] = []
    for measurements in rounds.values():
        medians = [m.metric("step_time") for m in measurements]
        timed = [m for m in medians if m is not None and m.samples]
        if len(timed) <= in_process:
            continue
        first = timed[:in_process]
        inside = stats.noise_band([statistics.median(m.samples) for m in first])
        pooled = statistics.median([s for m in first for s in m.samples])
        across = stats.noise_band([pooled, *(statistics.median(m.samples) for m in timed[in_process:])])
        if inside is not None and across is not None:
            within.append(inside)
            between.append(across)
    if not within:
        return ""
    return (f"the step times of this update's {len(within)} cell{'s' * (len(within) != 1)} spread "
            f"±{statistics.median(within):.1%} within a process (median; widest ±{max(within):.1%}) and "
            f"±{statistics.median(between):.1%} between processes (median; widest ±{max(between):.1%}); "
            "the noise band stored holds both")
