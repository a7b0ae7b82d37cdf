"""``--trainperf-against=REF``: each cell measured side by side with the same cell at git revision REF.

A stored baseline drifts between processes on a shared runner by more than the slowdowns worth
catching; measuring the old and the new code at the same time does not: whatever the machine does, it
does to both. How:

* The **parent** (the session the user started; its runner is :class:`Lockstep`) resolves REF in the
  repository under test and checks it out, detached, into a temporary ``git worktree`` (at the first
  cell; removed again at the end of the session, on Ctrl-C and on failure too, then ``git worktree
  prune``). For each item that uses the ``trainperf`` fixture, the runner starts two children instead
  of calling the test: ``python -m pytest <node id>`` with the rootdir,
  ini file and ``sys.path`` of the REF worktree (A), and of this checkout (B): each imports the code
  under test from its own tree (the tree and its ``src/`` go first on ``PYTHONPATH``, ahead of an
  installed copy); both use this pytest-trainperf.
* Each **child** (marked by :data:`~pytest_trainperf.runners.children.LOCKSTEP_ENV`: the pipes to its
  parent; its in-process runner times steps with :func:`lockstep_timer`)
  builds the cell's workload, runs the instrumented steps (FLOPs, peak memory) and its warm-up as any
  cell does, says ``ready``, then times one step each time the parent says ``go`` and answers ``done``.
  At ``stop`` the test goes on as usual and the child writes its cell as an isolated child does
  (:class:`pytest_trainperf.runners.children.ChildReporter`).
* In between, the parent **takes turns**: :data:`WARM_PAIRS` untimed pairs, then ``--trainperf-pairs``
  timed ones, one step of A and one of B, the order flipping every pair (AB, BA, AB, ...), so that both
  steps of a pair see the same state of the machine and an order effect cancels.
* The verdict (:func:`pytest_trainperf.paired.judge_paired`): timings on the per-pair ratios (median
  and sign-test interval), exact metrics (FLOPs, peak memory, loss) value against value. It goes into
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

from pytest_trainperf import paired
from pytest_trainperf.records import CellResult
from pytest_trainperf.runners import CellRun
from pytest_trainperf.runners.children import (
    DETAIL_CHARS,
    LOCKSTEP_ENV,
    ChildError,
    ChildRun,
    child_env,
    child_record,
    command,
    death,
    start_child,
    wait_child,
)
from pytest_trainperf.settings import Settings

if TYPE_CHECKING:
    import torch

    from pytest_trainperf.fixture import TrainPerf
    from pytest_trainperf.measure.timing import Timed

WARM_PAIRS = 2
"""Untimed pairs of steps, in lockstep, before the timed ones: both children ran their warm-up at the
same time, each with the other one busy; these warm the caches to the turn-taking they are timed in."""
SHORT_SHA = 12
"""Hex digits of a commit shown in the report."""
READY, GO, WARM, STOP, DONE = "ready", "go", "warm", "stop", "done"
"""The words of the lockstep protocol, one per line."""
THIS, REF = "this tree", "REF"
"""The two sides of a comparison, as messages name them."""


class GitError(Exception):
    """A git command that failed: the command and git's own message."""


def git(args: Sequence[str], cwd: Path) -> str:
    """The output of ``git <args>`` in ``cwd``, stripped; raises :class:`GitError` with git's message."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise GitError(f"git could not be run ({exc}); expected git on PATH") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        raise GitError(f"`git {' '.join(args)}` failed: {message[0] if message else ''}")
    return done.stdout.strip()


@dataclass(frozen=True)
class Trees:
    """The two trees of a comparison."""

    toplevel: Path
    """The top of this checkout (``git rev-parse --show-toplevel``)."""
    ref: str
    """The revision as the user named it."""
    ref_sha: str
    """The commit it resolves to."""
    head_sha: str
    """The commit this checkout is at."""
    dirty: bool
    """Whether this checkout has uncommitted changes (untracked files not ignored count too)."""

    @property
    def label(self) -> str:
        """How the report names the comparison: ``main (1a2b3c4d5e6f), in lockstep; this tree: ...``."""
        here = self.head_sha[:SHORT_SHA] + (" + uncommitted changes" if self.dirty else "")
        return f"{self.ref} ({self.ref_sha[:SHORT_SHA]}), in lockstep; this tree: {here}"


def resolve_trees(rootpath: Path, ref: str) -> Trees:
    """Find the repository of ``rootpath`` and resolve ``ref`` in it; :class:`GitError` says what failed."""
    try:
        toplevel = Path(git(["rev-parse", "--show-toplevel"], rootpath))
    except GitError as exc:
        raise GitError(f"the rootdir {rootpath} is not in a git repository ({exc})") from None
    try:
        ref_sha = git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"], toplevel)
    except GitError:
        raise GitError(f"{ref!r} is no branch, tag or commit of the repository at {toplevel} "
                       "(`git rev-parse` cannot resolve it)") from None
    try:
        head_sha = git(["rev-parse", "--verify", "HEAD"], toplevel)
    except GitError:
        raise GitError(f"the repository at {toplevel} has no commit yet to compare from") from None
    dirty = bool(git(["status", "--porcelain", "--untracked-files=normal"], toplevel))
    return Trees(toplevel=toplevel.resolve(), ref=ref, ref_sha=ref_sha, head_sha=head_sha, dirty=dirty)


def add_worktree(toplevel: Path, sha: str) -> Path:
    """Check ``sha`` out, detached, into a new temporary directory; returns the worktree's path."""
    holder = Path(tempfile.mkdtemp(prefix="trainperf-against-"))
    tree = holder / "tree"
    try:
        git(["worktree", "add", "--detach", "--quiet", str(tree), sha], toplevel)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    return tree


