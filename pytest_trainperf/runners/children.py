"""What the runners that start child processes share: the child's command line and environment, how it
is started and waited for, the outcome file it writes at its end, and how the parent reads it.

A child is ``python -m pytest <node id>`` with the session's options (:func:`command`). It measures its
one cell as a normal session would (its in-process runner), and :class:`ChildReporter` writes the
reports of its test and its results to the file named by :data:`CHILD_ENV`. The parent reads that file
(:func:`wait_child`), or, when the child left none, tells out of memory (SIGKILL) from a crash
(:func:`death`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from pytest_trainperf import results
from pytest_trainperf.records import CellResult, Outcome
from pytest_trainperf.settings import OPTIONS, Settings

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
"""The file GitHub Actions renders as the job's summary (the session's Markdown report is appended to it)."""

PLUGIN_NAME = "trainperf-child"
"""The name a child's reporter is registered under."""
CHILD_ENV = "PYTEST_TRAINPERF_CHILD"
"""Set in a child's environment to the file it writes its outcome to."""
TIMINGS_ONLY_ENV = "PYTEST_TRAINPERF_TIMINGS_ONLY"
"""Set in a child whose parent uses only its cells' timings: the child of an update's noise round in a
fresh process, a worker of a side-by-side confirmation. It measures timings only (no counting pass, no
memory-tracked step), as a noise round in the session's process does, and reports each cell."""
LOCKSTEP_ENV = "PYTEST_TRAINPERF_LOCKSTEP"
"""Set in a lockstep child's environment to ``<fd it reads commands from>,<fd it answers on>``."""
RANKS_ENV = "PYTEST_TRAINPERF_RANKS"
"""Set in the environment of a distributed cell's ranks to the directory each writes its outcome to
(``rank-<RANK>.json``)."""


def in_child() -> bool:
    """Whether this process is a child the plugin started (an isolated cell, a noise round, a worker,
    a rank of a distributed cell)."""
    return bool(os.environ.get(CHILD_ENV) or os.environ.get(LOCKSTEP_ENV) or os.environ.get(RANKS_ENV))


def outcome_path() -> Path | None:
    """Where this child writes its outcome for its parent; None in a process that is no child."""
    ranks = os.environ.get(RANKS_ENV)
    if ranks:
        return Path(ranks) / f"rank-{os.environ.get('RANK', '0')}.json"
    path = os.environ.get(CHILD_ENV)
    return Path(path) if path else None


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
    "trainperf_csv",
    "trainperf_plots",  # the parent draws the session's figures
    "trainperf_devices",  # resolved into this worker's --trainperf-device
    "trainperf_isolate",  # a child is never isolated again
    "trainperf_against",  # a lockstep child measures its own tree only
    "trainperf_pairs",
    "trainperf_nnodes",  # the parent launches a distributed cell's ranks on its node; a child launches none
    "trainperf_rdzv_endpoint",
    "trainperf_rdzv_id",
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
    args.append("--trainperf-confirm-against=none")  # a child never confirms side by side: its parent does
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


def phase_report(report: pytest.TestReport | pytest.CollectReport) -> PhaseReport:
    text = ""
    if report.failed:
        text = report.longreprtext
    elif report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2]).removeprefix("Skipped: ")
    return PhaseReport(nodeid=report.nodeid, when=getattr(report, "when", "collect"), outcome=report.outcome,
                       text=text, xfail=getattr(report, "wasxfail", None))


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
    ``pass_fds`` are inherited (the lockstep pipes of ``--trainperf-against``). A lockstep worker is
    pinned only for its timed pairs (:func:`pin_process`)."""
    with open(workdir / "output.txt", "wb") as out:
        return subprocess.Popen(list(argv), cwd=cwd, env={**env, CHILD_ENV: str(workdir / "outcome.json")},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                pass_fds=tuple(pass_fds), preexec_fn=die_with_parent(os.getpid()))


def pair_cpus(threads: int) -> frozenset[int] | None:
    """The CPUs both workers of a lockstep pair run on: the last ``threads`` of the session's own (one
    per intra-op thread), the same for both, so that each step of a pair runs on the cores the other's
    did. None where that leaves nothing out (as many threads as CPUs) or where a process cannot be
    pinned (not Linux).

    Two unpinned workers on a multi-core machine each settle on a core of their own, and two cores of a
    virtual machine can differ by more than the slowdowns worth catching: on a 2-core AMD EPYC runner,
    eight pairs of processes of the same code (an MLP step of a few ms) differed by -40.7% to +64.3%
    unpinned and by -2.9% to +1.1% on one shared core (the per-pair median, before the balanced ratios
    of :mod:`pytest_trainperf.paired`). On a 2-core Intel Xeon runner, six pairs each, the median
    balanced ratio stayed within -1.1% to +0.3% unpinned and -1.9% to +1.3% shared: not every machine's
    cores differ, and sharing costs little where they do not (``docs/performance.md``)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    if threads >= len(mine):
        return None
    return frozenset(mine[-max(threads, 1):])


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Move every thread of process ``pid`` onto ``cpus`` (Linux; threads it starts later inherit it).
    A thread that ended meanwhile is passed over; so is a process that is gone."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


PR_SET_PDEATHSIG = 1
"""``prctl``'s option that asks the kernel to send the calling process a signal when its parent dies."""


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """What a child runs before it starts (Linux): the kernel kills it when the session that started it
    dies, SIGKILL included, so that no child measures on, or writes a baseline, after its session is
    gone. None elsewhere (the pipes of a lockstep worker still end it)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return arm


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


def child_record(item: pytest.Function, done: ChildOutcome, run: ChildRun) -> CellResult | None:
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


class ChildReporter:
    """A child's part: keep the reports of its test, and write them with its results at its end."""

    def __init__(self, ledger: results.Ledger, path: Path) -> None:
        self.ledger = ledger
        self.path = path
        self.reports: list[PhaseReport] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(phase_report(report))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.reports.append(phase_report(report))

    @pytest.hookimpl(trylast=True)  # after the session object wrote the cell's baseline
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from pytest_trainperf.store import write_atomic

        write_atomic(self.path, dump_outcome(ChildOutcome(tuple(self.reports), self.ledger.snapshot())))


def register_reporter(config: pytest.Config, ledger: results.Ledger) -> None:
    """In a child process: register the reporter that writes its outcome for its parent."""
    path = outcome_path()
    if path is not None:
        config.pluginmanager.register(ChildReporter(ledger, path), PLUGIN_NAME)


def command(nodeids: Sequence[str], rootdir: Path, basetemp: Path, inifile: Path | None, config: pytest.Config,
            settings: Settings, launcher: Path | None = None) -> list[str]:
    """A child's command line: pytest on these node ids (or files), with this session's options. A node
    id that starts with ``-`` (a directory named ``-x``) goes as ``./-x/...``: never read as an option.
    ``launcher``: a script that runs pytest, instead of ``python -m pytest`` (which puts the working
    directory first on ``sys.path``)."""
    targets = [f"./{n}" if n.startswith("-") else n for n in nodeids]
    pytest_ = [str(launcher)] if launcher is not None else ["-m", "pytest"]
    argv = [sys.executable, *pytest_, *targets, "-p", "no:cacheprovider", "-q", "--color=no",
            "-o", "addopts=", f"--rootdir={rootdir}", f"--basetemp={basetemp}"]
    if inifile is not None:
        argv += ["-c", str(inifile)]
    return argv + passed_through(config.invocation_params.args) + ini_overrides() + child_args(settings)
