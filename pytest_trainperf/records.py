"""The plain records that flow through the plugin.

fixture -> :class:`Measurement` -> stats -> :class:`CellVerdict` -> plugin and report.

Nothing here imports pytest or torch: ``stats``, ``store`` and ``report`` take and return these
frozen dataclasses, so each can be tested without a plugin or a model.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pytest_trainperf.units import format_value

Scalar = int | float | str | bool
"""What a grid axis value may be."""
SINGLE_CELL = "default"
"""The cell id of a test without grid axes."""


def format_scalar(value: Scalar) -> str:
    """How an axis value is written in ids and table headers."""
    return str(value)


def grid_key(nodeid: str) -> str:
    """The node id without the parameters: what the cells of one grid share."""
    return nodeid.split("[", 1)[0]


def cell_id(names: Sequence[str], values: Sequence[Scalar]) -> str:
    """``batch_size=4-seq_len=16``; ``default`` for no axes."""
    if not names:
        return SINGLE_CELL
    return "-".join(f"{n}={format_scalar(v)}" for n, v in zip(names, values, strict=True))


class Direction(enum.Enum):
    """Which way a metric gets worse."""

    LOWER_IS_BETTER = "lower"
    """A rise beyond tolerance regresses (step time, memory, FLOPs)."""
    HIGHER_IS_BETTER = "higher"
    """A fall beyond tolerance regresses (throughput, accuracy)."""
    EXACT = "exact"
    """Any change beyond tolerance regresses (the training loss: new numerics, not 'better')."""


class Status(enum.Enum):
    """The verdict on one metric, or on a whole cell (the worst of its metrics)."""

    REGRESSED = "regressed"
    """Worse than the baseline beyond tolerance (and, for timings, significantly)."""
    IMPROVED = "improved"
    """Better than the baseline beyond tolerance: passes, with a hint to update."""
    UNCHANGED = "unchanged"
    """Within tolerance of the baseline (or not significantly different)."""
    NEW = "new"
    """No baseline for this environment."""

    @property
    def rank(self) -> int:
        """Severity, highest first when sorting a cell's metrics."""
        return {"regressed": 3, "improved": 2, "new": 1, "unchanged": 0}[self.value]


class Outcome(enum.Enum):
    """How a cell's run ended: measured, or one of the ways a cell runs out of memory or dies."""

    MEASURED = "measured"
    """The cell ran and was measured."""
    OOM = "oom"
    """``torch.OutOfMemoryError`` (or a CPU allocator failure) in the cell."""
    OOM_EMULATED = "oom-emulated"
    """The cell's peak memory exceeded the memory budget (``--trainperf-memory-budget``): it would
    not fit on the device the budget stands for."""
    OOM_KILLED = "oom-killed"
    """An isolated cell's process was killed by the kernel (SIGKILL: the OOM killer)."""
    OOM_FORECAST = "oom-forecast"
    """A ``tp.forecast`` cell whose forecast peak exceeds the device's memory: it would not fit."""
    CRASHED = "crashed"
    """An isolated cell's interpreter died another way (a signal, or an exit without a result)."""
    TIMEOUT = "timeout"
    """A distributed cell's ranks ran past its timeout (a hung collective) and were stopped."""

    @property
    def out_of_memory(self) -> bool:
        """True for the outcomes that mean the cell does not fit."""
        return self in (Outcome.OOM, Outcome.OOM_EMULATED, Outcome.OOM_KILLED, Outcome.OOM_FORECAST)

    @property
    def died(self) -> bool:
        """True for the outcomes of a run that ended without a result: never a baseline."""
        return self in (Outcome.CRASHED, Outcome.TIMEOUT)

    @property
    def label(self) -> str:
        """What a heatmap cell shows for it."""
        return {"measured": "", "oom": "OOM", "oom-emulated": "OOM*", "oom-killed": "KILLED",
                "oom-forecast": "OOM (forecast)", "crashed": "CRASH", "timeout": "TIMEOUT"}[self.value]


