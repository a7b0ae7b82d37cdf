"""``--trainperf-isolate``: each trainperf cell runs in a fresh child process.

A cell that the kernel kills (the OOM killer sends SIGKILL) or that crashes the interpreter (a
segfault in an extension, an abort) takes only its own process down: the session reports the cell
as out of memory (:attr:`Outcome.OOM_KILLED`) or crashed (:attr:`Outcome.CRASHED`) and goes on.
Every isolated cell also reports ``peak_rss``, the peak resident set size of its process (bytes,
report-only unless a test gives it a tolerance).

How the work is split:

* The **parent** (the pytest session the user started; :class:`TrainPerfIsolation`) collects, sets up
  and tears down every test as usual, and reports it through pytest's own machinery. For an item that
  uses the ``trainperf`` fixture, a ``tryfirst`` ``pytest_pyfunc_call`` runs the test function in a
  child, ``python -m pytest <node id>``, instead of calling it. The item then passes or fails as the
  child's run says, with the parent's own verdict against the baseline (re-judged here, so the grid
  correction spans all the cells of the session), or with the child's failure message.

  Why ``pytest_pyfunc_call`` and not a protocol of our own: the reports, ``-x``, xfail, JUnit and the
  terminal all stay pytest's. The price: the test's fixtures are set up in the parent too (the
  ``trainperf`` fixture itself is cheap there). Build the model and data inside the test function, as
  the examples do, so the parent never allocates the workload.

* The **child** (marked by :data:`CHILD_ENV`, the path it writes to; it is never isolated again)
  measures its one cell as a normal session would, confirmation re-measurements included, adds
  ``peak_rss`` (``getrusage``) to the cell's measurement, and at the end writes the reports of its
  test and its results (:mod:`pytest_trainperf.results`) to that file (:class:`TrainPerfChild`).

* A child that leaves no result: exit by SIGKILL is out of memory (killed), any other signal or exit
  is a crash, with the last lines of its output in the failure. Its ``peak_rss`` comes from the
  kernel's accounting of the dead child (``os.wait4``), its environment fingerprint from the parent.

Updates: the child writes its cell's baseline itself, as a pytest-xdist worker does, under the lock
that :func:`store.update` holds, after its own noise rounds (``--trainperf-rounds``: the rounds of one
cell run back to back in its child, not interleaved with other cells); the parent takes in the cell
and the baseline changes. A killed cell's outcome is written by the parent (its child wrote nothing);
a crashed cell is never written. The options of the session reach the child on its command line,
built from the resolved :class:`Settings` (:func:`child_args`), with the same rootdir and ini file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_trainperf import results
from pytest_trainperf.outputs import STEP_SUMMARY_ENV
from pytest_trainperf.records import Measurement, Metric, Outcome
from pytest_trainperf.settings import OPTIONS, Settings
from pytest_trainperf.units import format_value

if TYPE_CHECKING:
    from pytest_trainperf.plugin import TrainPerfSession

PLUGIN_NAME = "trainperf-isolate"
"""The name the parent's or the child's part is registered under."""
CHILD_ENV = "PYTEST_TRAINPERF_CHILD"
"""Set in an isolated child's environment to the file it writes its outcome to."""
FIXTURE = "trainperf"
"""Tests that request this fixture are isolated."""
FORMAT = "pytest-trainperf isolated cell"
"""The ``format`` marker of a child's outcome file."""
OUTPUT_LINES = 20
"""Lines of a dead child's output shown in the cell's failure."""
DETAIL_CHARS = 200
"""Characters of a crashed child's last output line kept in the cell's detail."""
KILLED = "killed by SIGKILL (the kernel's OOM killer or another process)"
"""The detail of an out-of-memory-killed cell."""
PASSED_THROUGH = ("-p", "-W", "-o", "--override-ini", "--pythonwarnings", "--import-mode")
"""Options of the parent's command line that the child gets too (plugins, warnings, ini overrides)."""
NOT_FORWARDED = frozenset({
    "trainperf_strict",  # the parent judges the cell: a cell without a baseline fails there
    "trainperf_show",  # the parent renders the report
    "trainperf_json",  # the parent writes the session's results
    "trainperf_markdown",
    "trainperf_plots",  # the parent draws the session's figures
    "trainperf_devices",  # resolved into this worker's --trainperf-device
    "trainperf_isolate",  # a child is never isolated again
    "trainperf_against",  # a lockstep child measures its own tree only
    "trainperf_pairs",
})
"""Options the child does not get; :func:`child_args` passes every other one."""


