"""``--trainperf-against=REF``: each cell measured side by side with the same cell at git revision REF.

A stored baseline drifts between processes on a shared runner by more than the slowdowns worth
catching; measuring the old and the new code at the same time does not: whatever the machine does, it
does to both. How:

* The **parent** (the session the user started; its runner is :class:`Lockstep`) resolves REF in the
  repository under test and checks it out, detached, into a temporary ``git worktree`` (at the first
  cell; removed again at the end of the session, on Ctrl-C and on failure too, then ``git worktree
  prune``). For each item that uses the ``trainperf`` fixture, the runner starts two children instead
  of calling the test: pytest on ``<node id>`` (run by :data:`LAUNCHER`) with the rootdir,
  ini file and ``sys.path`` of the REF worktree (A), and of this checkout (B): each imports the code
  under test from its own tree (the tree and its ``src/`` go first on ``PYTHONPATH``, ahead of an
  installed copy); both use this pytest-trainperf.
* Each **child** (marked by :data:`~pytest_trainperf.runners.children.LOCKSTEP_ENV`: the pipes to its
  parent; its in-process runner times steps with :func:`lockstep_timer`)
  builds the cell's workload, runs the instrumented steps (FLOPs, peak memory) and its warm-up as any
  cell does, says ``ready``, then times one step each time the parent says ``go`` and answers ``done``
  (on the CPU, less what the step waited for another process to give up the core:
  :mod:`pytest_trainperf.measure.waiting`).
  At ``stop`` the test goes on as usual and the child writes its cell as an isolated child does
  (:class:`pytest_trainperf.runners.children.ChildReporter`).
* In between, the parent **takes turns**: :data:`WARM_PAIRS` untimed pairs, then ``--trainperf-pairs``
  timed ones, one step of A and one of B, the order flipping every pair (AB, BA, AB, ...), so that both
  steps of a pair see the same state of the machine and an order effect cancels. For the pairs, both
  workers run on the same CPUs (:func:`~pytest_trainperf.runners.children.pair_cpus`: the last
  ``threads`` of the session's), so that a pair's two steps also ran on the same cores; before them
  (starting, collecting, building the cell, counting its work, warming up: nothing timed) each runs
  on any of the session's CPUs, side by side.
* The verdict (:func:`pytest_trainperf.paired.judge_paired`): timings on the balanced ratios (each
  two consecutive pairs, one A-first and one B-first, so that the order effect cancels; median and
  sign-test interval), exact metrics (FLOPs, peak memory, loss) value against value. It goes into
  the session's results like any verdict (heatmaps, JSON, Markdown, JUnit), labelled "against REF";
  the runner returns both sides (:class:`~pytest_trainperf.runners.CellRun` with ``reference``) and
  the session's judge decides (:func:`pytest_trainperf.judge.side_by_side`).

A cell that cannot be measured at REF (the test or cell is not there, it fails or crashes there) is
measured here alone and reported as new, with the reason; ``--trainperf-strict`` fails it. A tree with
uncommitted changes is compared as it is (that is the point of comparing work in progress), and the
report says so. No baseline file is read or written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from pytest_trainperf import paired, scratch
from pytest_trainperf.records import CellResult
from pytest_trainperf.results import Ledger
from pytest_trainperf.runners import CellRun
from pytest_trainperf.runners.children import (
    DETAIL_CHARS,
    LOCKSTEP_ENV,
    OUTPUT_LINES,
    TIMINGS_ONLY_ENV,
    ChildError,
    ChildOutcome,
    ChildRun,
    PhaseReport,
    child_env,
    child_record,
    command,
    death,
    dump_outcome,
    load_outcome,
    pair_cpus,
    phase_report,
    pin_process,
    start_child,
)
from pytest_trainperf.settings import Settings
from pytest_trainperf.vcs import SHORT_SHA, GitError, Trees, add_worktree, remove_worktree, resolve_trees

if TYPE_CHECKING:
    import torch

    from pytest_trainperf.fixture import TrainPerf
    from pytest_trainperf.measure.timing import Timed

PLUGIN_NAME = "trainperf-lockstep"
"""The name a lockstep worker's serving loop is registered under."""
FIXTURE_NAME = "trainperf"
"""The fixture whose tests a worker collects."""
WARM_PAIRS = 2
"""Untimed pairs of steps, in lockstep, before the timed ones: both children ran their warm-up at the
same time, each with the other one busy; these warm the caches to the turn-taking they are timed in."""
READY, GO, WARM, STOP, DONE = "ready", "go", "warm", "stop", "done"
"""The words of the lockstep protocol within a cell, one per line."""
SERVING, RUN, END, QUIT = "serving", "run", "end", "quit"
"""The words between cells: a worker says ``serving`` once it collected its files, runs ``run <node id>``
and answers ``end <outcome>`` (the cell's reports and results, one line of JSON) when its test is over;
``quit`` ends it."""
QUIT_WAIT = 30.0
"""Seconds a worker told to quit may take to end before it is killed."""
THIS, REF = "this tree", "REF"
"""The two sides of a comparison, as messages name them."""