@dataclass(frozen=True)
class Metric:
    """One measured metric of one cell."""

    name: str
    """``step_time``, ``throughput``, ``peak_memory``, ``loss``, ``flops`` or a recorded name."""
    value: float
    """The point value: the median for sampled metrics, the final value for ``loss``."""
    unit: str = ""
    """``s``, ``items/s``, ``B``, ``FLOP`` or a user unit; used for display only."""
    direction: Direction = Direction.LOWER_IS_BETTER
    """Which way the metric gets worse."""
    samples: tuple[float, ...] = ()
    """Per-step samples for metrics decided statistically (step time, throughput); empty otherwise."""
    tolerance: float | None = None
    """A tolerance recorded with the metric (``trainperf.record(..., tolerance=)``); None: the default."""
    rounds: tuple[float, ...] = ()
    """For a sampled metric in a baseline: the median of each measurement round (separate warm starts,
    interleaved across cells) the baseline was written from; their spread is the cell's noise band."""

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise TypeError(f"metric {self.name!r}: expected a number, got {self.value!r}")
        if not isinstance(self.unit, str):
            raise TypeError(f"metric {self.name!r}: expected the unit to be a string such as 's' or '', "
                            f"got {type(self.unit).__name__} {self.unit!r}")

    @property
    def sampled(self) -> bool:
        """True when the metric is decided on samples rather than one exact value."""
        return len(self.samples) > 1


ANOTHER_CPU = "any cpu"
"""What stands for the CPU model in :attr:`Fingerprint.across_hosts_key`."""


@dataclass(frozen=True)
class Fingerprint:
    """The environment a measurement was taken in; baselines are keyed by :attr:`key`."""

    device: str
    """The device name: the GPU's name on CUDA, the CPU model on CPU."""
    device_type: str
    """``cpu`` or ``cuda`` (what ``torch.device(...).type`` says)."""
    torch: str
    """``torch.__version__``."""
    cuda: str | None
    """``torch.version.cuda`` (None on a CPU-only build)."""
    threads: int
    """``torch.get_num_threads()`` during measurement (fixed by the plugin)."""
    cpu: str
    """The host CPU model."""
    malloc: str = ""
    """The host allocator's mode (``glibc-fixed`` or ``system``): it moves CPU step times, so it is
    part of the key."""
    python: str = ""
    """The Python version (informative, not part of the key)."""
    platform: str = ""
    """The OS and machine (informative, not part of the key)."""
    compute_capability: str = ""
    """CUDA: the device's compute capability, ``9.0`` (informative: the device name implies it)."""
    driver: str = ""
    """CUDA: the NVIDIA driver version NVML reports (informative; empty without NVML)."""
    cudnn: str = ""
    """CUDA: ``torch.backends.cudnn.version()``, e.g. ``90100`` (part of the key; empty without cuDNN)."""
    cudnn_benchmark: str = ""
    """CUDA: ``torch.backends.cudnn.benchmark`` during measurement, ``on`` or ``off`` (part of the key)."""

    @property
    def key(self) -> str:
        """The key baselines are stored under: what must match for timings to be comparable."""
        parts = [self.device_type, self.device, f"torch {self.torch}", f"cuda {self.cuda or 'none'}"]
        if self.cudnn:
            parts.append(f"cudnn {self.cudnn}")
        if self.cudnn_benchmark:
            parts.append(f"cudnn.benchmark {self.cudnn_benchmark}")
        parts.append(f"threads {self.threads}")
        if self.device_type not in ("cpu", "meta"):  # a forecast (meta) depends on torch alone
            parts.append(f"cpu {self.cpu}")
        if self.malloc:
            parts.append(f"malloc {self.malloc}")
        return " | ".join(parts)

    @property
    def across_hosts_key(self) -> str:
        """The key with the host's CPU model left out (the device name on a CPU, the ``cpu`` field on
        an accelerator): two environments that share it differ only in their CPU, and the exact work
        metrics of one (counts of what the code dispatches, not how fast) judge the other."""
        host = ANOTHER_CPU
        return replace(self, cpu=host, device=host if self.device_type == "cpu" else self.device).key


@dataclass(frozen=True)
class Source:
    """The code a measurement was taken of, as git knows it (written with a baseline by an update)."""

    commit: str
    """The commit checked out (HEAD) when it was measured."""
    tree: str
    """The id of the git tree that was measured: the tracked files as they were, uncommitted changes
    included, less the baselines directory. A commit with this tree holds exactly the measured code."""


@dataclass(frozen=True)
class Breakdown:
    """What one exact count of a cell is made of: ``host_syncs`` by the source line that issued each
    synchronisation, ``ops`` by op name, ``memory_traffic`` by op. Stored with the baseline, so that a
    failure can say which parts are new or grew."""

    metric: str
    """The metric it breaks down."""
    parts: tuple[tuple[str, float], ...]
    """``(part, amount)``, each part once, in the order measured (``("aten.mm", 12)``)."""
    unit: str = ""
    """The parts' unit (``B`` for bytes; empty for counts)."""
    label: str = ""
    """What a failure message calls the parts that appeared or grew (``new sync sites``)."""


