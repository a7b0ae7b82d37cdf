"""The pytest hooks: the life of a trainperf session, top to bottom.

configure (settings, the runner, the consumers of results) -> collect (grids into cells) -> run each
cell through its runner (:mod:`pytest_trainperf.runners`) -> judge it (:mod:`pytest_trainperf.judge`)
-> keep the result (:class:`~pytest_trainperf.results.Ledger`) and the baseline to write -> after the
run loop, an update's noise rounds and the confirmation of regressed grid figures -> write the
baselines (:mod:`pytest_trainperf.store`) -> report.

Module-level hooks only bootstrap; the state of a session lives in :class:`TrainPerfSession`,
registered under :data:`PLUGIN_NAME`. torch is never imported here.
"""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from pytest_trainperf import derived, judge, paired, results, stats, store, vcs
from pytest_trainperf.fixture import Forecasting, TrainPerf, records_only
from pytest_trainperf.grid import (
    BUDGET_MARK,
    FORECAST_MARK,
    GRID_MARK,
    RANKS_MARK,
    RELATIVE_MARK,
    SCALING_MARK,
    TOLERANCE_MARK,
    Grid,
    check_figures,
    check_ranks,
)
from pytest_trainperf.grid import test_name as grid_test_name
from pytest_trainperf.judge import UPDATE_HINT, FigureSpecs
from pytest_trainperf.measure.host import SYSTEM, fix_malloc
from pytest_trainperf.records import (
    SINGLE_CELL,
    Cell,
    CellResult,
    CellVerdict,
    Figure,
    FigureKind,
    FigureVerdict,
    Fingerprint,
    Measurement,
    Outcome,
    Scalar,
    Source,
    Status,
    check_finite,
    grid_key,
)
from pytest_trainperf.report.progress import RoundsProgress
from pytest_trainperf.runners import CellRun, CellRunner, choose
from pytest_trainperf.runners.children import CHILD_ENV, TIMINGS_ONLY_ENV, death
from pytest_trainperf.runners.lockstep import FIXTURE_NAME, Pairing
from pytest_trainperf.runners.ranks import rank_from_env
from pytest_trainperf.settings import CONFIRM_BASELINE, CONFIRM_NONE, Settings, add_options, resolve

__all__ = ["FIXTURE_KEY", "PLUGIN_NAME", "SESSION_KEY", "UPDATE_HINT", "TrainPerfSession", "cell_of", "trainperf"]

IN_PROCESS_ROUNDS = 2
"""An update's measurement rounds that run in the session's process; each later one runs in a fresh
child process, so that the noise band holds what a new process does."""
PLUGIN_NAME = "trainperf-session"
"""The name the session object is registered under."""
FIXTURE_KEY = pytest.StashKey[TrainPerf]()
"""Where an item keeps its ``trainperf`` fixture, for the runner to read."""
SESSION_KEY = pytest.StashKey["TrainPerfSession"]()
"""Where the config keeps the session object (also registered as a plugin under PLUGIN_NAME)."""
MARKERS = {
    GRID_MARK: "(grid): applied by tp.grid: spread the test over a parameter grid",
    TOLERANCE_MARK: "(tolerances): applied by tp.tolerance: per-test relative tolerances",
    BUDGET_MARK: "(bytes): applied by tp.memory_budget: cells over it count as out of memory",
    FORECAST_MARK: "(spec): applied by tp.forecast: the CUDA memory forecast on the meta device, OOM maps per device",
    RELATIVE_MARK: "(spec): applied by tp.relative: variants viewed relative to a reference",
    SCALING_MARK: "(spec): applied by tp.scaling: a power-law exponent fitted along an axis",
    RANKS_MARK: "(spec): applied by tp.ranks: each cell runs as a job of ranks (elastic launch)",
}
"""The markers the decorators apply, and what ``pytest --markers`` says of them."""


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    from pytest_trainperf import distributed, outputs
    from pytest_trainperf.runners import children

    for mark, text in MARKERS.items():
        config.addinivalue_line("markers", f"{mark}{text}")
    settings = distributed.assign_device(resolve(config), config)  # a worker's own --trainperf-devices
    malloc = ""
    if settings.enabled:  # before any test module is imported, so before its tensors are allocated
        malloc = fix_malloc() if settings.malloc == "fixed" else SYSTEM
    ledger = results.Ledger()
    session = TrainPerfSession(settings, config, ledger, malloc)
    if settings.enabled and not children.in_child() and not hasattr(config, "workerinput"):
        from pytest_trainperf import scratch

        session.swept = scratch.sweep().line()  # what a killed session left in the temp directory
    session.runner = choose(settings, config, session.call_test, ledger)
    ledger.against = getattr(session.runner, "label", "")
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, PLUGIN_NAME)
    # the consumers of the session's results
    outputs.register(config, settings, ledger)  # JSON, Markdown, JUnit properties, plots; xdist
    children.register_reporter(config, ledger)  # in a child process: its outcome for its parent


def test_name(item: pytest.Item) -> str:
    """``test_x`` or ``TestA::test_x``: the node id inside the file, without parameters (which may hold
    ``::`` themselves: a grid value ``"a::b"``)."""
    callspec = getattr(item, "callspec", None)
    return grid_test_name(item.nodeid, getattr(item, "originalname", None), callspec.id if callspec else None)


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
    return Cell(nodeid=item.nodeid, test_file=_relative(item.path, rootpath), test=test_name(item),
                cell=callspec.id if callspec is not None else SINGLE_CELL, params=params, axes=axes)


def figure_sources(figure: Figure, cells: Sequence[Measurement]) -> list[Measurement]:
    """The cells a figure is derived from, among ``cells``: a relative figure's variant, then its
    reference (none unless both are there); a scaling fit's cells along its axis."""
    if figure.kind is FigureKind.RELATIVE:
        variant, reference = judge.figure_cells(figure, cells)
        return [variant, reference] if variant is not None and reference is not None else []
    return [c for c in cells if judge.feeds(figure, c)]