# --------------------------------------------------------------------------- the lockstep child


class Channel:
    """One end of the lockstep pipes: a line out, a line in."""

    def __init__(self, reader: IO[str], writer: IO[str]) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    def from_env(cls, value: str) -> Channel:
        """The child's end, from :data:`LOCKSTEP_ENV` (``<read fd>,<write fd>``)."""
        read_fd, write_fd = (int(part) for part in value.split(","))
        return cls(os.fdopen(read_fd, "r", encoding="ascii"), os.fdopen(write_fd, "w", encoding="ascii"))

    def send(self, word: str) -> None:
        """Write one line and flush it."""
        self.writer.write(word + "\n")
        self.writer.flush()

    def receive(self) -> str:
        """The next line; empty at end of file (the other end is gone)."""
        return self.reader.readline().strip()

    def close(self) -> None:
        """Close both pipes (errors from a vanished other end are ignored)."""
        for stream in (self.writer, self.reader):
            try:
                stream.close()
            except OSError:
                pass


def lockstep_timer(channel: Channel) -> Callable[..., Timed]:
    """A stand-in for :func:`~pytest_trainperf.measure.timing.time_steps` that runs the warm-up, says
    ``ready``, then runs one step per ``warm`` or ``go`` from the parent (timing the ``go`` ones) and
    answers ``done`` after each, until ``stop``. With no ``go`` at all (the other side died before the
    timed pairs) it times one step on its own, so that the cell still has a step time. On the CPU a
    step's time leaves out what it waited for another process to give up the core
    (:mod:`pytest_trainperf.measure.waiting`), so that a neighbour on the pair's core does not water a
    change down."""

    def timer(fn: Callable[[], Any], count: int, device: torch.device, keep: Callable[[Any], object] | None = None,
              warmup: int = 0, settle: bool = True, on_timed: Callable[[], None] | None = None) -> Timed:
        from pytest_trainperf.measure import waiting
        from pytest_trainperf.measure.timing import NS_PER_S, Timed, no_gc, synchronizer, warm_up

        sync = synchronizer(device)
        clock = time.perf_counter_ns
        counted = device.type == "cpu" and waiting.available()  # the counters: read outside the timed span
        samples: list[int] = []
        kept: list[object] = []
        warm = warmup

        def one() -> int:
            before = waiting.read() if counted else None
            start = clock()
            result = fn()
            sync()
            elapsed = clock() - start
            if before is not None:  # less the time another process had the core
                elapsed -= waiting.neighbour_wait(before, waiting.read(), elapsed)
            if keep is not None:
                kept.append(keep(result))
            return elapsed

        with no_gc():
            warm_up(fn, warmup, keep, kept)
            sync()
            channel.send(READY)
            while (word := channel.receive()) in (WARM, GO):
                if word == GO and not samples and on_timed is not None:
                    on_timed()
                elapsed = one()
                if word == GO:
                    samples.append(elapsed)
                    channel.send(f"{DONE} {elapsed}")  # the parent decides on the pairs so far
                else:
                    warm += 1
                    channel.send(DONE)
            if not samples:
                samples.append(one())
        return Timed(samples=[s / NS_PER_S for s in samples], kept=kept, warmup=warm)

    return timer