@dataclass(frozen=True)
class Measurement:
    """Everything measured for one cell of one test."""

    test: str
    """The test's name inside its file, e.g. ``test_encoder`` or ``TestLM::test_step``."""
    cell: str
    """The cell id, e.g. ``batch_size=4-seq_len=16`` (``default`` for a test without a grid)."""
    params: tuple[tuple[str, Scalar], ...]
    """The cell's axis values, in grid order."""
    metrics: tuple[Metric, ...]
    """The measured metrics, each name once."""
    loss_curve: tuple[float, ...] = ()
    """The loss each training step returned, in order (empty for ``run``)."""
    kind: str = "train"
    """``train`` or ``run``."""
    steps: int = 0
    """The number of timed steps (or calls)."""
    warmup: int = 0
    """The number of warm-up steps before the timed ones."""
    outcome: Outcome = Outcome.MEASURED
    """How the run ended; an out-of-memory cell keeps what was measured before it ran out, if anything."""
    detail: str = ""
    """For an outcome other than measured: what happened, e.g. the error's first line."""
    notes: tuple[str, ...] = ()
    """Warnings about this measurement for the report (e.g. allocator retries near the memory limit);
    not stored with baselines."""
    items_per_step: float | None = None
    """Items (tokens, samples) one step or call processes, as given to ``train``/``run``; None when
    not given. With the loss curve it gives the curve against items processed."""
    source: Source | None = None
    """In a baseline: the code it measured (None: written outside git, or by an older version)."""
    breakdowns: tuple[Breakdown, ...] = ()
    """What some exact counts are made of (sync sites, ops by name), one per metric at most; empty in
    baselines written before they were measured."""
    info: tuple[tuple[str, Scalar], ...] = ()
    """Free-form metadata the test gave (``trainperf.info(key=value)``: strings, numbers, booleans), in
    the order given: shown in the JSON results, the CSV and the Markdown report, never judged, and not
    stored with baselines (pytest-benchmark's ``extra_info``)."""

    def breakdown(self, metric: str) -> Breakdown | None:
        """The breakdown of ``metric``, or None."""
        return next((b for b in self.breakdowns if b.metric == metric), None)

    def metric(self, name: str) -> Metric | None:
        """The metric called ``name``, or None."""
        for m in self.metrics:
            if m.name == name:
                return m
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """The metric names, in measurement order."""
        return tuple(m.name for m in self.metrics)


@dataclass(frozen=True)
class MetricVerdict:
    """How one metric of one cell compares with its baseline."""

    name: str
    """The metric name."""
    status: Status
    """The verdict."""
    current: float
    """The value measured now."""
    baseline: float | None
    """The baseline value (None when new)."""
    tolerance: float
    """The relative tolerance applied."""
    unit: str = ""
    """The metric's unit."""
    direction: Direction = Direction.LOWER_IS_BETTER
    """Which way the metric gets worse."""
    change: float | None = None
    """Relative change, current / baseline - 1 (for timings, the Hodges-Lehmann ratio - 1)."""
    interval: tuple[float, float] | None = None
    """For timings: the confidence interval of the relative change."""
    p_value: float | None = None
    """For timings: the one-sided p-value of the test in the direction of a regression."""
    noise: float | None = None
    """For timings: the baseline's between-round spread, the standard deviation of the log round
    medians (None when the baseline has fewer than two rounds)."""
    detectable: float | None = None
    """For timings: the smallest relative slowdown this cell detects with 95% power given its noise."""
    configured_tolerance: float | None = None
    """For timings whose tolerance the noise band widened: the tolerance configured (``tolerance`` is
    the one applied)."""
    step: int | None = None
    """For ``loss_curve``: the step (0-based, over the whole curve) at which the curve left its band."""
    grown: tuple[str, ...] = ()
    """For a metric with a breakdown in both the measurement and its baseline: the parts that appeared
    or grew, largest growth first (``+48 aten.copy_``); the failure message lists them."""
    grown_label: str = ""
    """What :attr:`grown` lists (``new sync sites``, ``ops that appeared or grew``)."""

    def describe(self) -> str:
        """One line for a failure message: metric, baseline, now, change, tolerance, interval, and for
        a timing the noise band and the smallest change the cell detects."""
        now = format_value(self.current, self.unit)
        if self.baseline is None:
            return f"{self.name}: {now} (new: no baseline)"
        if self.step is not None and self.change is not None:
            return (f"{self.name}: left its band at step {self.step} (mean of its window: baseline "
                    f"{format_value(self.baseline, self.unit)}, now {now}, change {format_change(self.change)}; "
                    f"tolerance {self.tolerance:.1%} either way)")
        base = format_value(self.baseline, self.unit)
        text = f"{self.name}: baseline {base}, now {now}"
        if self.change is not None:
            text += f", change {format_change(self.change)}"
        text += f" (tolerance {self.tolerance:.1%}"
        if self.configured_tolerance is not None and self.noise is not None:
            text += f", widened from {self.configured_tolerance:.1%} by the baseline's noise band ±{self.noise:.1%}"
        if self.direction is Direction.EXACT:
            text += " either way"
        if self.interval is not None:
            lo, hi = self.interval
            text += f"; 95% CI {format_change(lo)} to {format_change(hi)}"
        if self.p_value is not None:
            text += f"; p={self.p_value:.2g}"
        if self.detectable is not None and math.isfinite(self.detectable):
            text += f"; caught with 95% power from {format_change(self.detectable)}"
        return text + ")"