def figure_specs(item: pytest.Item) -> FigureSpecs | None:
    """The figures a test item's markers ask for; None when it asks for none."""
    relative = item.get_closest_marker(RELATIVE_MARK)
    fits = tuple(m.args[0] for m in reversed(list(item.iter_markers(SCALING_MARK))))
    if relative is None and not fits:
        return None
    return FigureSpecs(relative=relative.args[0] if relative is not None else None, scaling=fits)


def _overrides(item: pytest.Item) -> Mapping[str, float]:
    """A test's ``tp.tolerance`` overrides."""
    mark = item.get_closest_marker(TOLERANCE_MARK)
    return mark.args[0] if mark is not None else {}


@pytest.fixture
def trainperf(request: pytest.FixtureRequest) -> TrainPerf:
    """Measure this cell: ``trainperf.train(step, steps=...)``, ``.run(fn, iters=...)``, ``.record(...)``."""
    session = request.config.stash[SESSION_KEY]
    budget = request.node.get_closest_marker(BUDGET_MARK)
    memory = budget.args[0] if budget is not None else session.settings.memory_budget
    cell = cell_of(request.node, request.config.rootpath)
    forecast = request.node.get_closest_marker(FORECAST_MARK)
    forecasting = None
    if forecast is not None:
        spec = forecast.args[0]
        given = spec.memory_of(dict(cell.params))
        forecasting = Forecasting(given if given is not None or spec.memory_axis else memory, spec.memory_axis,
                                  session.forecasts)
    distributed = request.node.get_closest_marker(RANKS_MARK) is not None
    rank = rank_from_env() if distributed else None
    fixture = TrainPerf(cell, session.settings, session.malloc, timing_only=session.remeasuring or session.timings_only,
                        memory_budget=memory, forecast=forecasting, rank=rank)
    request.node.stash[FIXTURE_KEY] = fixture
    request.addfinalizer(fixture.close)  # a measured loop the test left open restores threads and the collector
    settings = session.settings
    if (settings.enabled and not settings.update and settings.confirm and not session.ledger.against
            and not distributed and not session.remeasuring):  # a rank's job is confirmed by its parent
        fixture.confirm_with(functools.partial(session.confirm_in_test, request.node))
    if session.settings.enabled:
        if not session.ledger.against:  # a lockstep comparison (--trainperf-against) reads no baseline file
            session.baseline_file(fixture.cell)  # an unusable file fails the cell now, before it trains
        if not distributed or rank is not None:  # the parent of a distributed cell's ranks measures nothing itself
            fixture.begin(records_only=records_only(getattr(request.node, "obj", None), FIXTURE_NAME))
    return fixture


@dataclass(frozen=True)
class Baselines:
    """A cell's baseline file: where it is, how it is shown, what it holds."""

    path: Path
    """Its path."""
    shown: str
    """Its path relative to the rootdir."""
    file: store.BaselineFile
    """Its content."""


@dataclass(frozen=True)
class Paired:
    """A side-by-side comparison of a cell: its verdict, and the two sides it judged (this tree's and the
    reference commit's), their timing samples pooled with any earlier comparison's."""

    verdict: CellVerdict
    this: Measurement
    other: Measurement


@dataclass
class GridState:
    """What the session knows of one grid test while its cells conclude."""

    size: int = 0
    """Its cells in this session's collection."""
    done: list[CellResult] = field(default_factory=list)
    """Its concluded cells, in order."""
    p_values: dict[str, list[float]] = field(default_factory=dict)
    """The timing p-values of its cells judged so far, per metric (the grid's multiple-comparison correction)."""
    specs: FigureSpecs | None = None
    """The figures it asks for."""
    unconfirmed: tuple[FigureVerdict, ...] = ()
    """Its timing figures that regressed, to be confirmed after the run loop."""
    baselines: Baselines | None = None
    """Its baseline file."""
    overrides: Mapping[str, float] | None = None
    """Its ``tp.tolerance`` overrides."""