def remove_worktree(toplevel: Path, tree: Path) -> None:
    """Remove a worktree made by :func:`add_worktree` and its directory; prune git's record of it.
    Never raises: this runs while a session ends, maybe after Ctrl-C."""
    for args in (["worktree", "remove", "--force", str(tree)], ["worktree", "prune"]):
        try:
            git(args, toplevel)
        except GitError:
            pass
    shutil.rmtree(tree.parent, ignore_errors=True)


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
    timed pairs) it times one step on its own, so that the cell still has a step time."""

    def timer(fn: Callable[[], Any], count: int, device: torch.device, keep: Callable[[Any], object] | None = None,
              warmup: int = 0, settle: bool = True, on_timed: Callable[[], None] | None = None) -> Timed:
        from pytest_trainperf.measure.timing import NS_PER_S, Timed, no_gc, synchronizer, warm_up

        sync = synchronizer(device)
        clock = time.perf_counter_ns
        samples: list[int] = []
        kept: list[object] = []
        warm = warmup

        def one() -> int:
            start = clock()
            result = fn()
            sync()
            elapsed = clock() - start
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


def lockstep(a: Worker, b: Worker, pairs: int, warm: int = WARM_PAIRS,
             more: Callable[[Sequence[float], Sequence[float]], bool] | None = None) -> None:
    """Wait until both are ready, then ``warm`` untimed and ``pairs`` timed pairs of steps, the order
    within a pair alternating (A then B, B then A, ...), then batches of ``pairs // 2`` more while
    ``more(a's times, b's times)`` says the pairs so far leave the verdict open. A side that ends early
    drops out and the other goes on alone. Both are told to stop at the end."""
    for worker in (a, b):
        worker.ask("")  # its "ready", or the end of its output
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
        due += max(pairs // 2, 1)
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


class Lockstep:
    """The runner of ``--trainperf-against``: each trainperf cell in a lockstep pair of children."""

    def __init__(self, settings: Settings, config: pytest.Config, trees: Trees) -> None:
        self.settings = settings
        self.config = config
        self.trees = trees
        self.worktree: Path | None = None
        self._root_rel = self._inside(config.rootpath, "rootdir")
        self._ini_rel = self._inside(config.inipath, "ini file") if config.inipath is not None else None

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
        return cls(settings, config, trees)

    def _inside(self, path: Path, what: str) -> Path:
        try:
            return path.resolve().relative_to(self.trees.toplevel)
        except ValueError:
            raise pytest.UsageError(f"--trainperf-against: the {what} {path} is outside the git repository at "
                                    f"{self.trees.toplevel}; expected it inside, to find it at the other "
                                    "revision") from None

    @property
    def label(self) -> str:
        """What the cells are compared with, for the report (``main (1a2b3c4d5e6f), in lockstep; ...``)."""
        return self.trees.label

    def header(self) -> str | None:
        return f"trainperf: comparing against {self.trees.label}"

    def close(self) -> None:
        if self.worktree is not None:
            remove_worktree(self.trees.toplevel, self.worktree)
            self.worktree = None

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        if self.worktree is None:
            try:
                self.worktree = add_worktree(self.trees.toplevel, self.trees.ref_sha)
            except GitError as exc:
                pytest.fail(f"trainperf: --trainperf-against={self.trees.ref}: cannot check it out: {exc}",
                            pytrace=False)
        ref_run, this_run = self._compare(item, self.worktree)
        if this_run.outcome is None:
            _, detail = death(this_run.returncode)
            pytest.fail(f"trainperf: the lockstep run of {item.nodeid} in this tree {detail}.\n"
                        f"The last lines of its output:\n{this_run.output}", pytrace=False)
        record = child_record(item, this_run.outcome, this_run)  # fails or skips as the test did here
        if record is None:
            return None
        other = self._ref_side(item, ref_run)
        reference = other.record.verdict.measurement if other.record is not None else None
        return CellRun(cell=fixture.cell, fingerprint=record.fingerprint, measurement=record.verdict.measurement,
                       reference=reference, compared=self.trees.ref, problem=other.problem,
                       revision=f"{self.trees.ref} ({self.trees.ref_sha[:SHORT_SHA]})")

    # ------------------------------------------------------------------ one cell

    def _start(self, item: pytest.Function, side: str, tree: Path) -> Worker:
        root = tree / self._root_rel
        workdir = Path(tempfile.mkdtemp(prefix="trainperf-lockstep-"))
        ini = tree / self._ini_rel if self._ini_rel is not None and (tree / self._ini_rel).is_file() else None
        argv = command(item.nodeid, root, workdir / "tmp", ini, self.config, self.settings)
        # no baseline file is read (a directory that does not exist) and none written; no re-timing
        argv += [f"--trainperf-baselines={workdir / 'no-baselines'}", "--trainperf-confirm=0", "--trainperf-rounds=1"]
        env = child_env(os.environ)
        paths = [str(p) for p in (tree / "src", tree, root) if p.is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        env[LOCKSTEP_ENV] = f"{child_reads},{child_writes}"
        channel = Channel(os.fdopen(parent_reads, "r", encoding="ascii"),
                          os.fdopen(parent_writes, "w", encoding="ascii"))
        try:
            proc = start_child(argv, root, env, workdir, pass_fds=(child_reads, child_writes))
        except BaseException:
            channel.close()
            raise
        finally:  # the child's ends are the child's: the parent sees the end of file when it exits
            os.close(child_reads)
            os.close(child_writes)
        return Worker(side, proc, channel, workdir)

    def _compare(self, item: pytest.Function, worktree: Path) -> tuple[ChildRun, ChildRun]:
        """Run the cell in both trees in lockstep; the runs of the REF side and of this side."""
        workers: list[Worker] = []
        try:
            workers.append(self._start(item, REF, worktree))
            workers.append(self._start(item, THIS, self.trees.toplevel))
            ref, this = workers
            lockstep(ref, this, self.settings.pairs, more=self._undecided(item))
            for worker in workers:
                worker.channel.close()
            runs = []
            for worker in workers:
                try:
                    runs.append(wait_child(worker.proc, worker.workdir))
                except ChildError as exc:
                    pytest.fail(f"trainperf: {item.nodeid}: the lockstep run at {worker.side}: {exc}", pytrace=False)
            return runs[0], runs[1]
        finally:
            for worker in workers:  # interrupted or failed: leave no child behind
                worker.kill()
                worker.channel.close()
                shutil.rmtree(worker.workdir, ignore_errors=True)

    def _undecided(self, item: pytest.Function) -> Callable[[Sequence[float], Sequence[float]], bool]:
        """Whether the step-time pairs so far leave it open if the cell regressed (their interval holds
        ``1 + tolerance``): then the comparison goes on, up to :data:`paired.MAX_PAIRS_FACTOR` times
        ``--trainperf-pairs`` pairs and ``--trainperf-max-time`` seconds of timed pairs."""
        from pytest_trainperf.grid import TOLERANCE_MARK

        settings = self.settings
        mark = item.get_closest_marker(TOLERANCE_MARK)
        tolerance = (mark.args[0] if mark is not None else {}).get("step_time", paired.PAIRED_TOLERANCE)
        started = time.perf_counter()

        def undecided(a: Sequence[float], b: Sequence[float]) -> bool:
            if (len(a) != len(b) or len(a) >= paired.MAX_PAIRS_FACTOR * settings.pairs
                    or time.perf_counter() - started > settings.max_time or min(*a, *b, 1.0) <= 0):
                return False
            return paired.undecided(paired.paired_change(a, b), tolerance)

        return undecided

    def _ref_side(self, item: pytest.Function, run: ChildRun) -> SideResult:
        """The REF side's cell, or why it has none (never fails the item)."""
        ref = self.trees.ref
        if run.outcome is None:
            _, detail = death(run.returncode)
            last = (run.output.strip().splitlines()[-1:] or [""])[0].strip()[:DETAIL_CHARS]
            return SideResult(None, f"its run at {ref} {detail} (last output: {last})")
        if not any(r.nodeid == item.nodeid and r.when == "call" for r in run.outcome.reports):
            if "not found" in run.output or "no match" in run.output or "ERROR: file or directory" in run.output:
                return SideResult(None, f"the test or its cell does not exist at {ref}")
        try:
            record = child_record(item, run.outcome, run)
        except (pytest.fail.Exception, pytest.skip.Exception) as exc:
            kind = "was skipped" if isinstance(exc, pytest.skip.Exception) else "failed"
            return SideResult(None, f"it {kind} at {ref}: {_first_lines(str(exc.msg or ''))}")
        if record is None:
            return SideResult(None, f"it measured nothing at {ref}")
        return SideResult(record, "")
