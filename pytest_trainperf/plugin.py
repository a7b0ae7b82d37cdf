"""The pytest hooks: options, markers, grid expansion, and the one registered session object.

Module-level hooks only bootstrap; the state of a session lives in :class:`TrainPerfSession`,
registered under :data:`PLUGIN_NAME`. torch is never imported here.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pytest_trainperf import stats, store
from pytest_trainperf.fixture import Cell, EmulatedOutOfMemory, TrainPerf
from pytest_trainperf.grid import (
    BUDGET_MARK,
    GRID_MARK,
    RELATIVE_MARK,
    SCALING_MARK,
    TOLERANCE_MARK,
    Grid,
    check_figures,
)
from pytest_trainperf.measure.host import SYSTEM, fix_malloc
from pytest_trainperf.records import (
    SINGLE_CELL,
    BaselineChange,
    CellVerdict,
    Figure,
    FigureKind,
    FigureVerdict,
    Fingerprint,
    Measurement,
    Outcome,
    RelativeSpec,
    Scalar,
    ScalingSpec,
    Status,
    format_change,
    format_scalar,
)
from pytest_trainperf.settings import Settings, add_options, resolve

PLUGIN_NAME = "trainperf-session"
"""The name the session object is registered under."""
FIXTURE_KEY = pytest.StashKey[TrainPerf]()
"""Where an item keeps its ``trainperf`` fixture, for the call hook to read."""
SESSION_KEY = pytest.StashKey["TrainPerfSession"]()
"""Where the config keeps the session object (also registered as a plugin under PLUGIN_NAME)."""
UPDATE_HINT = "pytest --trainperf-update-baselines"
"""The command that accepts intended changes."""


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{GRID_MARK}(grid): applied by tp.grid: spread the test over a parameter grid")
    config.addinivalue_line(
        "markers", f"{TOLERANCE_MARK}(tolerances): applied by tp.tolerance: per-test relative tolerances")
    config.addinivalue_line(
        "markers", f"{BUDGET_MARK}(bytes): applied by tp.memory_budget: cells over it count as out of memory")
    config.addinivalue_line(
        "markers", f"{RELATIVE_MARK}(spec): applied by tp.relative: variants viewed relative to a reference")
    config.addinivalue_line(
        "markers", f"{SCALING_MARK}(spec): applied by tp.scaling: a power-law exponent fitted along an axis")
    from pytest_trainperf import against, distributed, isolate, outputs

    settings = distributed.assign_device(resolve(config), config)  # a worker's own --trainperf-devices
    malloc = ""
    if settings.enabled:  # before any test module is imported, so before its tensors are allocated
        malloc = fix_malloc() if settings.malloc == "fixed" else SYSTEM
    session = TrainPerfSession(settings, config, malloc)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, PLUGIN_NAME)
    outputs.register(config, session)  # JSON, Markdown, JUnit properties; the xdist integration
    isolate.register(config, session)  # --trainperf-isolate: the parent's or an isolated child's part
    against.register(config, session)  # --trainperf-against: the lockstep parent's or a lockstep child's part


@dataclass(frozen=True)
class CellResult:
    """One cell of the session as the report needs it."""

    cell: Cell
    """Which cell."""
    verdict: CellVerdict
    """How it compared."""
    fingerprint: Fingerprint
    """Where it was measured."""
    elsewhere: tuple[str, ...] = ()
    """For a cell with no baseline here: the environments whose baselines in the file hold it."""


@dataclass(frozen=True)
class FigureSpecs:
    """The figures one grid test asks for: ``tp.relative`` and any ``tp.scaling`` fits."""

    relative: RelativeSpec | None
    """The relative view, if any."""
    scaling: tuple[ScalingSpec, ...]
    """The scaling fits, in decoration order."""

    def derive(self, cells: list[Measurement]) -> list[Figure]:
        """Every figure of these cells."""
        from pytest_trainperf import derived

        out = derived.relative_figures(self.relative, cells) if self.relative is not None else []
        for fit in self.scaling:
            out += derived.scaling_figures(fit, cells)
        return out

    def tolerance(self, figure: Figure, overrides: dict[str, float]) -> float:
        """The tolerance of one of its figures."""
        from pytest_trainperf import derived

        if figure.kind is FigureKind.RELATIVE:
            given = self.relative.tolerance if self.relative is not None else None
        else:
            given = next((f.tolerance for f in self.scaling if f.abscissa == figure.reference), None)
        return derived.figure_tolerance(figure.kind, figure.metric, given, overrides)


@dataclass(frozen=True)
class PendingFigures:
    """A grid whose timing figures regressed, to be confirmed after the run loop by re-measuring the
    cells they come from, interleaved (a slow spell between two cells must not fake a figure)."""

    grid: str
    """The grid's node id without parameters."""
    specs: FigureSpecs
    """What figures it asks for."""
    overrides: dict[str, float]
    """Its ``tp.tolerance`` overrides."""
    shown: str
    """Its baseline file as shown."""
    baselines: store.BaselineFile
    """The baseline file."""
    figures: tuple[FigureVerdict, ...]
    """The regressed timing figures."""