def child_args(settings: Settings) -> list[str]:
    """The trainperf options of a child, from the parent's resolved settings (the command line wins
    over the ini file the child reads too; the baseline directory is absolute)."""
    args = ["--trainperf-update-baselines"] if settings.update else ["--trainperf"] if settings.enabled else []
    args += [f"--trainperf-baselines={settings.baselines.resolve()}", f"--trainperf-device={settings.device}",
             f"--trainperf-confirm={settings.confirm}", f"--trainperf-rounds={settings.rounds}",
             f"--trainperf-max-time={settings.max_time!r}", f"--trainperf-malloc={settings.malloc}"]
    if settings.threads is not None:
        args.append(f"--trainperf-threads={settings.threads}")
    if settings.memory_budget is not None:
        args.append(f"--trainperf-memory-budget={settings.memory_budget}")
    args.append(f"--trainperf-cudnn-benchmark={settings.cudnn_benchmark}")
    return args


def ini_overrides() -> list[str]:
    """``-o`` options that switch off the ini twins of the options the child does not get (the child
    reads the same ini file: it must not write the session's JSON or Markdown, for one)."""
    out: list[str] = []
    for opt in OPTIONS:
        if opt.dest in NOT_FORWARDED:
            out += ["-o", f"{opt.dest}={'false' if opt.flag else ''}"]
    return out


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A child's environment: the parent's, less what would repeat the session's work (options from
    ``$PYTEST_ADDOPTS``, already on the command line; a Markdown report per cell in the job summary)."""
    return {k: v for k, v in environ.items() if k not in ("PYTEST_ADDOPTS", STEP_SUMMARY_ENV)}


def passed_through(args: Sequence[str]) -> list[str]:
    """The options of :data:`PASSED_THROUGH` in a command line, with their values (``-p x``,
    ``-px``, ``--override-ini=x``, ``--override-ini x``)."""
    out: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        for opt in PASSED_THROUGH:
            if arg == opt and rest:
                out += [arg, rest.pop(0)]
            elif arg.startswith(f"{opt}=") or (not opt.startswith("--") and arg.startswith(opt) and arg != opt):
                out.append(arg)
            else:
                continue
            break
    return out


def rss_bytes(maxrss: int) -> float:
    """``ru_maxrss`` in bytes: Linux counts KiB, macOS bytes."""
    return float(maxrss if sys.platform == "darwin" else maxrss * 1024)


# --------------------------------------------------------------------------- the child's outcome


@dataclass(frozen=True)
class PhaseReport:
    """One phase of the child's test (or its collection) as the parent needs it."""

    nodeid: str
    """The node the report is about."""
    when: str
    """``collect``, ``setup``, ``call`` or ``teardown``."""
    outcome: str
    """``passed``, ``failed`` or ``skipped``."""
    text: str = ""
    """The failure's text, or the reason of a skip."""
    xfail: str | None = None
    """For an expected failure: its reason."""


@dataclass(frozen=True)
class ChildOutcome:
    """What an isolated child wrote at the end of its session."""

    reports: tuple[PhaseReport, ...]
    """The reports of its test, in order."""
    results: results.SessionResults
    """Its trainperf results (its cell, baseline changes and write errors)."""


class ChildError(Exception):
    """A child's outcome file that cannot be used."""


def dump_outcome(outcome: ChildOutcome) -> str:
    """The text of a child's outcome file: its reports, and its results as a result file's text."""
    return json.dumps({"format": FORMAT, "reports": [asdict(r) for r in outcome.reports],
                       "results": results.dump(outcome.results)})