class TrainPerfSession:
    """The state of one pytest session: the runner, baselines read, results kept, updates to write."""

    def __init__(self, settings: Settings, config: pytest.Config, ledger: results.Ledger, malloc: str = "") -> None:
        self.settings = settings
        self.config = config
        self.ledger = ledger
        self.malloc = malloc
        self.runner: CellRunner | None = None
        """How this session's cells are measured (set at configure, :func:`pytest_trainperf.runners.choose`)."""
        self.remeasuring = False
        """True while cells are re-run for their timings only: an update's noise rounds, a figure's
        confirmation. Their measurements are kept in :attr:`_retimed`."""
        self.timings_only = bool(os.environ.get(TIMINGS_ONLY_ENV))
        """True in a child whose parent uses only its timings (``TIMINGS_ONLY_ENV``: an update's noise round
        in a fresh process, a side-by-side confirmation's worker): every cell is measured for its timings
        only, and reported as a cell."""
        self.swept = ""
        """The note on what a killed session had left in the temp directory, removed at configure."""
        self.figure_failures: list[str] = []
        """Failure messages of figures whose timing regression was confirmed after the run loop (no
        test item is left to fail: they fail the session)."""
        self._calling = False
        self._files: dict[Path, store.BaselineFile | store.BaselineError] = {}
        self._pending: dict[Path, list[tuple[Fingerprint, CellResult]]] = {}
        self._retimed: dict[str, list[Measurement]] = {}
        self._cell_seconds: dict[str, float] = {}
        self._grids: dict[str, GridState] = {}
        self._pairing: Pairing | None = None
        self._references: dict[str, tuple[str | None, str, str]] = {}
        self._source: tuple[Source | None] | None = None
        self._first: dict[str, Measurement] = {}
        self._decide: dict[str, Callable[[Measurement], CellVerdict]] = {}
        """How an update's cells were judged: each is judged again on its rounds pooled, the value stored,
        so that the report shows what the baseline file holds."""
        self.forecasts: dict[tuple[object, ...], object] = {}
        """The forecasts of ``tp.forecast`` cells so far: cells differing only in the device's memory share one."""

    # ------------------------------------------------------------------ collection

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        mark = metafunc.definition.get_closest_marker(GRID_MARK)
        specs = figure_specs(metafunc.definition)
        if specs is not None:
            problem = check_figures(mark.args[0] if mark is not None else None, specs.relative, specs.scaling)
            if problem is not None:
                pytest.fail(f"{metafunc.definition.nodeid}: {problem}", pytrace=False)
        grid: Grid | None = mark.args[0] if mark is not None else None
        ranks = metafunc.definition.get_closest_marker(RANKS_MARK)
        if ranks is not None:
            problem = check_ranks(ranks.args[0], grid)
            if problem is None and FIXTURE_NAME not in metafunc.fixturenames:
                problem = (f"tp.ranks: expected the test to take the {FIXTURE_NAME!r} fixture (its ranks "
                           f"measure with it), got the arguments ({', '.join(metafunc.fixturenames) or 'none'})")
            if problem is not None:
                pytest.fail(f"{metafunc.definition.nodeid}: {problem}", pytrace=False)
        forecast = metafunc.definition.get_closest_marker(FORECAST_MARK)
        if forecast is not None:
            problem = forecast.args[0].check(grid)
            if problem is not None:
                pytest.fail(f"{metafunc.definition.nodeid}: {problem}", pytrace=False)
        if grid is None or not grid.axes:
            return
        missing = [n for n in grid.names if n not in metafunc.fixturenames]
        if missing:
            args = ", ".join(n for n in metafunc.fixturenames if n != "request") or "none"
            pytest.fail(f"{metafunc.definition.nodeid}: tp.grid axis {missing[0]!r} is not an argument "
                        f"of {metafunc.function.__name__}(); expected each axis to be one of the test's "
                        f"arguments ({args})", pytrace=False)
        metafunc.parametrize(list(grid.names), grid.cells(), ids=grid.ids())

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._grids.clear()
        for item in session.items:
            state = self._grids.setdefault(grid_key(item.nodeid), GridState())
            state.size += 1
            state.specs = figure_specs(item)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Under pytest-xdist, keep each grid with figures together (``--dist loadgroup``): its
        figures are judged where its last cell runs, from all of its cells."""
        if not self.config.pluginmanager.hasplugin("xdist"):
            return
        for item in items:
            if figure_specs(item) is not None:
                item.add_marker(pytest.mark.xdist_group(name=grid_key(item.nodeid)))

    def pytest_report_header(self) -> list[str]:
        lines = [self.runner.header() if self.runner is not None else None,
                 f"trainperf: {self.swept}" if self.swept else None]
        return [line for line in lines if line]

    # ------------------------------------------------------------------ running a cell

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> bool | None:
        fixture = pyfuncitem.stash.get(FIXTURE_KEY, None)
        if self._calling or fixture is None or self.runner is None:
            return None  # not a trainperf cell, or the runner calling the test here: pytest calls it
        run = self.runner.run(pyfuncitem, fixture)
        if run is not None:
            self._conclude(pyfuncitem, run)
        return True

    def call_test(self, item: pytest.Function) -> None:
        """Call the test function of ``item`` in this process, as pytest does (what the in-process
        runner runs)."""
        self._calling = True
        try:
            item.ihook.pytest_pyfunc_call(pyfuncitem=item)
        finally:
            self._calling = False

    def _conclude(self, item: pytest.Function, run: CellRun) -> None:
        """Take in one cell from its runner: judge it, keep the result (and, in an update, the baseline
        to write), and fail ``item`` on a regression."""
        if run.timing_only and not self.timings_only:  # a noise round or a figure's confirmation: pooled later
            self._retimed.setdefault(item.nodeid, []).append(run.measurement)
            return
        for note in run.notes:
            self.ledger.note(note, [item.nodeid])
        if run.written is not None:  # judged and written where it ran (an isolated child's update)
            self.ledger.absorb(run.written)
            return
        if run.compared:
            self._conclude_side_by_side(item, run)
            return
        if run.elapsed is not None:  # measured here: what its noise rounds may still take
            self._cell_seconds[item.nodeid] = run.elapsed
        self._conclude_stored(item, run)

    def _conclude_side_by_side(self, item: pytest.Function, run: CellRun) -> None:
        verdict = judge.side_by_side(run.measurement, run.reference, _overrides(item))
        if run.reference is None:
            self.ledger.note(f"{item.nodeid}: nothing to compare against: {run.problem}; measured in this tree "
                             "alone (new)")
        self.ledger.cells.append(CellResult.of(run.cell, verdict, run.fingerprint))
        if figure_specs(item) is not None:
            self.ledger.note(f"{run.cell.grid}: tp.relative/tp.scaling figures are not judged in a lockstep "
                             "comparison (its cells are)")
        against = judge.Against(where=f"{item.nodeid} against {run.revision}, measured in lockstep",
                                environment=run.fingerprint.key, other=run.compared)
        failure = judge.failure(verdict, against)
        if failure:
            pytest.fail(failure, pytrace=False)
        if run.reference is None and self.settings.strict:
            pytest.fail(f"trainperf: {item.nodeid}: nothing to compare against (--trainperf-strict): {run.problem}",
                        pytrace=False)

    def _conclude_stored(self, item: pytest.Function, run: CellRun) -> None:
        cell, fingerprint = run.cell, run.fingerprint
        found = self.baseline_file(cell)
        baseline = found.file.lookup(fingerprint.key, cell.test, cell.cell)
        environment = fingerprint.key
        other = (found.file.across_hosts(fingerprint, cell.test, cell.cell)
                 if baseline is None and not self.settings.update else None)
        if other is not None:  # only the CPU differs: its exact work metrics judge this cell's
            baseline = judge.from_another_host(other[1])
            environment = judge.across_hosts_environment(fingerprint.key, other[0].key)
            self.ledger.note(f"judged across hosts: same device type, torch and threads; another CPU: cells with no "
                             f"baseline here had their exact work metrics judged against {other[0].key} (timings, "
                             "memory and loss not judged)", [cell.nodeid])
        overrides = _overrides(item)
        state = self._grids.setdefault(cell.grid, GridState(size=1))

        def decide(now: Measurement) -> CellVerdict:
            return judge.cell(now, baseline, overrides, state.p_values, state.size)

        verdict = decide(run.measurement)  # an in-process cell's was confirmed inside its test already
        retimed = run.confirmed or judge.Retimed()
        if not self.settings.update and run.confirmed is None:
            verdict, retimed = self._confirm(run.retime, run.deadline, verdict, decide)
        for m in verdict.metrics:
            if m.name in stats.TIMING_METRICS and m.p_value is not None:
                state.p_values.setdefault(m.name, []).append(m.p_value)
        if (not self.settings.update and self.settings.confirm_against != CONFIRM_NONE and baseline is not None
                and other is None and run.side_by_side
                and (judge.timing_regressed(verdict)
                     or judge.suspect(verdict.measurement, baseline, overrides, self._runner()))):
            verdict = self._side_by_side(item, baseline, verdict, overrides)
        elsewhere = () if baseline is not None else tuple(
            key for key, env in found.file.environments.items() if (cell.test, cell.cell) in env.cells)
        result = CellResult.of(cell, verdict, fingerprint, elsewhere)
        self.ledger.cells.append(result)
        figures = self._grid_figures(state, result, found, overrides)
        crashed = run.measurement.outcome.died
        unstorable = check_finite(run.measurement) if self.settings.update else []
        if unstorable:  # written, it would be a file every later run refuses: this cell fails, the others go on
            pytest.fail(f"trainperf: {cell.nodeid}: not stored in {found.shown}: " + "; ".join(unstorable)
                        + "\nIts baseline was not updated.", pytrace=False)
        if self.settings.update and not crashed:
            self._pending.setdefault(found.path, []).append((fingerprint, result))
            self._first[cell.nodeid] = run.measurement
            self._decide[cell.nodeid] = decide
            return
        if self.settings.update:  # a crash is no baseline: it fails the cell, and the file keeps the old one
            pytest.fail("\n\n".join([judge.crashed_in_update(cell.nodeid, run.measurement.detail,
                                                            run.measurement.outcome.value), *figures]),
                        pytrace=False)
        against = judge.Against(where=f"{cell.nodeid} against its baseline in {found.shown}",
                                environment=environment, shown=found.shown)
        failure = judge.failure(verdict, against, retimed)
        if failure or figures:
            pytest.fail("\n\n".join(([failure] if failure else []) + figures), pytrace=False)
        if (baseline is None or other is not None) and self.settings.strict:
            pytest.fail(judge.missing_baseline(cell.nodeid, found.shown, fingerprint.key), pytrace=False)

    def confirm_in_test(self, item: pytest.Item, fixture: TrainPerf) -> judge.Retimed:
        """Confirm a timing regression of ``item``'s cell inside its test, before ``train``/``run``
        returns to it (:meth:`TrainPerf.confirm_with`): judged against the stored baseline as the cell
        will be, re-timed while its timings regress. Judging the final measurement is left to
        :meth:`_conclude_stored`."""
        measured = fixture.result()
        if measured is None:
            return judge.Retimed()
        cell = fixture.cell
        baseline = self.baseline_file(cell).file.lookup(fixture.fingerprint().key, cell.test, cell.cell)
        if baseline is None:  # nothing to regress against (another host's baseline gates no timing)
            return judge.Retimed()
        overrides = _overrides(item)
        state = self._grids.setdefault(cell.grid, GridState(size=1))

        def decide(now: Measurement) -> CellVerdict:
            return judge.cell(now, baseline, overrides, state.p_values, state.size)

        return self._confirm(fixture.retime, fixture.deadline, decide(measured), decide)[1]

    def _confirm(self, retime: Callable[[], Measurement | None] | None, deadline: float, verdict: CellVerdict,
                 decide: Callable[[Measurement], CellVerdict]) -> tuple[CellVerdict, judge.Retimed]:
        """Re-time a cell whose timings regressed, up to ``--trainperf-confirm`` times, until one
        re-measurement does not regress, within the cell's ``--trainperf-max-time``."""
        rounds = 0
        while rounds < self.settings.confirm and retime is not None and judge.timing_regressed(verdict):
            step_time = verdict.measurement.metric("step_time")
            expected = sum(step_time.samples) if step_time is not None else 0.0
            if time.perf_counter() + expected > deadline:
                return verdict, judge.Retimed(rounds, skipped_for=self.settings.max_time)
            again = retime()
            if again is None:
                break
            rounds += 1
            verdict = decide(again)
        return verdict, judge.Retimed(rounds)

    def _runner(self) -> float | None:
        """The median step-time ratio of this session's cells judged so far against their stored baselines
        (None before :data:`judge.RUNNER_CELLS` of them): how this runner compares with the baselines'."""
        machine = results.compare_machine(self.ledger.cells)
        return 1 + machine.median if machine is not None and machine.cells >= judge.RUNNER_CELLS else None

    def _side_by_side(self, item: pytest.Function, baseline: Measurement, screen: CellVerdict,
                      overrides: Mapping[str, float]) -> CellVerdict:
        """Confirm a timing regression against the stored baseline (or a suspect, :func:`judge.suspect`)
        side by side on this machine, in lockstep with the commit the baseline measured (or
        ``--trainperf-confirm-against``'s revision). Where that cannot be had, the stored verdict stands,
        with a note that says why when it fails the cell. Where a further pair of processes fails (a worker
        died), the pooled pairs of those before it judge, with a note."""
        commit, name, problem = self._reference(baseline)
        if commit is None:
            if judge.timing_regressed(screen):
                self.ledger.note(f"{item.nodeid}: not confirmed side by side ({problem}); the stored verdict stands")
            return screen
        pair: Paired | str = ""
        earlier: Paired | None = None
        pairings = 0
        while True:  # a regression, or a lean to one: other processes too (judge.another_pairing)
            pair = self._pair(item, commit, name, overrides, workers=pairings, earlier=earlier)
            if isinstance(pair, str):
                break
            pairings += 1
            if not judge.another_pairing(pair.verdict, pairings):
                break
            earlier = pair
        if isinstance(pair, str) and earlier is not None:  # a further pair of processes failed: the ones before judge
            before = "the first pair" if pairings == 1 else f"the first {pairings} pairs"
            self.ledger.note(f"{item.nodeid}: pair of worker processes {pairings + 1} failed ({pair}); judged side "
                             f"by side with {name} on {before} of processes")
            return judge.confirmed(screen, earlier.verdict, name, pairings)
        if isinstance(pair, str):
            if judge.timing_regressed(screen):
                self.ledger.note(f"{item.nodeid}: not confirmed side by side with {name} ({pair}); the stored "
                                 "verdict stands")
            return screen
        return judge.confirmed(screen, pair.verdict, name, pairings)

    def _pair(self, item: pytest.Function, commit: str, name: str, overrides: Mapping[str, float],
              workers: int = 0, earlier: Paired | None = None) -> Paired | str:
        """One side-by-side comparison of ``item``'s cell with ``commit``: the pair's verdict, or why
        there is none. ``earlier``: the comparison before this one, on other workers, whose pairs are
        pooled in front of these, for the sequential rule and for the verdict (:func:`paired.pooled`)."""
        from pytest_trainperf.runners.children import child_record
        from pytest_trainperf.runners.lockstep import step_tolerance, undecided

        if self._pairing is None:  # the session's side-by-side workers, started on first use
            top = vcs.toplevel(self.config.rootpath)
            assert top is not None  # a commit was found in it
            self._pairing = Pairing(self.settings, self.config, top, timings_only=True)  # the pair judges timings
        head: tuple[Sequence[float], Sequence[float]] = ((), ())
        if earlier is not None:
            steps = [side.metric("step_time") for side in (earlier.other, earlier.this)]
            head = (steps[0].samples if steps[0] is not None else (), steps[1].samples if steps[1] is not None else ())
        more = undecided(self.settings, step_tolerance(item), head)
        compared = self._pairing.compare(item, commit, name, more, workers)
        problem = compared.other.problem
        this = None
        if compared.this.outcome is not None and compared.other.record is not None:
            try:
                this = child_record(item, compared.this.outcome, compared.this)
            except (pytest.fail.Exception, pytest.skip.Exception) as exc:
                problem = f"its run in this tree did not pass: {str(exc.msg or '').strip().splitlines()[0]}"
        elif compared.this.outcome is None:
            problem = f"its run in this tree {death(compared.this.returncode)[1]}"
        if this is None or compared.other.record is None:
            return problem or "no measurement"
        now, other = this.verdict.measurement, compared.other.record.verdict.measurement
        if earlier is not None:
            now, other = paired.pooled(earlier.this, now), paired.pooled(earlier.other, other)
        return Paired(judge.side_by_side(now, other, overrides), now, other)

    def _reference(self, baseline: Measurement) -> tuple[str | None, str, str]:
        """The commit to confirm against, its name in messages, and why there is none (cached)."""
        policy = self.settings.confirm_against
        key = policy if policy != CONFIRM_BASELINE else (baseline.source.tree if baseline.source else "")
        if key not in self._references:
            self._references[key] = self._find_reference(policy, baseline)
        return self._references[key]

    def _find_reference(self, policy: str, baseline: Measurement) -> tuple[str | None, str, str]:
        if policy != CONFIRM_BASELINE:
            top = vcs.toplevel(self.config.rootpath)
            if top is None:
                return None, policy, f"the rootdir {self.config.rootpath} is not in a git checkout"
            try:
                sha = vcs.git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{policy}^{{commit}}"], top)
            except vcs.GitError:
                return None, policy, f"{policy!r} is no branch, tag or commit of the repository at {top}"
            return sha, f"{policy} ({sha[:vcs.SHORT_SHA]})", ""
        if baseline.source is None:
            return None, "", (f"its baseline records no commit (written outside git or by an older pytest-trainperf); "
                              f"update it with `{UPDATE_HINT}` and commit it with the code")
        found = vcs.measured_commit(self.config.rootpath, baseline.source, self.settings.baselines)
        if found.commit is None:
            return None, "", found.reason
        return found.commit, found.commit[:vcs.SHORT_SHA], ""

    # ------------------------------------------------------------------ baseline files

    def baseline_file(self, cell: Cell) -> Baselines:
        """The baseline file of ``cell``'s test file, read once per session; fails the cell, naming the
        file and what is wrong with it, when the file cannot be used."""
        path = store.baseline_path(self.settings.baselines, cell.test_file)
        shown = _relative(path, self.config.rootpath)
        if path not in self._files:
            try:
                self._files[path] = store.read(path)
            except store.BaselineError as exc:
                self._files[path] = exc
        found = self._files[path]
        if not isinstance(found, store.BaselineError):
            return Baselines(path, shown, found)
        action = "not updated" if self.settings.update else "not compared"
        pytest.fail(f"trainperf: baseline file {shown} cannot be used: {found.reason}.\n"
                    f"It was left untouched and this cell was {action}; fix the file or delete it "
                    "(then rerun with --trainperf-update-baselines).", pytrace=False)

    # ------------------------------------------------------------------ the figures of a grid

    def _grid_figures(self, state: GridState, result: CellResult, found: Baselines,
                      overrides: Mapping[str, float]) -> list[str]:
        """Once the last cell of a grid with figures concluded: judge its figures against those of the
        baseline's same cells, keep the verdicts, and return the failure message of those that
        regressed (empty when none did, or the grid is not done). Timing figures that regressed are
        confirmed after the run loop instead (:meth:`_confirm_figures`)."""
        if state.specs is None:
            return []
        state.done.append(result)
        if len(state.done) < state.size:
            return []
        verdicts = self._judge_figures(state.specs, state.done, found.file, overrides)
        self.ledger.figures += verdicts
        regressed = [v for v in verdicts if v.status is Status.REGRESSED]
        if not regressed or self.settings.update:
            return []
        timing = tuple(v for v in regressed if v.figure.metric in stats.TIMING_METRICS)
        if timing and self.settings.confirm:
            state.unconfirmed, state.baselines, state.overrides = timing, found, overrides
            regressed = [v for v in regressed if v not in timing]
        return [judge.figure_failure(regressed, found.shown, result.fingerprint.key)] if regressed else []

    @staticmethod
    def _judge_figures(specs: FigureSpecs, done: list[CellResult], baselines: store.BaselineFile,
                       overrides: Mapping[str, float]) -> list[FigureVerdict]:
        """The figures of a grid's concluded cells against those of the baseline's same cells."""
        last = done[-1]
        before = [m for m in (baselines.lookup(r.fingerprint.key, r.test, r.cell) for r in done) if m is not None]
        return judge.figures(specs, [r.verdict.measurement for r in done], before, overrides,
                             (last.test_file, last.test, last.axes))

    # ------------------------------------------------------------------ after the run loop

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        outcome = yield
        stopped = bool(session.shouldfail or session.shouldstop)
        if self.settings.update and self.settings.rounds > 1 and not stopped:
            self._noise_rounds(session)
        for grid, state in self._grids.items():
            if state.unconfirmed:
                self._confirm_figures(session, grid, state, remeasure=not stopped)
        return outcome

    def _remeasure(self, session: pytest.Session, nodeids: list[str], progress: RoundsProgress | None = None) -> None:
        """Run these cells once more each, in order, timings only; their reports are not logged."""
        from _pytest.runner import runtestprotocol

        items = {item.nodeid: item for item in session.items}
        due = [items[n] for n in nodeids if n in items]
        self.remeasuring = True
        try:
            for i, item in enumerate(due):
                if progress is not None:
                    progress.cell(item.nodeid)
                started = time.perf_counter()
                runtestprotocol(item, log=False, nextitem=due[i + 1] if i + 1 < len(due) else None)
                spent = time.perf_counter() - started
                self._cell_seconds[item.nodeid] = self._cell_seconds.get(item.nodeid, 0.0) + spent
                if progress is not None:
                    progress.cell_done(item.nodeid, spent)
        finally:
            self.remeasuring = False

    def _progress(self, rounds: list[int], fresh: list[int]) -> RoundsProgress:
        """The progress display of an update's noise rounds: one line rewritten in place on a terminal
        with markup, full lines (each with the estimate) under ``-q``, ``-s``, ``NO_COLOR``, a pipe, a file
        or on an xdist worker (:mod:`pytest_trainperf.report.progress`)."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        estimates = dict(self._cell_seconds)
        if reporter is None:
            return RoundsProgress(rounds, self.settings.rounds, estimates, lambda _: None, fresh_rounds=fresh)
        writer = self.config.get_terminal_writer()

        def write(line: str) -> None:
            if writer.width_of_current_line:  # -q's dots (pytest ends their line after the run loop)
                reporter.line("")
            reporter.write_line(line)

        def live(line: str) -> None:
            reporter.rewrite(line[:max(writer.fullwidth - 1, 20)], erase=True)

        lively = (writer.hasmarkup and reporter.verbosity >= 0 and self.config.getoption("capture", "fd") != "no"
                  and not hasattr(self.config, "workerinput"))
        return RoundsProgress(rounds, self.settings.rounds, estimates, write, live if lively else None,
                              fresh_rounds=fresh)

    def _noise_rounds(self, session: pytest.Session) -> None:
        """Run rounds 2.. ``--trainperf-rounds`` of every cell measured in round 1, one cell after the
        other in each round (so a slow spell of the machine hits many cells, not all rounds of one),
        each a separate warm start of the test, timing only. Rounds up to :data:`IN_PROCESS_ROUNDS` run
        in this process; each later one in a fresh child process (what a new process does to the step
        time, its memory layout and the host's state then, belongs in the noise band)."""
        measured = [r.nodeid for entries in self._pending.values() for _, r in entries  # timed cells only
                    if r.verdict.measurement.outcome is Outcome.MEASURED
                    and any(m.name in stats.TIMING_METRICS for m in r.verdict.measurement.metrics)]
        fresh_allowed = not os.environ.get(CHILD_ENV)  # an isolated child's rounds stay in it
        numbers = range(2, self.settings.rounds + 1)
        progress = self._progress(list(numbers), [n for n in numbers if fresh_allowed and n > IN_PROCESS_ROUNDS])
        try:
            for number in numbers:
                due = [n for n in measured if self._cell_seconds.get(n, 0.0) < self.settings.max_time]
                if not due:
                    break
                fresh = fresh_allowed and number > IN_PROCESS_ROUNDS
                progress.round(number, due, fresh)
                if fresh:
                    self._fresh_round(due)
                else:
                    self._remeasure(session, due, progress)
                progress.round_done()
        finally:
            progress.finish()
        short = [n for n in measured if len(self._retimed.get(n, [])) + 1 < self.settings.rounds]
        if short:
            self.ledger.note(f"{len(short)} cell{'s' * (len(short) != 1)} got fewer than {self.settings.rounds} "
                             f"measurement rounds (--trainperf-max-time={self.settings.max_time:g} s per cell): "
                             f"their noise band is thinner, or absent with a single round: {results.name_cells(short)}")
        spreads = judge.spreads({n: [self._first[n], *self._retimed.get(n, [])] for n in measured if n in self._first},
                                IN_PROCESS_ROUNDS)
        if spreads:
            self.ledger.note(spreads)

    def _fresh_round(self, nodeids: list[str]) -> None:
        """One noise round of these cells in a fresh child process (measured as a compare run against no
        baseline would measure them, timings only: ``TIMINGS_ONLY_ENV``); their timings join their rounds.
        A child that fails to give a cell costs that cell this round, with a note."""
        import shutil

        from pytest_trainperf import scratch
        from pytest_trainperf.runners.children import ChildError, child_env, command, run_child

        config = self.config
        workdir = scratch.directory("round")
        settings = replace(self.settings, update=False, enabled=True, rounds=1, confirm=0,
                           baselines=workdir / "no-baselines")
        argv = command(nodeids, config.rootpath, workdir / "tmp", config.inipath, config, settings)
        started = time.perf_counter()
        try:
            ran = run_child(argv, config.rootpath, {**child_env(os.environ), TIMINGS_ONLY_ENV: "1"}, workdir)
        except ChildError as exc:
            self.ledger.note(f"a noise round in a fresh process gave nothing: {exc}", nodeids)
            return
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        cells = {c.nodeid: c for c in ran.outcome.results.cells} if ran.outcome is not None else {}
        for nodeid in nodeids:
            cell = cells.get(nodeid)
            if cell is not None and cell.verdict.measurement.outcome is Outcome.MEASURED:
                self._retimed.setdefault(nodeid, []).append(cell.verdict.measurement)
        missing = [n for n in nodeids if n not in cells]
        if missing:
            last = (ran.output.strip().splitlines()[-1:] or [""])[0]
            self.ledger.note(f"a noise round in a fresh process did not measure {len(missing)} cell"
                             f"{'s' * (len(missing) != 1)} ({results.name_cells(missing)}; "
                             f"exit status {ran.returncode}; last output: {last[:200]})")
        share = (time.perf_counter() - started) / len(nodeids)
        for nodeid in nodeids:
            self._cell_seconds[nodeid] = self._cell_seconds.get(nodeid, 0.0) + share

    def _confirm_figures(self, session: pytest.Session, grid: str, state: GridState, remeasure: bool) -> None:
        """Re-time the cells of a grid's regressed timing figures ``--trainperf-confirm`` times, in turn
        (reference and variant one after the other, order alternating), and judge the figures again on
        the re-measurements; those that still regress fail the session."""
        assert state.specs is not None and state.baselines is not None
        pending = state.unconfirmed
        state.unconfirmed = ()
        involved = [r.nodeid for r in state.done if any(judge.feeds(v.figure, r.verdict.measurement) for v in pending)]
        rounds = self.settings.confirm if remeasure else 0
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and rounds:
            if self.config.get_terminal_writer().width_of_current_line:  # -q's dots: end their line first
                reporter.line("")
            reporter.write_line(f"trainperf: re-measuring {len(involved)} cells of {grid} to confirm "
                                f"{len(pending)} regressed figure{'s' * (len(pending) > 1)}")
        for number in range(rounds):
            self._remeasure(session, involved if number % 2 == 0 else involved[::-1])
        remeasured = [replace(r, verdict=replace(r.verdict, measurement=_retimed(
            r.verdict.measurement, self._retimed.pop(r.nodeid, [])))) for r in state.done]
        verdicts = self._judge_figures(state.specs, remeasured, state.baselines.file, state.overrides or {})
        judged = {v.figure.key: v for v in verdicts if v.figure.key in {p.figure.key for p in pending}}
        still = [v for v in judged.values() if v.status is Status.REGRESSED]
        if still and rounds:
            side = self._figures_side_by_side(session, grid, state, still)
            judged.update((v.figure.key, v) for v in side)
            still = [v for v in side if v.status is Status.REGRESSED]
        test = (pending[0].test_file, pending[0].test)
        self.ledger.figures[:] = [judged.get(v.figure.key, v) if (v.test_file, v.test) == test else v
                                  for v in self.ledger.figures]
        if still:
            self.figure_failures.append(judge.figure_failure(still, state.baselines.shown,
                                                             state.done[-1].fingerprint.key, confirmed=rounds))

    def _figures_side_by_side(self, session: pytest.Session, grid: str, state: GridState,
                              regressed: list[FigureVerdict]) -> list[FigureVerdict]:
        """Timing figures that regressed against the stored baseline, and again in the re-measurements,
        measured side by side as cells are (:meth:`_side_by_side`): the cells they come from, each in
        lockstep with the commit the baseline measured, on the first pair of worker processes. A relative
        figure is judged on its two cells' paired changes (:func:`judge.side_by_side_figure`), a scaling
        fit on the slope of its cells' paired changes along x (:func:`judge.side_by_side_scaling`). A
        stored figure made on another machine (another CPU of the same fingerprint) moves there, not
        here. Figures whose cells cannot be had side by side keep the re-measurements' verdict, with a
        note."""
        assert state.specs is not None and state.baselines is not None
        if self.settings.confirm_against == CONFIRM_NONE or not regressed:
            return regressed
        cells = [r.verdict.measurement for r in state.done]
        baseline = next((b for r in state.done
                         if (b := state.baselines.file.lookup(r.fingerprint.key, r.test, r.cell)) is not None), None)
        commit, name, problem = self._reference(baseline) if baseline is not None else (None, "", "no baseline")
        if commit is None:
            self.ledger.note(f"{grid}: its timing figures were not confirmed side by side ({problem}); the "
                             "re-measurements' verdict stands")
            return regressed
        sources = {v.figure.key: figure_sources(v.figure, cells) for v in regressed}
        needed = sorted({c.cell for found in sources.values() for c in found})
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"trainperf: measuring {len(needed)} cells of {grid} side by side with {name} to "
                                f"confirm {len(regressed)} regressed figure{'s' * (len(regressed) > 1)}")
        items = {item.nodeid: item for item in session.items}
        nodeids = {r.verdict.measurement.cell: r.nodeid for r in state.done}
        pairs: dict[str, Paired | str] = {}
        for cell in needed:
            item = items.get(nodeids[cell])
            if not isinstance(item, pytest.Function):
                pairs[cell] = "not collected in this session"
            elif item.get_closest_marker(RANKS_MARK) is not None:
                pairs[cell] = "a distributed cell: its ranks cannot take turns with another revision's"
            else:
                pairs[cell] = self._pair(item, commit, name, state.overrides or {})
        out = []
        for v in regressed:
            found = sources[v.figure.key]
            sides = [pairs[c.cell] for c in found]
            paired_metrics = [side.verdict.metric(v.figure.metric) if isinstance(side, Paired) else None
                              for side in sides]
            if not found or any(m is None for m in paired_metrics):
                why = next((side for side in sides if isinstance(side, str) and side),
                           f"no side-by-side {v.figure.metric} of its cells" if found else "its cells not found")
                self.ledger.note(f"{grid}: {v.figure.title()} not confirmed side by side ({why}); the "
                                 "re-measurements' verdict stands")
                out.append(v)
                continue
            measured = [m for m in paired_metrics if m is not None]
            tolerance = state.specs.tolerance(v.figure, state.overrides or {})
            if v.figure.kind is FigureKind.RELATIVE:
                out.append(judge.side_by_side_figure(v, measured[0], measured[1], name, tolerance))
            else:
                spec = next(s for s in state.specs.scaling if s.abscissa == v.figure.reference)
                points = [(x, m) for c, m in zip(found, measured, strict=True)
                          if (x := derived.abscissa(spec, c)) is not None]
                out.append(judge.side_by_side_scaling(v, points, name, tolerance))
        confirmed = [v for v in out if v.confirmed_against]
        if confirmed:
            self.ledger.note(f"{grid}: {len(confirmed)} timing figure{'s' * (len(confirmed) > 1)} confirmed side by "
                             f"side against {name}: {sum(v.status is Status.REGRESSED for v in confirmed)} regressed")
        return out

    # ------------------------------------------------------------------ the end

    @pytest.hookimpl(tryfirst=True)  # pytest calls it after Ctrl-C too
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._close()
        for path, entries in self._pending.items():
            self._write(path, entries)
        self._pending.clear()
        for grid, state in self._grids.items():
            if state.specs is not None and 0 < len(state.done) < state.size:
                self.ledger.warn(
                    f"the figures of {grid} (tp.relative/tp.scaling) were not judged: not all of its {state.size} "
                    "cells concluded in one process (the run stopped early, or pytest-xdist spread the grid over "
                    "workers: run with --dist loadgroup to keep each grid on one worker)")
        if self.ledger.errors or self.figure_failures:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_unconfigure(self) -> None:
        self._close()

    def _close(self) -> None:
        """End the runner's and the confirmations' child processes and worktrees."""
        if self.runner is not None:
            self.runner.close()
        if self._pairing is not None:
            self._pairing.close()
            self._pairing = None

    def _write(self, path: Path, entries: list[tuple[Fingerprint, CellResult]]) -> None:
        """Write the baselines of one file: each cell's rounds pooled, per environment."""
        by_env: dict[str, list[CellResult]] = {}
        fingerprints = {}
        if self._source is None:  # the code measured: the same for every file this session writes
            self._source = (vcs.snapshot(self.config.rootpath, self.settings.baselines),)
        for fingerprint, result in entries:
            rounds = self._retimed.get(result.nodeid, [])
            merged = stats.pool_rounds(result.verdict.measurement, rounds)
            pooled = replace(merged, source=self._source[0])
            decide = self._decide.get(result.nodeid)
            if rounds and decide is not None:  # the report shows the value stored: the rounds pooled
                self._show_pooled(result, replace(result, verdict=decide(merged)))
            by_env.setdefault(fingerprint.key, []).append(replace(result, verdict=replace(result.verdict,
                                                                                          measurement=pooled)))
            fingerprints[fingerprint.key] = fingerprint
        shown = _relative(path, self.config.rootpath)
        for key, cells in by_env.items():
            try:
                done = store.update_file(path, fingerprints[key], [r.verdict.measurement for r in cells], shown,
                                         derive=self._deriver(cells))
            except (store.BaselineError, OSError) as exc:
                self.ledger.errors.append(f"{shown}: not written: {exc}")
                continue
            self.ledger.changes += done.changes
            self.ledger.errors += done.refused  # the other cells were written
            for note in done.notes:
                self.ledger.note(note)

    def _show_pooled(self, first: CellResult, pooled: CellResult) -> None:
        """Put ``pooled`` in the ledger in the place of ``first`` (the same cell, round 1's verdict)."""
        cells = self.ledger.cells
        for i, result in enumerate(cells):
            if result is first:
                cells[i] = pooled
                return

    def _deriver(self, cells: list[CellResult]) -> store.Derive:
        """What recomputes, from a baseline file's cells after an update, the figures of the tests
        among ``cells`` that ask for figures."""
        specs = {r.test: state.specs for r in cells
                 if (state := self._grids.get(grid_key(r.nodeid))) is not None and state.specs is not None}

        def derive(stored: Mapping[tuple[str, str], Measurement]) -> dict[str, list[Figure]]:
            return {test: spec.derive([m for (t, _), m in stored.items() if t == test]) for test, spec in specs.items()}

        return derive

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        found = self.ledger
        if not found.cells and not found.errors:
            return
        from rich.console import Console

        from pytest_trainperf.report.summary import render_session

        writer = self.config.get_terminal_writer()
        buffer = io.StringIO()
        console = Console(file=buffer, width=max(writer.fullwidth, 40), force_terminal=writer.hasmarkup,
                          color_system="standard" if writer.hasmarkup else None, no_color=not writer.hasmarkup,
                          highlight=False, soft_wrap=False)
        render_session(console, results=[(r.test_file, r.test, r.axes, r.verdict) for r in found.cells],
                       fingerprints=sorted({r.fingerprint.key for r in found.cells}),
                       show=self.settings.show, changes=found.changes, update=self.settings.update,
                       errors=found.errors, hint="" if found.against else UPDATE_HINT,
                       elsewhere=sorted({key for r in found.cells for key in r.elsewhere}),
                       figures=found.figures, warnings=found.warnings,
                       verbose=self.config.getoption("verbose", 0) > 0)
        terminalreporter.write_sep("=", "trainperf")
        if found.against:
            terminalreporter.write_line(f"compared against {found.against} (no baseline file read or written)")
        terminalreporter.write(buffer.getvalue())
        machine = found.snapshot().machine
        if machine is not None and not self.settings.update:
            terminalreporter.write_line(f"trainperf: {machine.describe()}")
        for failure in self.figure_failures:
            terminalreporter.write_line("")
            for line in failure.splitlines():
                terminalreporter.write_line(line, red=True, bold=line.startswith("trainperf regression"))
        for note in found.note_lines():
            terminalreporter.write_line(f"trainperf note: {note}")


def _retimed(measurement: Measurement, again: list[Measurement]) -> Measurement:
    """``measurement`` with its timings replaced by those of its re-measurements, pooled."""
    if not again:
        return measurement
    pooled = stats.pool_rounds(again[0], again[1:])
    timed = {m.name: m for m in pooled.metrics if m.name in stats.TIMING_METRICS}
    return replace(measurement, metrics=tuple(timed.get(m.name, m) for m in measurement.metrics))