@dataclass(frozen=True)
class CellVerdict:
    """The verdicts of every metric of one cell."""

    measurement: Measurement
    """What was measured."""
    metrics: tuple[MetricVerdict, ...]
    """One verdict per metric measured now."""
    missing: tuple[str, ...] = field(default=())
    """Metrics in the baseline that were not measured now."""
    outcome: Status | None = None
    """The verdict on the cell's outcome when it or its baseline did not end measured (an OOM now or
    before); None when both were measured."""
    baseline_outcome: Outcome | None = None
    """How the baseline's run ended (None without a baseline)."""
    screen: tuple[MetricVerdict, ...] = ()
    """For a cell whose timings regressed against the stored baseline and were then confirmed side by
    side (:attr:`confirmed_against`): the stored-baseline verdicts of those timings, the screen's.
    :attr:`metrics` then holds the side-by-side verdicts of the timings."""
    confirmed_against: str = ""
    """The revision the timings were confirmed against, side by side on this machine (``0e20a21b1c2d``);
    empty when they were not."""
    confirmed_pairings: int = 0
    """How many pairs of worker processes measured the timings side by side, their pairs pooled (0 when
    they were not confirmed side by side)."""

    @property
    def status(self) -> Status:
        """The worst status of the outcome and the metrics (regressed > improved > new > unchanged).

        A report-only metric (infinite tolerance, e.g. ``cpu_utilization``) that is new to a cell
        with a baseline, as after an upgrade adds it, leaves the cell's status alone."""
        statuses = [m.status for m in self.metrics if not (m.status is Status.NEW and math.isinf(m.tolerance))]
        statuses += [self.outcome] if self.outcome is not None else []
        if not statuses:
            return Status.NEW
        return max(statuses, key=lambda s: s.rank)

    def metric(self, name: str) -> MetricVerdict | None:
        """The verdict on metric ``name``, or None."""
        for m in self.metrics:
            if m.name == name:
                return m
        return None

    @property
    def regressions(self) -> tuple[MetricVerdict, ...]:
        """The regressed metrics."""
        return tuple(m for m in self.metrics if m.status is Status.REGRESSED)


class FigureKind(enum.Enum):
    """How a figure is derived from the cells of one grid."""

    RELATIVE = "relative"
    """A variant's metric relative to the reference variant's in the same cell of the other axes
    (``tp.relative``): ``value`` is ``variant / reference - 1`` (0.42: +42%, e.g. a recompute cost)."""
    SCALING = "scaling"
    """The exponent ``b`` of ``metric = a * x^b`` fitted across one axis (``tp.scaling``)."""


@dataclass(frozen=True)
class RankInfo:
    """Where a rank of a distributed cell stands in its job (from the launcher's environment)."""

    rank: int
    """This process's rank, 0 to ``world_size - 1``."""
    world_size: int
    """Ranks in the job."""
    local_rank: int
    """This process's rank on its node: the index of its device."""