LAUNCHER = "trainperf_pytest.py"
"""The script a worker runs pytest with, beside this pytest-trainperf in the workers' plugin directory.
``python -m pytest`` would put the worker's working directory (the root of the tree under test) first
on ``sys.path``, so that a tree that holds a pytest-trainperf of its own (this project's, at any older
commit) would load that one; a script puts its own directory first instead."""
LAUNCHER_SOURCE = "import sys\n\nimport pytest\n\nsys.exit(pytest.console_main())\n"


# --------------------------------------------------------------------------- the parent


class Worker:
    """One child of a lockstep pair, as the parent drives it."""

    def __init__(self, side: str, proc: subprocess.Popen[bytes], channel: Channel, workdir: Path) -> None:
        self.side = side
        self.proc = proc
        self.channel = channel
        self.workdir = workdir
        self.live = True
        self.times: list[float] = []
        """Seconds of each timed step, as the child answered them."""
        self.ended: str | None = None
        """The ``end`` line's outcome once the cell's test is over (None before, or if the child died)."""

    def ask(self, word: str) -> bool:
        """Send ``word``; wait for ``done`` (or ``ready``). False, and not live any more, if the child
        ended instead (its test failed before or during its steps, or it died)."""
        if not self.live:
            return False
        try:
            if word:
                self.channel.send(word)
            answer = self.channel.receive()
        except (BrokenPipeError, OSError):
            answer = ""
        if answer.startswith(f"{END} "):
            self.ended = answer[len(END) + 1:]
        words = answer.split()
        self.live = bool(words) and words[0] in (READY, DONE)
        if self.live and word == GO and len(words) == 2:
            self.times.append(int(words[1]) / 1e9)
        return self.live

    def stop(self) -> None:
        """Tell a live child to stop stepping and finish its test."""
        if self.live:
            try:
                self.channel.send(STOP)
            except (BrokenPipeError, OSError):
                pass
            self.live = False

    def kill(self) -> None:
        """Kill the child if it still runs (an interrupted comparison)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # ------------------------------------------------------------------ a persistent worker

    def serving(self) -> bool:
        """Wait for the worker's ``serving`` (it collected its files); False if it ended instead."""
        try:
            return self.channel.receive() == SERVING
        except (OSError, ValueError):
            return False

    def begin(self, nodeid: str) -> bool:
        """Start the test of ``nodeid`` in the worker; False if the worker is gone."""
        self.live, self.times, self.ended = True, [], None
        try:
            self.channel.send(f"{RUN} {nodeid}")
        except (BrokenPipeError, OSError, ValueError):
            self.live = False
            return False
        return True

    def outcome(self) -> str | None:
        """The cell's outcome line (waiting for it once the steps are over); None if the worker died."""
        while self.ended is None:
            try:
                line = self.channel.receive()
            except (OSError, ValueError):
                line = ""
            if not line:
                return None
            if line.startswith(f"{END} "):
                self.ended = line[len(END) + 1:]
        return self.ended

    def output(self) -> str:
        """The last lines of the worker's output."""
        try:
            lines = (self.workdir / "output.txt").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-OUTPUT_LINES:])

    def quit(self) -> None:
        """End the worker: ``quit``, then kill it if it has not ended in :data:`QUIT_WAIT` seconds."""
        try:
            self.channel.send(QUIT)
        except (BrokenPipeError, OSError, ValueError):
            pass
        self.channel.close()  # a worker still in a cell reads the end of its pipe, finishes and ends
        try:
            self.proc.wait(timeout=QUIT_WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def lockstep(a: Worker, b: Worker, pairs: int, warm: int = WARM_PAIRS,
             more: Callable[[Sequence[float], Sequence[float]], bool] | None = None, step: int | None = None,
             pin: Callable[[bool], None] | None = None) -> None:
    """Wait until both are ready, then ``warm`` untimed and ``pairs`` timed pairs of steps, the order
    within a pair alternating (A then B, B then A, ...), then batches of ``step`` (default ``pairs // 2``)
    more while ``more(a's times, b's times)`` says the pairs so far leave the verdict open. A side that
    ends early drops out and the other goes on alone. Both are told to stop at the end. ``pin(True)``
    runs once both are ready, before the first pair; ``pin(False)`` once both are told to stop."""
    for worker in (a, b):
        worker.ask("")  # its "ready", or the end of its output
    if pin is not None:
        pin(True)
    try:
        _take_turns(a, b, pairs, warm, more, step)
    finally:
        if pin is not None:
            pin(False)


def _take_turns(a: Worker, b: Worker, pairs: int, warm: int,
                more: Callable[[Sequence[float], Sequence[float]], bool] | None, step: int | None) -> None:
    i, due = 0, warm + pairs
    while True:
        while i < due:
            order = (a, b) if i % 2 == 0 else (b, a)
            live = [w for w in order if w.live]
            if not live:
                break
            for worker in live:
                worker.ask(WARM if i < warm else GO)
            i += 1
        if not (a.live and b.live and more is not None and more(a.times, b.times)):
            break
        due += step if step is not None else max(pairs // 2, 1)
    a.stop()
    b.stop()


@dataclass(frozen=True)
class SideResult:
    """What one side of a comparison gave for a cell."""

    record: CellResult | None
    """Its cell, when it was measured."""
    problem: str
    """Why there is no cell (empty when there is)."""


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(line.strip() for line in lines[:n])


class Serve:
    """A persistent lockstep worker's part: instead of running its collected items in order, it runs
    the one its parent names, one cell at a time, and answers with the cell's outcome."""

    def __init__(self, channel: Channel, ledger: Ledger) -> None:
        self.channel = channel
        self.ledger = ledger
        self.reports: list[PhaseReport] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(phase_report(report))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        from _pytest.runner import runtestprotocol

        items = {item.nodeid: item for item in session.items}
        self.channel.send(SERVING)
        while (line := self.channel.receive()).startswith(f"{RUN} "):
            item = items.get(line[len(RUN) + 1:])
            self.reports = []
            self.ledger.clear()
            if item is not None:  # a missing one answers with no report at all
                runtestprotocol(item, log=True, nextitem=None)
            self.channel.send(f"{END} {dump_outcome(ChildOutcome(tuple(self.reports), self.ledger.snapshot()))}")
        return True

    def pytest_unconfigure(self) -> None:
        self.channel.close()


def serve(config: pytest.Config, ledger: Ledger, channel: Channel) -> None:
    """In a lockstep worker: register its serving loop."""
    config.pluginmanager.register(Serve(channel, ledger), PLUGIN_NAME)


@dataclass(frozen=True)
class Compared:
    """Both sides of one cell measured in lockstep."""

    this: ChildRun
    """This tree's side (``outcome`` None: its worker died)."""
    other: SideResult
    """The other revision's side: its cell, or why there is none."""


class Pairing:
    """Persistent lockstep workers, cell after cell: one for this tree, one per other revision (each
    checked out into a temporary worktree), started when first needed and ended with :meth:`close`."""

    def __init__(self, settings: Settings, config: pytest.Config, toplevel: Path, timings_only: bool = False) -> None:
        self.settings = settings
        self.timings_only = timings_only
        """Whether the workers measure timings only (:data:`~pytest_trainperf.runners.children.TIMINGS_ONLY_ENV`):
        a confirmation, which takes only the timings of the pair; ``--trainperf-against`` judges every metric."""
        self.config = config
        self.toplevel = toplevel
        self.workdir: Path | None = None
        self._root_rel = _inside(config.rootpath, toplevel, "rootdir")
        self._ini_rel = _inside(config.inipath, toplevel, "ini file") if config.inipath is not None else None
        self._workers: dict[tuple[str, int], Worker] = {}
        """The live workers, by side (:data:`THIS` or a commit) and set (see :meth:`compare`)."""
        self._worktrees: dict[str, Path] = {}
        self._cpus: frozenset[int] | None | bool = False  # False: not decided yet
        self._session_cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()

    @property
    def cpus(self) -> frozenset[int] | None:
        """The CPUs every worker runs on (:func:`pair_cpus`; None: the session's own)."""
        if self._cpus is False:
            from pytest_trainperf.measure.timing import default_threads

            self._cpus = pair_cpus(self.settings.threads or default_threads())
        assert self._cpus is not True
        return self._cpus

    def compare(self, item: pytest.Function, sha: str, name: str,
                more: Callable[[Sequence[float], Sequence[float]], bool] | None = None, workers: int = 0) -> Compared:
        """Run ``item``'s cell at commit ``sha`` (named ``name`` in messages) and in this tree, in
        lockstep; the side of this tree and the other's. ``workers`` picks the set of workers: each set
        is a pair of processes of its own (started when first needed, then kept), so that a second
        comparison on another set draws the pair's own offset anew."""
        other, this = self._worker(item, sha, workers), self._worker(item, THIS, workers)
        for worker in (other, this):
            worker.begin(item.nodeid)
        lockstep(other, this, paired.first_look(self.settings.pairs), more=more, step=paired.SEQUENTIAL_STEP,
                 pin=lambda on: self._pin((other, this), on))
        ran = [self._ran(worker) for worker in (other, this)]
        return Compared(this=ran[1], other=self._other_side(item, ran[0], name))

    def _pin(self, workers: Sequence[Worker], on: bool) -> None:
        """Both workers onto :attr:`cpus` for the pairs (``on``), or back onto the session's CPUs, where
        they build the cell, count its work and warm up side by side, nothing of it timed."""
        if self.cpus is None:
            return
        for worker in workers:
            if worker.proc.poll() is None:
                pin_process(worker.proc.pid, self.cpus if on else self._session_cpus)

    def close(self) -> None:
        """End every worker and remove every worktree; never raises (it runs as a session ends)."""
        for worker in self._workers.values():
            worker.quit()
        self._workers.clear()
        for tree in self._worktrees.values():
            remove_worktree(self.toplevel, tree)
        self._worktrees.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _ran(self, worker: Worker) -> ChildRun:
        """What a worker gave for its cell; a dead worker is dropped (a new one serves the next cell)."""
        line = worker.outcome()
        outcome = None
        if line is not None:
            try:
                outcome = load_outcome(f"the lockstep outcome at {worker.side}", line)
            except ChildError:
                outcome = None
        code = 0
        if outcome is None:  # it died (or wrote nonsense): its exit status says how
            try:
                code = worker.proc.wait(timeout=QUIT_WAIT)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.proc.returncode
        ran = ChildRun(returncode=code, peak_rss=0.0, output=worker.output(), outcome=outcome)
        if outcome is None:
            self._workers = {k: w for k, w in self._workers.items() if w is not worker}
            worker.quit()  # its pipes closed now, not left to the garbage collector (a ResourceWarning)
        return ran

    def _worker(self, item: pytest.Function, side: str, workers: int = 0) -> Worker:
        """The worker of this tree (``side`` is :data:`THIS`) or of a commit in set ``workers``, started
        if need be."""
        worker = self._workers.get((side, workers))
        if worker is not None and worker.proc.poll() is None:
            return worker
        if worker is not None:  # it ended between cells: close its pipes before a new one starts
            worker.quit()
        if self.workdir is None:
            self.workdir = scratch.directory("lockstep")
            shim = self.workdir / "plugin"  # this pytest-trainperf, ahead of any copy in a tree under test
            shim.mkdir()
            (shim / "pytest_trainperf").symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
            (shim / LAUNCHER).write_text(LAUNCHER_SOURCE, encoding="utf-8")
        if side == THIS:
            tree = self.toplevel
        elif side not in self._worktrees:
            try:
                self._worktrees[side] = tree = add_worktree(self.toplevel, side)
            except GitError as exc:
                pytest.fail(f"trainperf: cannot check out {side[:SHORT_SHA]} to compare with: {exc}", pytrace=False)
        else:
            tree = self._worktrees[side]
        worker = self._workers[side, workers] = self._start(item, side, tree)
        worker.serving()
        return worker

    def _start(self, item: pytest.Function, side: str, tree: Path) -> Worker:
        assert self.workdir is not None
        root = tree / self._root_rel
        workdir = Path(tempfile.mkdtemp(prefix=f"worker-{len(self._workers)}-", dir=self.workdir))
        ini = tree / self._ini_rel if self._ini_rel is not None and (tree / self._ini_rel).is_file() else None
        files = sorted({str(Path(i.path).relative_to(self.config.rootpath)) for i in item.session.items
                        if FIXTURE_NAME in getattr(i, "fixturenames", ())
                        and Path(i.path).is_relative_to(self.config.rootpath)})
        files = [f for f in files if (root / f).is_file()] or [str(Path(item.path).relative_to(self.config.rootpath))]
        argv = command(files, root, workdir / "tmp", ini, self.config, self.settings,
                       launcher=self.workdir / "plugin" / LAUNCHER)  # not `-m`: that puts the tree (the cwd) first
        # no baseline file is read (a directory that does not exist) and none written; no re-timing
        argv += [f"--trainperf-baselines={workdir / 'no-baselines'}", "--trainperf-confirm=0", "--trainperf-rounds=1",
                 "--continue-on-collection-errors"]
        if self.cpus is not None and self.settings.threads is None:  # its own default would count its CPUs
            argv.append(f"--trainperf-threads={len(self.cpus)}")
        env = child_env(os.environ)
        paths = [str(p) for p in (self.workdir / "plugin", tree / "src", tree, root) if p.is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        env[LOCKSTEP_ENV] = f"{child_reads},{child_writes}"
        if self.timings_only:
            env[TIMINGS_ONLY_ENV] = "1"
        channel = Channel(os.fdopen(parent_reads, "r", encoding="ascii"),
                          os.fdopen(parent_writes, "w", encoding="ascii"))
        try:
            proc = start_child(argv, root, env, workdir, pass_fds=(child_reads, child_writes))  # pinned for pairs
        except BaseException:
            channel.close()
            raise
        finally:  # the child's ends are the child's: the parent sees the end of file when it exits
            os.close(child_reads)
            os.close(child_writes)
        return Worker(REF if side != THIS else THIS, proc, channel, workdir)

    @staticmethod
    def _other_side(item: pytest.Function, run: ChildRun, name: str) -> SideResult:
        """The other revision's cell, or why it has none (never fails the item)."""
        if run.outcome is None:
            _, detail = death(run.returncode)
            last = (run.output.strip().splitlines()[-1:] or [""])[0].strip()[:DETAIL_CHARS]
            return SideResult(None, f"its run at {name} {detail} (last output: {last})")
        if not run.outcome.reports:
            return SideResult(None, f"the test or its cell does not exist at {name}")
        try:
            record = child_record(item, run.outcome, run)
        except (pytest.fail.Exception, pytest.skip.Exception) as exc:
            kind = "was skipped" if isinstance(exc, pytest.skip.Exception) else "failed"
            return SideResult(None, f"it {kind} at {name}: {_first_lines(str(exc.msg or ''))}")
        if record is None:
            return SideResult(None, f"it measured nothing at {name}")
        return SideResult(record, "")


def _inside(path: Path, top: Path, what: str) -> Path:
    try:
        return path.resolve().relative_to(top)
    except ValueError:
        raise pytest.UsageError(f"trainperf: the {what} {path} is outside the git repository at {top}; expected it "
                                "inside, to find it at the other revision") from None


def undecided(settings: Settings, tolerance: float, earlier: tuple[Sequence[float], Sequence[float]] = ((), ())
              ) -> Callable[[Sequence[float], Sequence[float]], bool]:
    """The sequential rule (:mod:`pytest_trainperf.paired`): whether the step-time pairs so far leave it
    open if the cell regressed by as much as the comparison must catch (their interval, at
    :func:`paired.look_confidence`, reaches from ``1 + tolerance`` or below to above ``1 + tolerance +``
    :data:`paired.CATCH_MARGIN`); then the comparison goes on, up to :data:`paired.MAX_PAIRS_FACTOR`
    times ``--trainperf-pairs`` pairs and ``--trainperf-max-time`` seconds of timed pairs. ``earlier``:
    the step times (A's, B's) of an earlier comparison of the cell on other workers, pooled in front of
    these (:func:`paired.even`) for the rule; the budget counts this comparison's pairs alone."""
    started = time.perf_counter()
    confidence = paired.look_confidence(settings.pairs)
    head_a, head_b = (paired.even(times) for times in earlier)

    def more(a: Sequence[float], b: Sequence[float]) -> bool:
        if (len(a) != len(b) or len(head_a) != len(head_b) or len(a) >= paired.MAX_PAIRS_FACTOR * settings.pairs
                or time.perf_counter() - started > settings.max_time or min(*a, *b, 1.0) <= 0):
            return False
        return paired.undecided(paired.paired_change([*head_a, *a], [*head_b, *b], confidence), tolerance)

    return more


def step_tolerance(item: pytest.Item) -> float:
    """The step-time tolerance of a side-by-side comparison: ``tp.tolerance(step_time=)`` or the default."""
    from pytest_trainperf.grid import TOLERANCE_MARK

    mark = item.get_closest_marker(TOLERANCE_MARK)
    return float((mark.args[0] if mark is not None else {}).get("step_time", paired.PAIRED_TOLERANCE))


class Lockstep:
    """The runner of ``--trainperf-against``: each trainperf cell in lockstep with the same cell at REF."""

    def __init__(self, settings: Settings, config: pytest.Config, trees: Trees) -> None:
        self.settings = settings
        self.trees = trees
        self.pairing = Pairing(settings, config, trees.toplevel)

    @classmethod
    def start(cls, settings: Settings, config: pytest.Config) -> Lockstep:
        """The runner, once the other options allow it and REF exists; else a usage error saying why."""
        option = f"--trainperf-against={settings.against}"
        conflicts = [
            ("--trainperf-update-baselines", settings.update, "no baseline is written in a lockstep comparison"),
            ("--trainperf-isolate", settings.isolate, "each cell already runs in child processes"),
            ("pytest-xdist's -n", bool(getattr(config.option, "numprocesses", None))
             or bool(getattr(config.option, "dist", "no") not in ("no", None)),
             "the two trees take turns on one machine; parallel cells would time each other")]
        for other, given, why in conflicts:
            if given:
                raise pytest.UsageError(f"{option} cannot be combined with {other}: {why}; expected one or the other")
        if not hasattr(os, "wait4"):
            raise pytest.UsageError(f"{option}: expected a POSIX system (Linux, macOS) with os.wait4; "
                                    f"this one ({sys.platform}) has none")
        try:
            trees = resolve_trees(config.rootpath, str(settings.against))
        except GitError as exc:
            raise pytest.UsageError(f"{option}: {exc}") from None
        try:
            return cls(settings, config, trees)
        except pytest.UsageError as exc:
            raise pytest.UsageError(f"--trainperf-against: {str(exc).removeprefix('trainperf: ')}") from None

    @property
    def label(self) -> str:
        """What the cells are compared with, for the report (``main (1a2b3c4d5e6f), in lockstep; ...``)."""
        return self.trees.label

    def header(self) -> str | None:
        return f"trainperf: comparing against {self.trees.label}"

    def close(self) -> None:
        self.pairing.close()

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        ref = self.trees.ref
        compared = self.pairing.compare(item, self.trees.ref_sha, ref, undecided(self.settings, step_tolerance(item)))
        this = compared.this
        if this.outcome is None:
            _, detail = death(this.returncode)
            pytest.fail(f"trainperf: the lockstep run of {item.nodeid} in this tree {detail}.\n"
                        f"The last lines of its output:\n{this.output}", pytrace=False)
        record = child_record(item, this.outcome, this)  # fails or skips as the test did here
        if record is None:
            return None
        other = compared.other
        return CellRun(cell=fixture.cell, fingerprint=record.fingerprint, measurement=record.verdict.measurement,
                       reference=other.record.verdict.measurement if other.record is not None else None,
                       compared=ref, problem=other.problem,
                       revision=f"{ref} ({self.trees.ref_sha[:SHORT_SHA]})")