def figure_specs(item: pytest.Item) -> FigureSpecs | None:
    """The figures a test item's markers ask for; None when it asks for none."""
    relative = item.get_closest_marker(RELATIVE_MARK)
    fits = tuple(m.args[0] for m in reversed(list(item.iter_markers(SCALING_MARK))))
    if relative is None and not fits:
        return None
    return FigureSpecs(relative=relative.args[0] if relative is not None else None, scaling=fits)


def _test_name(item: pytest.Item) -> str:
    """``test_x`` or ``TestA::test_x``: the node id inside the file, without parameters."""
    parts = item.nodeid.split("::")[1:]
    parts[-1] = getattr(item, "originalname", parts[-1].split("[")[0])
    return "::".join(parts)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (torch is loaded if a cell allocated anything)."""
    if isinstance(exc, MemoryError):
        return True
    if "torch" not in sys.modules:
        return False
    from pytest_trainperf.measure.memory import is_out_of_memory

    return is_out_of_memory(exc)


def _feeds(figure: Figure, cell: Measurement) -> bool:
    """Whether ``cell`` is one of the cells ``figure`` is derived from."""
    params = dict(cell.params)
    if figure.kind is FigureKind.RELATIVE:
        own = dict(figure.params)
        same_elsewhere = all(params.get(k) == v for k, v in own.items() if k != figure.axis)
        variant = params.get(figure.axis)
        return same_elsewhere and variant is not None and format_scalar(variant) in (
            format_scalar(own[figure.axis]), figure.reference)
    return all(params.get(k) == v for k, v in figure.params)


def _retimed(measurement: Measurement, again: list[Measurement]) -> Measurement:
    """``measurement`` with its timings replaced by those of its re-measurements, pooled."""
    if not again:
        return measurement
    pooled = stats.pool_rounds(again[0], again[1:])
    timed = {m.name: m for m in pooled.metrics if m.name in stats.TIMING_METRICS}
    return replace(measurement, metrics=tuple(timed.get(m.name, m) for m in measurement.metrics))


def _grid_key(nodeid: str) -> str:
    """The cells of one grid share their node id up to the parameter brackets."""
    return nodeid.split("[", 1)[0]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def cell_of(item: pytest.Item, rootpath: Path) -> Cell:
    """The :class:`Cell` of a test item: file, name, cell id, parameters, grid axes."""
    mark = item.get_closest_marker(GRID_MARK)
    grid: Grid | None = mark.args[0] if mark is not None else None
    axes = grid.axes if grid is not None else ()
    callspec = getattr(item, "callspec", None)
    values = dict(callspec.params) if callspec is not None else {}
    names = [n for n, _ in axes] + [n for n in values if n not in dict(axes)]
    params: tuple[tuple[str, Scalar], ...] = tuple(
        (n, values[n]) for n in names if isinstance(values.get(n), (bool, int, float, str)))
    return Cell(
        nodeid=item.nodeid,
        test_file=_relative(item.path, rootpath),
        test=_test_name(item),
        cell=callspec.id if callspec is not None else SINGLE_CELL,
        params=params,
        axes=axes,
    )


@pytest.fixture
def trainperf(request: pytest.FixtureRequest) -> TrainPerf:
    """Measure this cell: ``trainperf.train(step, steps=...)``, ``.run(fn, iters=...)``, ``.record(...)``."""
    session = request.config.stash[SESSION_KEY]
    budget = request.node.get_closest_marker(BUDGET_MARK)
    fixture = TrainPerf(cell_of(request.node, request.config.rootpath), session.settings, session.malloc,
                        timing_only=session.round > 1,
                        memory_budget=budget.args[0] if budget is not None else session.settings.memory_budget)
    request.node.stash[FIXTURE_KEY] = fixture
    if session.settings.enabled:
        if not session.against:  # a lockstep comparison (--trainperf-against) reads no baseline file
            session.baseline_file(fixture.cell)  # an unusable file fails the cell now, before it trains
        fixture.begin()
    return fixture


class TrainPerfSession:
    """The state of one pytest session: baselines read, verdicts given, updates to write."""

    def __init__(self, settings: Settings, config: pytest.Config, malloc: str = "") -> None:
        self.settings = settings
        self.config = config
        self.malloc = malloc
        self.results: list[CellResult] = []
        self.changes: list[BaselineChange] = []
        self.write_errors: list[str] = []
        self._files: dict[Path, store.BaselineFile | store.BaselineError] = {}
        self._pending: dict[Path, list[tuple[Fingerprint, CellResult]]] = {}
        self.round = 1
        """The measurement round running: 1, then 2.. ``--trainperf-rounds`` in an update's noise rounds."""
        self._extra_rounds: dict[str, list[Measurement]] = {}
        self._cell_seconds: dict[str, float] = {}
        self._grid_sizes: dict[str, int] = {}
        self._grid_p: dict[str, dict[str, list[float]]] = {}
        self.notes: dict[str, None] = {}
        """One-line notes of the cells (no NVML, no peak FLOP/s for the device), each printed once."""
        self.against = ""
        """What the cells are compared with when not their baselines (``--trainperf-against``: set by
        :mod:`pytest_trainperf.against`, e.g. ``main (1a2b3c4d5e6f), in lockstep``); empty: the baselines."""
        self._specs: dict[tuple[str, str], FigureSpecs] = {}
        self._grid_done: dict[str, list[CellResult]] = {}
        self._unconfirmed: list[PendingFigures] = []
        self.figure_failures: list[str] = []
        """Failure messages of figures whose timing regression was confirmed after the run loop (no
        test item is left to fail: they fail the session)."""
        self.figures: list[FigureVerdict] = []
        """The verdicts on the figures derived from whole grids (``tp.relative``, ``tp.scaling``)."""
        self.warnings: list[str] = []
        """Things about the run the report must say (a grid whose figures could not be judged)."""

    # ------------------------------------------------------------------ collection

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        mark = metafunc.definition.get_closest_marker(GRID_MARK)
        specs = figure_specs(metafunc.definition)
        if specs is not None:
            problem = check_figures(mark.args[0] if mark is not None else None, specs.relative, specs.scaling)
            if problem is not None:
                pytest.fail(f"{metafunc.definition.nodeid}: {problem}", pytrace=False)
        if mark is None:
            return
        grid: Grid = mark.args[0]
        if not grid.axes:
            return
        missing = [n for n in grid.names if n not in metafunc.fixturenames]
        if missing:
            args = ", ".join(n for n in metafunc.fixturenames if n != "request") or "none"
            pytest.fail(f"{metafunc.definition.nodeid}: tp.grid axis {missing[0]!r} is not an argument "
                        f"of {metafunc.function.__name__}(); expected each axis to be one of the test's "
                        f"arguments ({args})", pytrace=False)
        metafunc.parametrize(list(grid.names), grid.cells(), ids=grid.ids())

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._grid_sizes.clear()
        for item in session.items:
            key = _grid_key(item.nodeid)
            self._grid_sizes[key] = self._grid_sizes.get(key, 0) + 1
            specs = figure_specs(item)
            if specs is not None:
                self._specs[(_relative(item.path, self.config.rootpath), _test_name(item))] = specs

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Under pytest-xdist, keep each grid with figures together (``--dist loadgroup``): its
        figures are judged where its last cell runs, from all of its cells."""
        if not self.config.pluginmanager.hasplugin("xdist"):
            return
        for item in items:
            if figure_specs(item) is not None:
                item.add_marker(pytest.mark.xdist_group(name=_grid_key(item.nodeid)))

    # ------------------------------------------------------------------ running

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        result = yield
        stopped = bool(session.shouldfail or session.shouldstop)
        if self.settings.update and self.settings.rounds > 1 and not stopped:
            self._noise_rounds(session)
        if self._unconfirmed:
            self._confirm_figures(session, remeasure=not stopped)
        return result

    def _noise_rounds(self, session: pytest.Session) -> None:
        """Run rounds 2.. ``--trainperf-rounds`` of every cell measured in round 1, one cell after the
        other in each round (so a slow spell of the machine hits many cells, not all rounds of one),
        each a separate warm start of the test, timing only; reports are not logged."""
        from _pytest.runner import runtestprotocol

        measured = {r.cell.nodeid for entries in self._pending.values() for _, r in entries
                    if r.verdict.measurement.outcome is Outcome.MEASURED}
        items = [item for item in session.items if item.nodeid in measured]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        for number in range(2, self.settings.rounds + 1):
            self.round = number
            due = [item for item in items if self._cell_seconds.get(item.nodeid, 0.0) < self.settings.max_time]
            if not due:
                break
            if reporter is not None:
                reporter.write_line(f"trainperf: noise round {self.round} of {self.settings.rounds} "
                                    f"({len(due)} cell{'s' * (len(due) != 1)})")
            for i, item in enumerate(due):
                started = time.perf_counter()
                runtestprotocol(item, log=False, nextitem=due[i + 1] if i + 1 < len(due) else None)
                self._cell_seconds[item.nodeid] = (self._cell_seconds.get(item.nodeid, 0.0)
                                                   + time.perf_counter() - started)
        self.round = 1
        short = [item for item in items if len(self._extra_rounds.get(item.nodeid, [])) + 1 < self.settings.rounds]
        if short:
            self.notes[f"{len(short)} cell{'s' * (len(short) != 1)} got fewer than {self.settings.rounds} "
                       f"measurement rounds (--trainperf-max-time={self.settings.max_time:g} s per cell): "
                       "their noise band is thinner, or absent with a single round"] = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        fixture = item.stash.get(FIXTURE_KEY, None)
        measuring = fixture is not None and self.settings.enabled
        oom = ""
        try:
            result = yield
        except Exception as exc:
            if not measuring or not _out_of_memory(exc):
                raise
            if not isinstance(exc, EmulatedOutOfMemory):  # an emulated one is already the fixture's result
                oom = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            result = None
        # out of the except block: the exception, its traceback and the test's frames are gone now
        if fixture is not None and measuring:
            if oom:
                from pytest_trainperf.measure.memory import recover

                recover(fixture.device)
                fixture.out_of_memory(oom)
            measurement = fixture.result()
            if measurement is not None and fixture.timing_only:
                self._extra_rounds.setdefault(item.nodeid, []).append(measurement)
            elif measurement is not None:
                self.notes.update(dict.fromkeys(fixture.notes))
                self._conclude(item, fixture, measurement)
                self._cell_seconds[item.nodeid] = fixture.elapsed
        return result

    def _baselines(self, path: Path) -> store.BaselineFile:
        """The baseline file at ``path``, read once per session; raises BaselineError if unusable."""
        if path not in self._files:
            try:
                self._files[path] = store.read(path)
            except store.BaselineError as exc:
                self._files[path] = exc
        cached = self._files[path]
        if isinstance(cached, store.BaselineError):
            raise cached
        return cached

    def baseline_file(self, cell: Cell) -> tuple[Path, str, store.BaselineFile]:
        """The path, the path as shown, and the parsed baseline file of ``cell``'s test file; fails
        the cell, naming the file and what is wrong with it, when the file cannot be used."""
        path = store.baseline_path(self.settings.baselines, cell.test_file)
        shown = _relative(path, self.config.rootpath)
        try:
            return path, shown, self._baselines(path)
        except store.BaselineError as exc:
            reason = exc.reason
        action = "not updated" if self.settings.update else "not compared"
        pytest.fail(f"trainperf: baseline file {shown} cannot be used: {reason}.\n"
                    f"It was left untouched and this cell was {action}; fix the file or delete it "
                    "(then rerun with --trainperf-update-baselines).", pytrace=False)

    def _conclude(self, item: pytest.Item, fixture: TrainPerf, measurement: Measurement) -> None:
        self.accept(item, fixture.cell, fixture.fingerprint(), measurement, fixture)

    def accept(self, item: pytest.Item, cell: Cell, fingerprint: Fingerprint, measurement: Measurement,
               fixture: TrainPerf | None = None) -> None:
        """Conclude one cell: judge ``measurement`` against its baseline, keep the result (and, in an
        update, the baseline to write), and fail ``item`` on a regression. ``fixture`` is the one that
        measured it here, for confirmation re-measurements; None for a cell measured in another process
        (``--trainperf-isolate``: that process confirmed its own timings)."""
        path, shown, baselines = self.baseline_file(cell)
        baseline = baselines.lookup(fingerprint.key, cell.test, cell.cell)
        mark = item.get_closest_marker(TOLERANCE_MARK)
        overrides = mark.args[0] if mark is not None else {}
        grid = _grid_key(item.nodeid)
        known = self._grid_p.setdefault(grid, {})
        total = self._grid_sizes.get(grid, 1)

        def decide(now: Measurement) -> CellVerdict:
            return stats.correct_for_grid(stats.judge(now, baseline, overrides), known, total)

        verdict = decide(measurement)
        rounds, unconfirmed = 0, False
        if not self.settings.update and fixture is not None:
            verdict, rounds, unconfirmed = self._confirm(fixture, verdict, decide)
        for m in verdict.metrics:
            if m.name in stats.TIMING_METRICS and m.p_value is not None:
                known.setdefault(m.name, []).append(m.p_value)
        elsewhere = () if baseline is not None else tuple(
            key for key, env in baselines.environments.items() if (cell.test, cell.cell) in env.cells)
        result = CellResult(cell=cell, verdict=verdict, fingerprint=fingerprint, elsewhere=elsewhere)
        self.results.append(result)
        figures = self._grid_figures(item, result, baselines, overrides, shown)
        crashed = measurement.outcome is Outcome.CRASHED
        if self.settings.update and not crashed:
            self._pending.setdefault(path, []).append((fingerprint, result))
            return
        if self.settings.update:  # a crash is no baseline: it fails the cell, and the file keeps the old one
            pytest.fail(f"trainperf: {cell.nodeid} crashed: {measurement.detail}\n"
                        "Its baseline was not updated." + "".join(f"\n\n{f}" for f in figures), pytrace=False)
        failure = self._failure(cell, verdict, fingerprint, shown, rounds, unconfirmed)
        if failure or figures:
            pytest.fail("\n\n".join(([failure] if failure else []) + figures), pytrace=False)
        if baseline is None and self.settings.strict:
            pytest.fail(f"trainperf: {cell.nodeid} has no baseline for this environment in {shown} "
                        f"(--trainperf-strict)\nenvironment: {fingerprint.key}\n"
                        f"Create it with `{UPDATE_HINT}`.", pytrace=False)

    def _failure(self, cell: Cell, verdict: CellVerdict, fingerprint: Fingerprint, shown: str, rounds: int,
                 unconfirmed: bool) -> str:
        """The failure message of a cell that regressed; empty when it did not."""
        if verdict.outcome is Status.REGRESSED:
            now = verdict.measurement
            before = verdict.baseline_outcome
            what = ("crashed" if now.outcome is Outcome.CRASHED else
                    f"out of memory ({now.outcome.value}), where the baseline was measured")
            if before is not None and before is not Outcome.MEASURED and now.outcome is Outcome.CRASHED:
                what += f" (the baseline: {before.value})"
            return (f"trainperf regression: {what}\n{cell.nodeid} against its baseline in {shown}\n"
                    f"environment: {fingerprint.key}\n  {now.detail}\n"
                    f"If the change is intended, run `{UPDATE_HINT}` and commit {shown}.")
        if not verdict.regressions:
            return ""
        worst = ", ".join(f"{m.name} {format_change(m.change)}" for m in verdict.regressions
                          if m.change is not None)
        lines = [f"trainperf regression: {worst}",
                 f"{cell.nodeid} against its baseline in {shown}",
                 f"environment: {fingerprint.key}"]
        lines += [f"  {m.describe()}" for m in verdict.regressions]
        timing = any(m.name in stats.TIMING_METRICS for m in verdict.regressions)
        if rounds and timing:
            lines.append(f"  (timings confirmed by {rounds} re-measurement{'s' * (rounds > 1)}; "
                         "figures from the last)")
        if unconfirmed and timing:
            lines.append(f"  (not re-measured to confirm: the cell used its --trainperf-max-time of "
                         f"{self.settings.max_time:g} s)")
        lines.append(f"If the change is intended, run `{UPDATE_HINT}` and commit {shown}.")
        return "\n".join(lines)

    def _grid_figures(self, item: pytest.Item, result: CellResult, baselines: store.BaselineFile,
                      overrides: dict[str, float], shown: str) -> list[str]:
        """Once the last cell of a grid with figures concluded: derive its figures from the cells
        measured now and from the baseline's same cells, judge them, keep the verdicts, and return
        the failure message of those that regressed (empty when none did, or the grid is not done).
        Timing figures that regressed are confirmed after the run loop instead (``_confirm_figures``)."""
        cell = result.cell
        specs = self._specs.get((cell.test_file, cell.test))
        if specs is None:
            return []
        grid = _grid_key(item.nodeid)
        done = self._grid_done.setdefault(grid, [])
        done.append(result)
        if len(done) < self._grid_sizes.get(grid, 1):
            return []
        verdicts = self._judge_figures(specs, done, baselines, overrides)
        self.figures += verdicts
        regressed = [v for v in verdicts if v.status is Status.REGRESSED]
        if not regressed or self.settings.update:
            return []
        timing = tuple(v for v in regressed if v.figure.metric in stats.TIMING_METRICS)
        if timing and self.settings.confirm:
            self._unconfirmed.append(PendingFigures(grid, specs, overrides, shown, baselines, timing))
            regressed = [v for v in regressed if v not in timing]
        return [self._figure_failure(regressed, shown, result.fingerprint.key)] if regressed else []

    @staticmethod
    def _judge_figures(specs: FigureSpecs, done: list[CellResult], baselines: store.BaselineFile,
                       overrides: dict[str, float]) -> list[FigureVerdict]:
        """The figures of a grid's concluded cells against those of the baseline's same cells."""
        from pytest_trainperf import derived

        cell = done[-1].cell
        before = [m for m in (baselines.lookup(r.fingerprint.key, cell.test, r.cell.cell) for r in done)
                  if m is not None]
        return derived.judge_figures(specs.derive([r.verdict.measurement for r in done]), specs.derive(before),
                                     lambda f: specs.tolerance(f, overrides), (cell.test_file, cell.test, cell.axes))

    @staticmethod
    def _figure_failure(regressed: list[FigureVerdict], shown: str, key: str, confirmed: int = 0) -> str:
        """The failure message of a grid's regressed figures."""
        worst = regressed[0]
        assert worst.baseline is not None
        more = len(regressed) - 1
        lines = [f"trainperf regression: {worst.figure.title()} {worst.baseline.shown()} -> {worst.figure.shown()}"
                 + (f" (and {more} more figure{'s' * (more > 1)})" if more else ""),
                 f"{worst.test_file}::{worst.test}: the figures of its grid (judged when its last cell finished) "
                 f"against the baseline's same cells in {shown}",
                 f"environment: {key}"]
        lines += [f"  {v.describe()}" for v in regressed]
        if confirmed:
            lines.append(f"  (confirmed by {confirmed} re-measurement{'s' * (confirmed > 1)} of the cells they come "
                         "from, taken in turn; figures from the re-measurements)")
        lines.append(f"If the change is intended, run `{UPDATE_HINT}` and commit {shown}.")
        return "\n".join(lines)

    def _confirm_figures(self, session: pytest.Session, remeasure: bool = True) -> None:
        """Re-time the cells of each grid's regressed timing figures ``--trainperf-confirm`` times,
        in turn (reference and variant one after the other, order alternating), and judge the figures
        again on the re-measurements; those that still regress fail the session."""
        from _pytest.runner import runtestprotocol

        items = {item.nodeid: item for item in session.items}
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        for pending in self._unconfirmed:
            done = self._grid_done[pending.grid]
            involved = [r for r in done if any(_feeds(v.figure, r.verdict.measurement) for v in pending.figures)]
            again: dict[str, list[Measurement]] = {}
            rounds = self.settings.confirm if remeasure else 0
            if reporter is not None and rounds:
                reporter.write_line(f"trainperf: re-measuring {len(involved)} cells of {pending.grid} to confirm "
                                    f"{len(pending.figures)} regressed figure{'s' * (len(pending.figures) > 1)}")
            self.round = 2  # timing only: the re-measurements land in _extra_rounds
            for number in range(rounds):
                order = involved if number % 2 == 0 else involved[::-1]
                for i, r in enumerate(order):
                    item = items.get(r.cell.nodeid)
                    if item is None:
                        continue
                    runtestprotocol(item, log=False, nextitem=None if i + 1 == len(order) else items.get(
                        order[i + 1].cell.nodeid))
                    taken = self._extra_rounds.pop(r.cell.nodeid, [])
                    again.setdefault(r.cell.nodeid, []).extend(taken)
            self.round = 1
            remeasured = [replace(r, verdict=replace(r.verdict, measurement=_retimed(r.verdict.measurement,
                                                                                     again.get(r.cell.nodeid, []))))
                          for r in done]
            verdicts = self._judge_figures(pending.specs, remeasured, pending.baselines, pending.overrides)
            keys = {v.figure.key for v in pending.figures}
            judged = {v.figure.key: v for v in verdicts if v.figure.key in keys}
            self.figures = [judged.get(v.figure.key, v) if (v.test_file, v.test) == (pending.figures[0].test_file,
                                                                                    pending.figures[0].test) else v
                            for v in self.figures]
            still = [v for v in judged.values() if v.status is Status.REGRESSED]
            if still:
                self.figure_failures.append(self._figure_failure(still, pending.shown, done[-1].fingerprint.key,
                                                                 confirmed=rounds))
        self._unconfirmed.clear()

    def _confirm(self, fixture: TrainPerf, verdict: CellVerdict,
                 decide: Callable[[Measurement], CellVerdict]) -> tuple[CellVerdict, int, bool]:
        """Re-time a cell whose timings regressed, up to ``--trainperf-confirm`` times, until one
        re-measurement does not regress, within the cell's ``--trainperf-max-time``. Returns the last
        verdict, the re-measurements made, and whether one was due but skipped for lack of time."""
        rounds = 0
        while rounds < self.settings.confirm and any(m.name in stats.TIMING_METRICS
                                                     for m in verdict.regressions):
            step_time = verdict.measurement.metric("step_time")
            expected = sum(step_time.samples) if step_time is not None else 0.0
            if time.perf_counter() + expected > fixture.deadline:
                return verdict, rounds, True
            again = fixture.retime()
            if again is None:
                break
            rounds += 1
            verdict = decide(again)
        return verdict, rounds, False

    # ------------------------------------------------------------------ the end

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for path, entries in self._pending.items():
            by_env: dict[str, list[CellResult]] = {}
            fingerprints = {}
            for fingerprint, result in entries:
                pooled = stats.pool_rounds(result.verdict.measurement, self._extra_rounds.get(result.cell.nodeid, []))
                result = replace(result, verdict=replace(result.verdict, measurement=pooled))
                by_env.setdefault(fingerprint.key, []).append(result)
                fingerprints[fingerprint.key] = fingerprint
            shown = _relative(path, self.config.rootpath)
            for key, results in by_env.items():
                try:
                    self.changes += store.update(path, fingerprints[key],
                                                 [r.verdict.measurement for r in results], shown,
                                                 derive=self._deriver(results))
                except (store.BaselineError, OSError) as exc:
                    self.write_errors.append(f"{shown}: not written: {exc}")
        self._pending.clear()
        for grid, done in self._grid_done.items():
            size = self._grid_sizes.get(grid, 1)
            if len(done) < size:
                self.warnings.append(
                    f"the figures of {grid} (tp.relative/tp.scaling) were not judged: not all of its {size} cells "
                    "concluded in one process (the run stopped early, or pytest-xdist spread the grid over "
                    "workers: run with --dist loadgroup to keep each grid on one worker)")
        if self.write_errors or self.figure_failures:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _deriver(self, results: list[CellResult]) -> store.Derive:
        """What recomputes, from a baseline file's cells after an update, the figures of the tests
        among ``results`` that ask for figures."""
        tests = {(r.cell.test_file, r.cell.test) for r in results}
        specs = {test: self._specs[(test_file, test)] for test_file, test in tests if (test_file, test) in self._specs}

        def derive(cells: Mapping[tuple[str, str], Measurement]) -> dict[str, list[Figure]]:
            return {test: spec.derive([m for (t, _), m in cells.items() if t == test])
                    for test, spec in specs.items()}

        return derive

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.results and not self.write_errors:
            return
        from rich.console import Console

        from pytest_trainperf.report.summary import render_session

        writer = self.config.get_terminal_writer()
        buffer = io.StringIO()
        console = Console(file=buffer, width=max(writer.fullwidth, 40), force_terminal=writer.hasmarkup,
                          color_system="standard" if writer.hasmarkup else None, no_color=not writer.hasmarkup,
                          highlight=False, soft_wrap=False)
        render_session(console, results=[(r.cell.test_file, r.cell.test, r.cell.axes, r.verdict)
                                         for r in self.results],
                       fingerprints=sorted({r.fingerprint.key for r in self.results}),
                       show=self.settings.show, changes=self.changes, update=self.settings.update,
                       errors=self.write_errors, hint="" if self.against else UPDATE_HINT,
                       elsewhere=sorted({key for r in self.results for key in r.elsewhere}),
                       figures=self.figures, warnings=self.warnings)
        terminalreporter.write_sep("=", "trainperf")
        if self.against:
            terminalreporter.write_line(f"compared against {self.against} (no baseline file read or written)")
        terminalreporter.write(buffer.getvalue())
        for failure in self.figure_failures:
            terminalreporter.write_line("")
            for line in failure.splitlines():
                terminalreporter.write_line(line, red=True, bold=line.startswith("trainperf regression"))
        for note in self.notes:
            terminalreporter.write_line(f"trainperf note: {note}")