@dataclass(frozen=True)
class DistributedSpec:
    """What ``tp.ranks(world_size=2)`` asks for: the cell runs as a job of ranks."""

    world_size: int | None
    """Ranks per cell; None: each cell's value of the grid axis ``world_size``."""
    timeout: float
    """Seconds the ranks may run, launch included, before the cell is stopped as ``timeout``; also the
    process group's timeout (a collective that waits longer raises)."""
    same_loss: float | None = None
    """The relative tolerance within which every rank's loss must equal rank 0's at every step
    (``tp.ranks(same_loss=True)``: DDP on the same data, an all-reduced loss); None: not checked (each
    rank's loss is its own, e.g. its own shard of the data)."""


@dataclass(frozen=True)
class RelativeSpec:
    """What ``tp.relative(variant="plain")`` asks for."""

    axis: str
    """The grid axis naming the variants."""
    reference: Scalar
    """The variant every other one is compared with."""
    metrics: tuple[str, ...]
    """The metrics viewed relative to the reference."""
    tolerance: float | None = None
    """How far the relative figure may move (the ratio of ratios, relative); None: the default of
    :func:`pytest_trainperf.derived.figure_tolerance`."""


@dataclass(frozen=True)
class ScalingSpec:
    """What ``tp.scaling(x="seq_len", metrics=[...])`` asks for."""

    x: str
    """The grid axis the points vary along."""
    metrics: tuple[str, ...]
    """The metrics fitted as ``a * x^b``."""
    x_metric: str | None = None
    """A metric of each cell to use as the abscissa instead of the axis value (e.g. a recorded
    ``parameters`` count that the ``width`` axis sets); None: the axis value."""
    tolerance: float | None = None
    """How far the exponent may rise (absolute, in exponent units); None: the default."""

    @property
    def abscissa(self) -> str:
        """What x is: the axis name, or the metric with the axis it varies along."""
        return self.x if self.x_metric is None else f"{self.x_metric} (along {self.x})"


@dataclass(frozen=True)
class Figure:
    """A figure derived from several cells of one grid (``tp.relative``, ``tp.scaling``): stored with
    the baselines, guarded like a metric, drawn by ``--trainperf-plots``."""

    kind: FigureKind
    """Relative view or scaling fit."""
    metric: str
    """The metric it is derived from."""
    axis: str
    """Relative: the axis naming the variants. Scaling: the axis the points vary along."""
    cell: str
    """Relative: the variant cell's id. Scaling: the id of the fixed values of the other axes
    (``default`` when the grid has only the x axis)."""
    reference: str
    """Relative: the reference variant, as written in ids (``plain``). Scaling: what x is
    (:attr:`ScalingSpec.abscissa`)."""
    value: float
    """Relative: ``variant / reference - 1``. Scaling: the fitted exponent ``b``."""
    params: tuple[tuple[str, Scalar], ...] = ()
    """Relative: the variant cell's axis values. Scaling: the fixed values of the other axes."""
    interval: tuple[float, float] | None = None
    """The 95% interval of ``value`` (relative timings: from the samples; scaling: Theil-Sen's)."""
    rounds: tuple[float, ...] = ()
    """In a baseline: ``value`` per measurement round (from the round medians); its spread is the
    figure's noise band."""
    points: tuple[tuple[float, float], ...] = ()
    """Scaling: the ``(x, metric)`` points fitted, in x order. Relative: ``(reference, variant)``
    values of the metric."""
    coefficient: float | None = None
    """Scaling: the fitted ``a``."""
    unit: str = ""
    """The metric's unit."""
    direction: Direction = Direction.LOWER_IS_BETTER
    """Which way the figure gets worse: a relative figure follows its metric; an exponent is worse higher."""

    @property
    def key(self) -> str:
        """What identifies the figure within its test across sessions."""
        return f"{self.kind.value} {self.metric} {self.cell} vs {self.reference}"

    def shown(self) -> str:
        """The value as a person reads it: ``+42.0%`` or ``x^1.98``."""
        if self.kind is FigureKind.RELATIVE:
            return format_change(self.value)
        return f"x^{self.value:.2f}"

    def title(self) -> str:
        """What the figure is, for a message: ``step_time of variant=checkpointed relative to
        variant=plain at batch_size=8-window=256`` or ``step_time ~ seq_len^b at batch_size=8``."""
        if self.kind is FigureKind.RELATIVE:
            own = dict(self.params)
            others = "-".join(f"{k}={v}" for k, v in self.params if k != self.axis)
            where = f" at {others}" if others else ""
            return (f"{self.metric} of {self.axis}={own.get(self.axis)} relative to "
                    f"{self.axis}={self.reference}{where}")
        where = f" at {self.cell}" if self.cell != "default" else ""
        return f"{self.metric} ~ {self.reference}^b{where}"


