"""``tp.grid`` and ``tp.tolerance``: checked at decoration (collection) time, applied as markers.

``tp.grid(batch_size=[4, 16], seq_len=[16, 64])`` marks the test; the plugin's
``pytest_generate_tests`` turns the mark into one parametrized item per cell, with ids such as
``batch_size=4-seq_len=16``. Axis order is kept: the first axis gives the report's rows, the second
its columns, and each further axis one table per value.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_trainperf.records import DistributedSpec, RelativeSpec, Scalar, ScalingSpec, cell_id, format_scalar

F = TypeVar("F", bound=Callable[..., Any])

GRID_MARK = "trainperf_grid"
"""The marker ``tp.grid`` applies (its one argument is the :class:`Grid`)."""
TOLERANCE_MARK = "trainperf_tolerance"
"""The marker ``tp.tolerance`` applies (its one argument is a mapping metric -> tolerance)."""
BUDGET_MARK = "trainperf_memory_budget"
"""The marker ``tp.memory_budget`` applies (its one argument is the budget in bytes)."""
RESERVED_NAMES = ("trainperf", "request")
"""Names an axis may not take: they are fixtures the test needs."""


class GridError(ValueError):
    """An invalid ``tp.grid`` or ``tp.tolerance``: says what was expected and what was received."""


def test_name(nodeid: str, originalname: str | None = None, param_id: str | None = None) -> str:
    """The test's name inside its file, ``test_x`` or ``TestA::test_x``, from its node id
    (``tests/test_x.py::TestA::test_x[batch_size=4-name=a::b]``): without the file and without the
    parameters, which may hold ``::`` and ``[`` themselves (a grid value ``"a::b"``).

    The file is what comes before the first ``::``. ``param_id`` (the item's ``callspec.id``), when
    given, is cut from the end exactly; otherwise the parameters are everything from the first ``[``
    after the file, which no class or function name holds. ``originalname`` (the item's: the
    function's name without parameters) replaces the last part.
    """
    _, sep, inside = nodeid.partition("::")
    inside = inside if sep else nodeid
    suffix = f"[{param_id}]" if param_id is not None else None
    if suffix is not None and inside.endswith(suffix):
        inside = inside[:-len(suffix)]
    else:
        inside = inside.split("[", 1)[0]
    parts = inside.split("::")
    if originalname:
        parts[-1] = originalname
    return "::".join(parts)


def _check_value(axis: str, value: object) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise GridError(f"tp.grid axis {axis!r}: expected finite values, got {value!r}")
    if isinstance(value, (bool, int, float, str)):
        return value
    raise GridError(f"tp.grid axis {axis!r}: expected scalar values (int, float, str or bool), "
                    f"got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class Grid:
    """The axes of a grid test, in declaration order."""

    axes: tuple[tuple[str, tuple[Scalar, ...]], ...]
    """``(name, values)`` per axis."""

    @property
    def names(self) -> tuple[str, ...]:
        """The axis names in order."""
        return tuple(name for name, _ in self.axes)

    def cells(self) -> list[tuple[Scalar, ...]]:
        """Every cell: the cartesian product of the axes, first axis slowest."""
        return list(itertools.product(*(values for _, values in self.axes)))

    def ids(self) -> list[str]:
        """The pytest id of every cell, in :meth:`cells` order."""
        return [cell_id(self.names, cell) for cell in self.cells()]


def make_grid(axes: Mapping[str, object]) -> Grid:
    """Check the axes and build a :class:`Grid`; raise :class:`GridError` naming the bad axis."""
    checked = []
    for name, values in axes.items():
        if name in RESERVED_NAMES:
            raise GridError(f"tp.grid axis {name!r}: this name is reserved for a fixture; rename the axis")
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, range)):
            raise GridError(f"tp.grid axis {name!r}: expected a non-empty list of scalars, "
                            f"got {type(values).__name__} {values!r}")
        if len(values) == 0:
            raise GridError(f"tp.grid axis {name!r}: expected a non-empty list of scalars, got an empty "
                            f"{type(values).__name__}")
        scalars = tuple(_check_value(name, v) for v in values)
        ids = [format_scalar(v) for v in scalars]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise GridError(f"tp.grid axis {name!r}: expected distinct values, got {', '.join(dupes)} "
                            f"more than once in {list(scalars)!r}")
        checked.append((name, scalars))
    return Grid(axes=tuple(checked))


def grid(**axes: Sequence[Scalar]) -> Callable[[F], F]:
    """Spread a test over the cartesian product of ``axes``: one pytest item per cell.

    Each axis is a non-empty list of scalars and arrives as the test argument of that name::

        @tp.grid(batch_size=[4, 16], seq_len=[16, 64])
        def test_encoder(trainperf, batch_size, seq_len): ...
    """
    return _once(GRID_MARK, make_grid(axes), "tp.grid", "expected one tp.grid with every axis")


def _mark(name: str, spec: object) -> Callable[[F], F]:
    """The pytest marker ``name`` with its one argument (pytest is imported here, when a test file
    applies a decorator, not when the package is imported)."""
    import pytest

    return getattr(pytest.mark, name)(spec)  # type: ignore[no-any-return]


def _once(mark: str, spec: object, call: str, expected: str) -> Callable[[F], F]:
    """A decorator applying ``mark(spec)``, refusing a test that has that mark already."""

    def apply(fn: F) -> F:
        marks = getattr(fn, "pytestmark", [])
        if any(getattr(m, "name", None) == mark for m in marks):
            raise GridError(f"{call} applied twice to {getattr(fn, '__name__', fn)!r}: {expected}")
        return _mark(mark, spec)(fn)

    return apply


def make_tolerances(tolerances: Mapping[str, object]) -> dict[str, float]:
    """Check per-test tolerances: built-in metric names, non-negative numbers."""
    from pytest_trainperf.stats import BUILTIN_METRICS

    checked = {}
    for metric, tol in tolerances.items():
        if metric not in BUILTIN_METRICS:
            raise GridError(f"tp.tolerance: unknown metric {metric!r}; expected one of "
                            f"{', '.join(BUILTIN_METRICS)} (give a recorded metric its tolerance with "
                            "trainperf.record(..., tolerance=))")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or math.isnan(tol) or tol < 0:
            raise GridError(f"tp.tolerance({metric}=...): expected a non-negative relative tolerance "
                            f"such as 0.1 for 10%, got {tol!r}")
        checked[metric] = float(tol)
    return checked


def tolerance(**tolerances: float) -> Callable[[F], F]:
    """Override the relative tolerances of built-in metrics for one test, e.g. ``step_time=0.25``."""
    spec = make_tolerances(tolerances)
    return _mark(TOLERANCE_MARK, spec)


def _size(call: str, size: object) -> int:
    """A device memory size given to a decorator: ``"24GiB"`` or a number of bytes."""
    from pytest_trainperf.units import MAX_SIZE, SIZE_EXPECTED, parse_size

    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise GridError(f"{call}: expected a size such as '24GiB' or a number of bytes, got {size!r:.80}")
    if isinstance(size, int):  # not through str(): a 5000-digit int has no str() in Python 3.11
        if not 1 <= size < MAX_SIZE:
            shown = f"{size}" if size.bit_length() < 256 else f"an integer of {size.bit_length()} bits"
            raise GridError(f"{call}: expected {SIZE_EXPECTED}, got {shown}")
        return size
    try:
        return parse_size(size)
    except ValueError as exc:
        raise GridError(f"{call}: {exc}") from None


def memory_budget(size: str | int) -> Callable[[F], F]:
    """Give one test a memory budget: a cell whose peak memory exceeds it is reported as out of memory
    (emulated), as if it ran on a device of that size, e.g. ``@tp.memory_budget("24GiB")`` to guard
    on a CPU runner that a grid still fits on a 24 GB card. Overrides ``--trainperf-memory-budget``."""
    return _mark(BUDGET_MARK, _size("tp.memory_budget", size))


FORECAST_MARK = "trainperf_forecast"
"""The marker ``tp.forecast`` applies (its one argument is the :class:`ForecastSpec`)."""


@dataclass(frozen=True)
class ForecastSpec:
    """What ``tp.forecast`` asks for."""

    memory: int | None = None
    """The device's memory in bytes: a cell whose forecast peak exceeds it is ``oom-forecast``."""
    memory_axis: str | None = None
    """A grid axis whose values are device memory sizes (``"24GiB"``), one OOM map per value."""

    def memory_of(self, params: Mapping[str, Scalar]) -> int | None:
        """The device memory of the cell with these parameters (checked at collection)."""
        if self.memory_axis is None:
            return self.memory
        return _size(f"tp.forecast(memory_axis={self.memory_axis!r})", params[self.memory_axis])

    def check(self, grid: Grid | None) -> str | None:
        """Why this spec does not fit the test's grid, or None."""
        if self.memory_axis is None:
            return None
        names = grid.names if grid is not None else ()
        if self.memory_axis not in names:
            return (f"tp.forecast(memory_axis={self.memory_axis!r}): expected the name of a tp.grid axis "
                    f"({', '.join(map(repr, names)) or 'the test has no grid'})")
        for value in dict(grid.axes)[self.memory_axis] if grid is not None else ():
            try:
                _size(f"tp.forecast(memory_axis={self.memory_axis!r})", value)
            except GridError as exc:
                return str(exc)
        return None


def forecast(memory: str | int | None = None, *, memory_axis: str | None = None) -> Callable[[F], F]:
    """Forecast the test's CUDA memory on the ``meta`` device instead of running it: ``trainperf.device``
    is ``meta``, and ``train``/``run`` run the step once or twice without data, counting each storage
    as the CUDA caching allocator would (``peak_memory_forecast``, broken down into parameters,
    gradients, optimizer state, activations and temporaries). With ``memory="24GiB"``, a cell over
    it is ``OOM (forecast)``; with ``memory_axis="gpu"``, each value of the grid axis ``gpu`` is a
    device size, and the grid becomes one OOM map per device."""
    if memory is not None and memory_axis is not None:
        raise GridError(f"tp.forecast: expected memory= or memory_axis=, not both; got memory={memory!r:.40}, "
                        f"memory_axis={memory_axis!r:.40}")
    if memory_axis is not None and (not isinstance(memory_axis, str) or not memory_axis.isidentifier()):
        raise GridError(f"tp.forecast: expected memory_axis to name a tp.grid axis, got {memory_axis!r:.80}")
    size = _size("tp.forecast(memory=...)", memory) if memory is not None else None
    return _mark(FORECAST_MARK, ForecastSpec(memory=size, memory_axis=memory_axis))


RELATIVE_MARK = "trainperf_relative"
"""The marker ``tp.relative`` applies (its one argument is the :class:`RelativeSpec`)."""
SCALING_MARK = "trainperf_scaling"
"""The marker ``tp.scaling`` applies, once per fit (its one argument is the :class:`ScalingSpec`)."""
RELATIVE_METRICS = ("step_time", "peak_memory")
"""What ``tp.relative`` views relative to the reference when no ``metrics`` are given."""


def _metric_names(call: str, metrics: object) -> tuple[str, ...]:
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)) or not metrics \
            or not all(isinstance(m, str) and m for m in metrics):
        raise GridError(f"{call}: expected metrics=[...], a non-empty list of metric names such as "
                        f"['step_time', 'flops'], got {metrics!r}")
    return tuple(metrics)


def _figure_tolerance(call: str, tolerance: object) -> float | None:
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or math.isnan(tolerance) \
            or tolerance < 0:
        raise GridError(f"{call}: expected tolerance=None or a non-negative number, got {tolerance!r}")
    return float(tolerance)


def make_relative(axis: Mapping[str, object], metrics: object = RELATIVE_METRICS,
                  tolerance: object = None) -> RelativeSpec:
    """Check the arguments of ``tp.relative`` and build its :class:`RelativeSpec`."""
    if len(axis) != 1:
        raise GridError("tp.relative: expected exactly one axis=reference keyword such as "
                        f"variant='plain', got {dict(axis)!r}")
    (name, reference), = axis.items()
    return RelativeSpec(axis=name, reference=_check_value(name, reference),
                        metrics=_metric_names("tp.relative", metrics),
                        tolerance=_figure_tolerance("tp.relative", tolerance))


def relative(*, metrics: Sequence[str] = RELATIVE_METRICS, tolerance: float | None = None,
             **axis: Scalar) -> Callable[[F], F]:
    """View every variant of one grid axis relative to a reference variant, cell by cell of the
    other axes, and guard those relative figures against the baseline's::

        @tp.grid(batch_size=[4, 16], window=[64, 256], variant=["plain", "checkpointed"])
        @tp.relative(variant="plain", metrics=["step_time", "peak_memory"])
        def test_recompute(trainperf, batch_size, window, variant): ...

    reports (and guards) the recompute cost ``step_time(checkpointed) / step_time(plain) - 1`` at
    each batch size and window. ``tolerance`` bounds how far a figure may move (the ratio of
    ratios); the default is 5% for timings and the metric's own tolerance otherwise.
    """
    return _once(RELATIVE_MARK, make_relative(axis, metrics, tolerance), "tp.relative",
                 "expected one reference axis per test")


def make_scaling(x: object, metrics: object, x_metric: object = None, tolerance: object = None) -> ScalingSpec:
    """Check the arguments of ``tp.scaling`` and build its :class:`ScalingSpec`."""
    if not isinstance(x, str) or not x:
        raise GridError(f"tp.scaling: expected x='<grid axis>' such as x='seq_len', got {x!r}")
    if x_metric is not None and (not isinstance(x_metric, str) or not x_metric):
        raise GridError(f"tp.scaling: expected x_metric=None or a metric name such as 'parameters', "
                        f"got {x_metric!r}")
    return ScalingSpec(x=x, metrics=_metric_names("tp.scaling", metrics), x_metric=x_metric,
                       tolerance=_figure_tolerance("tp.scaling", tolerance))


def scaling(x: str, metrics: Sequence[str], *, x_metric: str | None = None,
            tolerance: float | None = None) -> Callable[[F], F]:
    """Fit ``metric = a * x^b`` along grid axis ``x`` (per cell of the other axes), report the
    exponent with its interval, store it with the baselines and fail when it rises beyond
    ``tolerance`` (exponent units, default 0.25): a complexity regression, caught even when every
    cell stays within its own tolerance::

        @tp.grid(seq_len=[64, 128, 256, 512])
        @tp.scaling(x="seq_len", metrics=["step_time", "flops"])
        def test_attention(trainperf, seq_len): ...

    ``x_metric`` takes x from a metric each cell records instead of the axis value (e.g.
    ``trainperf.record("parameters", n)`` with a ``width`` axis). May be applied once per fit.
    """
    spec = make_scaling(x, metrics, x_metric, tolerance)
    return _mark(SCALING_MARK, spec)


def check_figures(grid: Grid | None, relative: RelativeSpec | None, fits: Sequence[ScalingSpec]) -> str | None:
    """Why ``tp.relative``/``tp.scaling`` do not fit the test's grid (None when they do); checked at
    collection time, when the grid is known."""
    axes = dict(grid.axes) if grid is not None else {}
    names = ", ".join(axes) or "none"
    if relative is not None:
        values = axes.get(relative.axis)
        if values is None:
            return f"tp.relative: expected a grid axis, got {relative.axis!r} (the grid's axes: {names})"
        if format_scalar(relative.reference) not in [format_scalar(v) for v in values]:
            return (f"tp.relative({relative.axis}=...): expected one of the axis values "
                    f"{list(values)!r}, got {relative.reference!r}")
        if len(values) < 2:
            return (f"tp.relative({relative.axis}=...): expected an axis with at least two variants, "
                    f"got {list(values)!r}")
    from pytest_trainperf.derived import MIN_SCALING_POINTS

    for fit in fits:
        values = axes.get(fit.x)
        if values is None:
            return f"tp.scaling: expected x to be a grid axis, got {fit.x!r} (the grid's axes: {names})"
        if fit.x_metric is None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                            for v in values):
            return (f"tp.scaling(x={fit.x!r}): expected positive numbers on the axis (or x_metric=), "
                    f"got {list(values)!r}")
        if len(values) < MIN_SCALING_POINTS:
            return (f"tp.scaling(x={fit.x!r}): expected at least {MIN_SCALING_POINTS} values on the axis "
                    f"to fit an exponent, got {list(values)!r}")
    return None


RANKS_MARK = "trainperf_ranks"
"""The marker ``tp.ranks`` applies (its one argument is the :class:`DistributedSpec`)."""
WORLD_SIZE_AXIS = "world_size"
"""The grid axis that gives a distributed cell its ranks when ``tp.ranks`` names none."""
DEFAULT_RANKS_TIMEOUT = 300.0
"""Seconds a distributed cell's ranks may run before the cell is stopped as ``timeout``."""


SAME_LOSS_RTOL = 1e-6
"""The relative tolerance of ``tp.ranks(same_loss=True)``: the same computation on every rank gives the
same float32 loss, up to the order of a reduction (an all-reduce's, a kernel's)."""


def make_ranks(world_size: object = None, timeout: object = DEFAULT_RANKS_TIMEOUT,
               same_loss: object = False) -> DistributedSpec:
    """Check the arguments of ``tp.ranks`` and build its :class:`DistributedSpec`."""
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise GridError(f"tp.ranks: expected world_size=None (the grid axis {WORLD_SIZE_AXIS!r}) or an "
                        f"integer >= 1, got {world_size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise GridError(f"tp.ranks: expected timeout= a positive finite number of seconds, got {timeout!r}")
    if same_loss is True:
        rtol: float | None = SAME_LOSS_RTOL
    elif same_loss is False or same_loss is None:
        rtol = None
    elif isinstance(same_loss, (int, float)) and 0 <= same_loss < 1:
        rtol = float(same_loss)
    else:
        raise GridError("tp.ranks: expected same_loss=True, False or a relative tolerance in [0, 1) (e.g. 1e-4), "
                        f"got {same_loss!r}")
    return DistributedSpec(world_size=world_size, timeout=float(timeout), same_loss=rtol)


def ranks(world_size: int | None = None, *, timeout: float = DEFAULT_RANKS_TIMEOUT,
          same_loss: bool | float = False) -> Callable[[F], F]:
    """Run each cell of the test as a distributed job of ``world_size`` ranks, launched by torch's
    elastic launcher (the engine of ``torchrun``), one process per rank, each running the test body
    with the default process group initialised (gloo on the CPU, NCCL on CUDA, one device per rank)::

        @tp.ranks(world_size=2)
        def test_ddp(trainperf):
            model = DDP(Net().to(trainperf.device))
            ...
            trainperf.train(step, steps=10)

    Without ``world_size``, the grid axis ``world_size`` gives each cell its ranks
    (``@tp.grid(world_size=[1, 2])``). ``timeout``: seconds the ranks may run before the cell is
    stopped and reported as ``timeout`` (a hung collective). ``same_loss``: the ranks' losses must
    agree at every step (``True``: within a relative :data:`SAME_LOSS_RTOL`; a number: within that
    relative tolerance), as they do for DDP on the same data or an all-reduced loss; a rank that
    disagrees with rank 0 fails the cell, naming both ranks, the step and the two values."""
    return _once(RANKS_MARK, make_ranks(world_size, timeout, same_loss), "tp.ranks", "expected one tp.ranks per test")


def check_ranks(spec: DistributedSpec, grid: Grid | None) -> str | None:
    """Why ``tp.ranks`` does not fit the test's grid (None when it does); checked at collection."""
    axes = dict(grid.axes) if grid is not None else {}
    values = axes.get(WORLD_SIZE_AXIS)
    if spec.world_size is not None and values is not None:
        return (f"tp.ranks(world_size={spec.world_size}) and the grid axis {WORLD_SIZE_AXIS!r} both give the "
                f"ranks; expected one of them")
    if spec.world_size is None and values is None:
        return (f"tp.ranks: expected world_size=N or a grid axis {WORLD_SIZE_AXIS!r}, got neither "
                f"(the grid's axes: {', '.join(axes) or 'none'})")
    if values is not None:
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            return f"tp.grid axis {WORLD_SIZE_AXIS!r} of a tp.ranks test: expected integers >= 1, got {bad[0]!r}"
    return None