def load_outcome(source: str, text: str) -> ChildOutcome:
    """Parse a child's outcome file; raise :class:`ChildError` naming what is wrong."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ChildError(f'{source}: not an isolated cell\'s outcome (no "format": "{FORMAT}")')
        reports = tuple(PhaseReport(nodeid=str(r["nodeid"]), when=str(r["when"]), outcome=str(r["outcome"]),
                                    text=str(r.get("text", "")),
                                    xfail=None if r.get("xfail") is None else str(r["xfail"]))
                        for r in doc["reports"])
        found = results.loads(f"{source} (results)", doc["results"])
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ChildError(f"{source}: unreadable ({type(exc).__name__}: {exc})") from None
    except results.ResultsError as exc:
        raise ChildError(str(exc)) from None
    return ChildOutcome(reports=reports, results=found)


def _phase(report: pytest.TestReport | pytest.CollectReport) -> PhaseReport:
    text = ""
    if report.failed:
        text = report.longreprtext
    elif report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2]).removeprefix("Skipped: ")
    return PhaseReport(nodeid=report.nodeid, when=getattr(report, "when", "collect"), outcome=report.outcome,
                       text=text, xfail=getattr(report, "wasxfail", None))


class TrainPerfChild:
    """An isolated child's part: add ``peak_rss`` to its cell, write its reports and results at the end."""

    def __init__(self, session: TrainPerfSession, path: Path) -> None:
        self.session = session
        self.path = path
        self.reports: list[PhaseReport] = []

    @pytest.hookimpl(wrapper=True, trylast=True)  # inside the session's wrapper, which then reads the cell
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        result = yield
        from pytest_trainperf.plugin import FIXTURE_KEY

        fixture = item.stash.get(FIXTURE_KEY, None)
        if (fixture is not None and self.session.settings.enabled and not fixture.timing_only
                and fixture.result() is not None):
            import resource

            peak = rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            fixture.add_metric(Metric("peak_rss", peak, "B"))
        return result

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(_phase(report))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.reports.append(_phase(report))

    @pytest.hookimpl(trylast=True)  # after the session object wrote the cell's baseline
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from pytest_trainperf.outputs import session_results
        from pytest_trainperf.store import write_atomic

        write_atomic(self.path, dump_outcome(ChildOutcome(tuple(self.reports), session_results(self.session))))


# --------------------------------------------------------------------------- the parent


@dataclass(frozen=True)
class ChildRun:
    """How an isolated child ended."""

    returncode: int
    """Its exit status; minus the signal's number when a signal ended it."""
    peak_rss: float
    """Its peak resident set size in bytes (the kernel's accounting)."""
    output: str
    """The last :data:`OUTPUT_LINES` lines of its stdout and stderr."""
    outcome: ChildOutcome | None
    """What it wrote; None when it wrote nothing."""