@dataclass(frozen=True)
class FigureVerdict:
    """How a derived figure compares with the baseline's."""

    figure: Figure
    """The figure now."""
    status: Status
    """The verdict."""
    tolerance: float
    """The tolerance applied (relative figures: on the ratio of ratios; scaling: on the exponent),
    after widening by the noise band."""
    baseline: Figure | None = None
    """The baseline's figure (None: new)."""
    change: float | None = None
    """Relative: ``(1 + now) / (1 + baseline) - 1``. Scaling: ``now - baseline`` in exponent units."""
    noise: float | None = None
    """The baseline's between-round spread of the figure (None with fewer than two rounds)."""
    test_file: str = ""
    """The test file, relative to the rootdir."""
    test: str = ""
    """The test's name inside its file."""
    axes: tuple[tuple[str, tuple[Scalar, ...]], ...] = ()
    """The test's grid axes."""
    confirmed_against: str = ""
    """A timing figure that regressed against the stored baseline (and in the re-measurements) and was
    then measured side by side: the commit it was measured with, in lockstep on this machine (``""``
    when it was not). ``status`` is then the side-by-side verdict; ``baseline`` and ``change`` stay the
    stored comparison's."""
    side_change: float | None = None
    """Side by side: how far the figure moved, this tree against ``confirmed_against`` on this machine.
    Relative: the variant cell's paired change over the reference cell's, minus 1. Scaling: the
    exponent of the cells' paired changes along x (in exponent units)."""
    side_interval: tuple[float, float] | None = None
    """The 95% interval of ``side_change``."""

    def describe(self) -> str:
        """One line for a failure message."""
        now = self.figure
        if self.baseline is None:
            return f"{now.title()}: {now.shown()} (new: no baseline)"
        text = f"{now.title()}: baseline {self.baseline.shown()}, now {now.shown()}"
        if now.kind is FigureKind.RELATIVE and self.change is not None:
            text += f" (the ratio moved {format_change(self.change)}; tolerance {self.tolerance:.1%}"
        elif self.change is not None:
            text += f" (exponent {self.change:+.2f}; tolerance +{self.tolerance:.2f}"
        else:
            text += " ("
        if now.interval is not None:
            lo, hi = now.interval
            if now.kind is FigureKind.RELATIVE:
                text += f"; 95% CI now {format_change(lo)} to {format_change(hi)}"
            else:
                text += f"; 95% CI now {lo:.2f} to {hi:.2f}"
        if self.noise is not None:
            text += f"; baseline noise band ±{self.noise:.2g}"
        text += ")"
        if self.confirmed_against and self.side_change is not None:
            text += f"; side by side with {self.confirmed_against}: "
            low, high = self.side_interval if self.side_interval is not None else (None, None)
            if now.kind is FigureKind.RELATIVE:
                text += f"the ratio moved {format_change(self.side_change)}"
                if low is not None and high is not None:
                    text += f" (95% CI {format_change(low)} to {format_change(high)})"
            else:
                text += f"the exponent moved {self.side_change:+.2f}"
                if low is not None and high is not None:
                    text += f" (95% CI {low:+.2f} to {high:+.2f})"
        return text


@dataclass(frozen=True)
class Cell:
    """Which cell of which test: what a fixture serves and a runner measures."""

    nodeid: str
    """The pytest node id, for messages."""
    test_file: str
    """The test file, relative to the rootdir."""
    test: str
    """The test's name inside its file (``test_x`` or ``TestA::test_x``)."""
    cell: str
    """The cell id (``batch_size=4-seq_len=16``; ``default`` without a grid)."""
    params: tuple[tuple[str, Scalar], ...]
    """The cell's parameter values, grid axes first."""
    axes: tuple[tuple[str, tuple[Scalar, ...]], ...]
    """The test's grid axes in declaration order (empty without a grid)."""

    @property
    def grid(self) -> str:
        """The node id without the parameters: what the cells of one grid share."""
        return grid_key(self.nodeid)


@dataclass(frozen=True)
class CellResult:
    """One concluded cell of a session: which cell, how it compared, and where it was measured (what
    the report, the outputs and a result file hold)."""

    nodeid: str
    """The pytest node id (``tests/test_lm.py::test_step[batch_size=4]``)."""
    test_file: str
    """The test file, relative to the rootdir."""
    test: str
    """The test's name inside its file."""
    cell: str
    """The cell id."""
    axes: tuple[tuple[str, tuple[Scalar, ...]], ...]
    """The test's grid axes in declaration order (empty without a grid)."""
    verdict: CellVerdict
    """The measurement and its verdict against the baseline."""
    fingerprint: Fingerprint
    """The environment it was measured in."""
    elsewhere: tuple[str, ...] = ()
    """For a cell with no baseline here: the environments whose baselines in the file hold it."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies the cell across sessions: test file, test, cell id, environment key."""
        return (self.test_file, self.test, self.cell, self.fingerprint.key)


    @classmethod
    def of(cls, cell: Cell, verdict: CellVerdict, fingerprint: Fingerprint,
           elsewhere: tuple[str, ...] = ()) -> CellResult:
        """The result of ``cell``."""
        return cls(nodeid=cell.nodeid, test_file=cell.test_file, test=cell.test, cell=cell.cell, axes=cell.axes,
                   verdict=verdict, fingerprint=fingerprint, elsewhere=elsewhere)


@dataclass(frozen=True)
class BaselineChange:
    """One metric of one cell rewritten by ``--trainperf-update-baselines``."""

    path: str
    """The baseline file, relative to the rootdir."""
    test: str
    """The test name inside its file."""
    cell: str
    """The cell id."""
    metric: str
    """The metric name."""
    old: float | None
    """The value before the update (None: the cell or metric is new)."""
    new: float
    """The value written."""
    unit: str = ""
    """The metric's unit."""


def relative_change(current: float, baseline: float) -> float:
    """``(current - baseline) / |baseline|``; ``0`` when both are zero, ``±inf`` from a zero baseline.

    Dividing by the magnitude keeps the sign meaning "rose" for negative values too (a recorded
    log-likelihood going from -2 to -1 rose by 50%).
    """
    if baseline == 0:
        if current == 0:
            return 0.0
        return math.copysign(math.inf, current)
    return (current - baseline) / abs(baseline)


def format_change(change: float) -> str:
    """A relative change as a signed percentage: ``+12.3%``, ``-0.4%``, ``+inf%``; ``nan%`` when
    there is no change to speak of (a NaN on either side)."""
    if math.isnan(change):
        return "nan%"
    if math.isinf(change):
        return "+inf%" if change > 0 else "-inf%"
    pct = round(change * 100, 1)
    if abs(pct) >= 100:
        return f"{pct:+.0f}%"
    return f"{pct:+.1f}%"


# --------------------------------------------------------------------------- what may be stored

MAX_INT_BITS = 1024
"""The largest integer (in bits) a stored parameter may be: far below the digits a JSON reader
accepts (Python's int-string limit is 4300 digits), far above any grid value."""