def start_child(argv: Sequence[str], cwd: Path, env: Mapping[str, str], workdir: Path,
                pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start a child, its output to a file in ``workdir``, its outcome to be written there too;
    ``pass_fds`` are inherited (the lockstep pipes of ``--trainperf-against``)."""
    with open(workdir / "output.txt", "wb") as out:
        return subprocess.Popen(list(argv), cwd=cwd, env={**env, CHILD_ENV: str(workdir / "outcome.json")},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                pass_fds=tuple(pass_fds))


def wait_child(proc: subprocess.Popen[bytes], workdir: Path) -> ChildRun:
    """Wait for a child started by :func:`start_child` (``os.wait4``: its exit status and resource
    usage) and read what it left; killed first if the wait is interrupted."""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: leave no child behind
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    lines = (workdir / "output.txt").read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    result = workdir / "outcome.json"
    outcome = None
    if result.exists():
        outcome = load_outcome(f"outcome of the isolated run ({result.name})",
                               result.read_text(encoding="utf-8", errors="replace"))
    return ChildRun(returncode=proc.returncode, peak_rss=rss_bytes(usage.ru_maxrss),
                    output="\n".join(lines[-OUTPUT_LINES:]), outcome=outcome)


def run_child(argv: Sequence[str], cwd: Path, env: Mapping[str, str], workdir: Path) -> ChildRun:
    """Run a child to its end (``os.wait4``: its exit status and resource usage), output to a file."""
    return wait_child(start_child(argv, cwd, env, workdir), workdir)


def death(returncode: int) -> tuple[Outcome, str]:
    """The outcome and detail of a child that ended with ``returncode`` and left no result."""
    if returncode == -signal.SIGKILL:
        return Outcome.OOM_KILLED, KILLED
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Outcome.CRASHED, f"crashed: died of {name}"
    return Outcome.CRASHED, f"crashed: exited with status {returncode} without a result"


def child_record(item: pytest.Function, done: ChildOutcome, run: ChildRun) -> results.CellRecord | None:
    """The cell a child measured for ``item``; fails, skips or xfails ``item`` (raising pytest's
    outcome exception) as the child's run of it did; None when it passed and measured nothing."""
    reports = [r for r in done.reports if r.nodeid == item.nodeid or r.when == "collect"]
    failed = [r for r in reports if r.outcome == "failed"]
    record = next((c for c in done.results.cells if c.nodeid == item.nodeid), None)
    for r in failed:
        if r.when != "call" or record is None:
            pytest.fail(f"{r.text}\n(in the isolated run of {item.nodeid}: {r.when} failed)", pytrace=False)
    if not any(r.when == "call" for r in reports):
        skipped = next((r for r in reports if r.outcome == "skipped"), None)
        if skipped is not None:
            pytest.skip(skipped.text)
        pytest.fail(f"trainperf: the isolated run of {item.nodeid} ran no test (exit status "
                    f"{run.returncode}); its output ended:\n{run.output}", pytrace=False)
    call = next(r for r in reports if r.when == "call")
    if call.xfail is not None and call.outcome == "skipped":
        pytest.xfail(call.xfail)
    if call.outcome == "skipped":
        pytest.skip(call.text)
    return record


class TrainPerfIsolation:
    """The parent's part: runs each trainperf test function in a child and concludes its cell."""

    def __init__(self, session: TrainPerfSession) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> bool | None:
        if FIXTURE not in pyfuncitem.fixturenames:
            return None
        if self.session.round == 1:  # an update's noise rounds of an isolated cell ran in its child
            self._conclude(pyfuncitem, self._run(pyfuncitem))
        return True

    def _run(self, item: pytest.Function) -> ChildRun:
        config = self.session.config
        workdir = Path(tempfile.mkdtemp(prefix="trainperf-isolate-"))
        argv = [sys.executable, "-m", "pytest", item.nodeid, "-p", "no:cacheprovider", "-q", "--color=no",
                "-o", "addopts=", f"--rootdir={config.rootpath}", f"--basetemp={workdir / 'tmp'}"]
        if config.inipath is not None:
            argv += ["-c", str(config.inipath)]
        argv += passed_through(config.invocation_params.args) + ini_overrides() + child_args(self.session.settings)
        try:
            return run_child(argv, config.rootpath, child_env(os.environ), workdir)
        except ChildError as exc:
            pytest.fail(f"trainperf: {item.nodeid}: the isolated run's {exc}", pytrace=False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _conclude(self, item: pytest.Function, run: ChildRun) -> None:
        if run.outcome is None:
            self._dead(item, run)
            return
        record = child_record(item, run.outcome, run)
        if record is None:
            return
        if self.session.settings.update:  # the child wrote the cell's baseline: take in what it did
            from pytest_trainperf.outputs import result_of

            self.session.results.append(result_of(record))
            self.session.changes += run.outcome.results.changes
            self.session.write_errors += run.outcome.results.errors
            return
        from pytest_trainperf.plugin import FIXTURE_KEY

        cell = item.stash[FIXTURE_KEY].cell
        self.session.accept(item, cell, record.fingerprint, record.verdict.measurement)

    def _dead(self, item: pytest.Function, run: ChildRun) -> None:
        """Conclude a cell whose child died: out of memory if killed by SIGKILL, else crashed."""
        outcome, detail = death(run.returncode)
        message = (f"trainperf: isolated cell {item.nodeid} {detail}; its process's peak RSS was "
                   f"{format_value(run.peak_rss, 'B')}.\nThe last lines of its output:\n{run.output}")
        settings = self.session.settings
        if not settings.enabled:
            pytest.fail(message, pytrace=False)
        from pytest_trainperf.plugin import FIXTURE_KEY

        last = next((line.strip() for line in reversed(run.output.splitlines()) if line.strip()), "")
        if outcome is Outcome.CRASHED and last:
            detail += f"; last output: {last[:DETAIL_CHARS]}"
        fixture = item.stash[FIXTURE_KEY]
        cell, fingerprint = fixture.cell, fixture.fingerprint()
        measurement = Measurement(test=cell.test, cell=cell.cell, params=cell.params,
                                  metrics=(Metric("peak_rss", run.peak_rss, "B"),), outcome=outcome, detail=detail)
        self.session.accept(item, cell, fingerprint, measurement)  # fails it when the outcome regressed


def register(config: pytest.Config, session: TrainPerfSession) -> None:
    """Register the child's part in an isolated child, the parent's under ``--trainperf-isolate``."""
    child = os.environ.get(CHILD_ENV)
    if child:
        config.pluginmanager.register(TrainPerfChild(session, Path(child)), PLUGIN_NAME)
    elif session.settings.isolate:
        if not hasattr(os, "wait4"):
            raise pytest.UsageError(f"--trainperf-isolate: expected a POSIX system (Linux, macOS) with os.wait4; "
                                    f"this one ({sys.platform}) has none")
        config.pluginmanager.register(TrainPerfIsolation(session), PLUGIN_NAME)