def finite_number(value: object) -> bool:
    """A number (not a bool) that is finite, and for an int one a float can hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return value.bit_length() <= MAX_INT_BITS
    return math.isfinite(value)


def _check_numbers(where: str, values: Sequence[object], expected: str, positive: bool = False) -> list[str]:
    """The first value of ``values`` that is not a finite (positive) number, as a problem."""
    for i, v in enumerate(values):
        if not finite_number(v) or (positive and not v > 0):  # type: ignore[operator]
            return [f"{where}[{i}]: expected {expected}, got {v!r}"]
    return []


def check_params(where: str, params: Sequence[object]) -> list[str]:
    """Why cell or figure parameters cannot be stored: each a ``(name, value)`` pair whose name is a
    string and whose value is a scalar (str, bool, int or finite float)."""
    problems = []
    for i, pair in enumerate(params):
        name, value = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
        if not isinstance(name, str):
            problems.append(f"{where}[{i}]: expected a (name, value) pair, got {pair!r:.120}")
        elif isinstance(value, (bool, str)):
            continue
        elif not finite_number(value):
            problems.append(f"{where}[{i}] ({name}): expected a string, a bool or a finite number, "
                            f"got {value!r:.120}")
    return problems


def check_metric(metric: Metric) -> list[str]:
    """Why one metric cannot be stored (empty: it can): a value that is not a finite number, samples
    or round medians that are not finite positive numbers (they are timings and rates), a tolerance
    that is neither a non-negative number nor infinite, a unit that is not a string."""
    where = f"metrics.{metric.name}"
    problems = []
    if not finite_number(metric.value):
        problems.append(f"{where}.value: expected a finite number, got {metric.value!r}")
    if not isinstance(metric.unit, str):
        problems.append(f"{where}.unit: expected a string, got {metric.unit!r:.120}")
    problems += _check_numbers(f"{where}.samples", metric.samples, "a finite positive number", positive=True)
    problems += _check_numbers(f"{where}.rounds", metric.rounds, "a finite positive number", positive=True)
    tol = metric.tolerance
    if tol is not None and not (tol == math.inf or (finite_number(tol) and tol >= 0)):
        problems.append(f"{where}.tolerance: expected a non-negative number, infinity or None, got {tol!r}")
    return problems


def info_problem(key: str, value: object) -> str | None:
    """Why ``key=value`` cannot be a cell's metadata (:attr:`Measurement.info`), or None: a value is a
    string, a boolean, an integer or a finite float."""
    if isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return None
    return f"{key}: expected a string, a boolean, an integer or a finite float, got {value!r:.80}"


def check_finite(measurement: Measurement) -> list[str]:
    """Why a cell's measurement cannot be written to a baseline file, one line per problem naming
    the field (``metrics.step_time.samples[3]: expected a finite positive number, got nan``); empty
    when it can. JSON has no NaN or infinity, and a reader refuses what this refuses, so a baseline
    the plugin writes always reads back. Checks every number (metric values, samples, round
    medians, tolerances, the loss curve, items per step, parameters) and the metric units."""
    problems = check_params("params", measurement.params)
    for metric in measurement.metrics:
        problems += check_metric(metric)
    problems += _check_numbers("loss_curve", measurement.loss_curve, "a finite number")
    items = measurement.items_per_step
    if items is not None and not (finite_number(items) and items > 0):
        problems.append(f"items_per_step: expected a finite positive number or None, got {items!r}")
    problems += check_breakdowns(measurement)
    for name in ("steps", "warmup"):
        value = getattr(measurement, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            problems.append(f"{name}: expected a non-negative integer, got {value!r}")
    return problems


def check_breakdowns(measurement: Measurement) -> list[str]:
    """Why a measurement's breakdowns cannot be stored: each of a metric the measurement has, once;
    parts named by strings, once each, with finite non-negative amounts; unit and label strings."""
    problems = []
    seen: set[str] = set()
    for b in measurement.breakdowns:
        where = f"breakdowns.{b.metric}"
        if not isinstance(b.metric, str) or measurement.metric(b.metric) is None or b.metric in seen:
            problems.append(f"{where}: expected the breakdown of a metric of the cell, once; got {b.metric!r:.120}")
        seen.add(str(b.metric))
        if not isinstance(b.unit, str) or not isinstance(b.label, str):
            problems.append(f"{where}: expected unit and label to be strings, got {b.unit!r:.60}, {b.label!r:.60}")
        names: set[str] = set()
        for i, part in enumerate(b.parts):
            name, amount = part if isinstance(part, tuple) and len(part) == 2 else (None, None)
            if not isinstance(name, str) or name in names or not finite_number(amount) or amount < 0:
                problems.append(f"{where}.parts[{i}]: expected a (name, non-negative number) pair with a new "
                                f"name, got {part!r:.120}")
                break
            names.add(name)
    return problems


def check_figure(figure: Figure, where: str | None = None) -> list[str]:
    """Why a derived figure cannot be written to a baseline file (empty: it can), as
    :func:`check_finite` does for a cell: its value, interval, round values, points and coefficient
    must be finite. Each problem starts with ``where`` (default: ``figures[<key>]``; empty: the field
    alone)."""
    where = f"figures[{figure.key!r}]" if where is None else where
    at = f"{where}." if where else ""
    problems = []
    if not finite_number(figure.value):
        problems.append(f"{at}value: expected a finite number, got {figure.value!r}")
    problems += _check_numbers(f"{at}interval", figure.interval or (), "a finite number")
    problems += _check_numbers(f"{at}rounds", figure.rounds, "a finite number")
    for i, point in enumerate(figure.points):
        problems += _check_numbers(f"{at}points[{i}]", point, "a finite number")
    if figure.coefficient is not None and not finite_number(figure.coefficient):
        problems.append(f"{at}coefficient: expected a finite number or None, got {figure.coefficient!r}")
    if not isinstance(figure.unit, str):
        problems.append(f"{at}unit: expected a string, got {figure.unit!r:.120}")
    return problems + check_params(f"{at}params", figure.params)
