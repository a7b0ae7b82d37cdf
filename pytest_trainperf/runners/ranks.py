"""Distributed cells (``tp.ranks``): each cell is a job of ranks, launched by torch's own launcher.

How the work is split:

* The **parent** (the session's own process, an xdist worker, or an isolated child's parent: any
  process that is not a rank) runs every cell that is not distributed through the runner the settings
  chose (:class:`Ranks` wraps it). For a distributed cell it calls
  ``torch.distributed.launcher.api.elastic_launch``, the engine under ``torchrun``, with one node of
  ``world_size`` processes and the c10d rendezvous on ``localhost:0``: the kernel gives its store a
  free port, so cells and pytest-xdist workers never share one. Each rank is
  ``python -c BOOT <directory> <node id> <the session's options>`` (:data:`BOOT`): pytest on that one
  test, measuring against no baseline. The launcher runs in a
  thread of the parent; the parent waits at most the cell's ``timeout``, then kills every rank's
  process group (a hung collective): the cell is :attr:`Outcome.TIMEOUT`. The ranks' output goes to
  files (the launcher's log directory); the parent reads each rank's outcome file, merges the ranks'
  measurements (:func:`merge`) and judges the cell against its baseline like any other.

* A **rank** (marked by :data:`~pytest_trainperf.runners.children.RANKS_ENV`) is killed by the kernel
  when its launcher thread ends (``PR_SET_PDEATHSIG``, :func:`enter`); its :class:`Rank` runner initialises the
  default process group (gloo on the CPU, NCCL on CUDA) around the test, whose ``trainperf`` fixture
  has the rank, the world size and the rank's device; its timed steps start on a barrier of all ranks
  (:func:`pytest_trainperf.fixture.ranks_in_step`). It writes its reports and results to
  ``rank-<RANK>.json`` in the cell's directory, as an isolated child does.

Failures: a rank that raises fails the cell with that rank's failure, named (``rank 1 of 2: ...``); a
rank that dies (a signal, an exit without a result) makes the cell ``crashed`` (or ``oom-killed`` by
SIGKILL), naming the rank; the launcher stops the other ranks. With ``tp.ranks(same_loss=...)`` the
parent compares every rank's loss curve with rank 0's (:func:`loss_disagreement`) and fails the cell at
the first step where one differs. A timing regression is confirmed by launching the ranks again
(``--trainperf-confirm``); distributed cells are not confirmed side by side, nor compared with
``--trainperf-against`` (skipped there, with the reason).

Several nodes (``--trainperf-nnodes``): every node runs the same session; each cell is one launch per
node at the shared ``--trainperf-rdzv-endpoint``, under a run id made of ``--trainperf-rdzv-id``, the
test id and the count of its launches, in a c10d store that the endpoint's node hosts for the session
(:func:`host_store`). After the test every rank gathers its measurement to rank 0
(:func:`_gather`), which leaves them in :data:`GATHERED`; the parent of rank 0 merges and judges, the
other nodes' parents skip the cell, saying where it is judged.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import pickle
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_trainperf import scratch
from pytest_trainperf.grid import RANKS_MARK, WORLD_SIZE_AXIS
from pytest_trainperf.records import (
    Breakdown,
    CellResult,
    DistributedSpec,
    Measurement,
    Metric,
    Outcome,
    RankInfo,
)
from pytest_trainperf.runners import CellRun, CellRunner
from pytest_trainperf.runners.children import (
    CHILD_ENV,
    DETAIL_CHARS,
    LOCKSTEP_ENV,
    OUTPUT_LINES,
    RANKS_ENV,
    STEP_SUMMARY_ENV,
    ChildError,
    ChildOutcome,
    ChildRun,
    child_record,
    command,
    death,
    die_with_parent,
    load_outcome,
)

if TYPE_CHECKING:
    from pytest_trainperf.fixture import TrainPerf
    from pytest_trainperf.runners.inprocess import InProcess
    from pytest_trainperf.settings import Settings

RENDEZVOUS = "localhost:0"
"""The c10d rendezvous endpoint of a single-node cell: port 0, so the kernel picks a free one."""
KILL_WAIT_S = 30.0
"""Seconds the parent keeps killing a timed-out cell's ranks (some may still be starting) before it
gives up waiting for the launcher."""
POLL_S = 0.2
"""Seconds between two rounds of killing a timed-out cell's ranks."""
PG_TIMEOUT_FACTOR = 2.0
"""The process group's timeout, in cell timeouts: a hung collective is ended by the cell's timeout
(the parent), before gloo or NCCL would raise in the ranks."""
MAX_PG_TIMEOUT_S = 30 * 86400.0
"""The longest process-group timeout asked for (a timedelta has bounds)."""
NOT_INHERITED = (CHILD_ENV, LOCKSTEP_ENV, "PYTEST_ADDOPTS", STEP_SUMMARY_ENV, "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")
"""Variables of the parent's environment a rank drops: it is neither an isolated child nor a worker,
its options are on its command line, and it writes no job summary."""
BOOT = ("import os, sys; "
        f"[os.environ.pop(name, None) for name in {NOT_INHERITED!r}]; "
        f"os.environ[{RANKS_ENV!r}] = sys.argv.pop(1); "
        "import runpy; runpy.run_module('pytest', run_name='__main__', alter_sys=True)")
"""What a rank runs (``python -c BOOT <cell directory> <pytest arguments>``): pytest's ``__main__``, as
``python -m pytest`` runs it (nothing of the plugin imported before pytest loads it; not
``pytest.console_main``, deprecated since pytest 9.1: its warning would be a rank's last output line), in an environment
without the variables of :data:`NOT_INHERITED`, marked as a rank by
:data:`~pytest_trainperf.runners.children.RANKS_ENV`."""
NOT_LOADED = ("hypothesispytest",)
"""Plugins a rank does without: hypothesis's takes seconds to import, in every rank of every cell, and a
rank runs one test that does not need its reporting."""
AGREE = ("flops", "comm_calls", "comm_bytes")
"""Per-rank metrics the ranks of a symmetric job agree on; a note says when they do not (rank 0's
is the cell's)."""


def spec_of(item: pytest.Item) -> DistributedSpec | None:
    """The ``tp.ranks`` of a test item, or None."""
    mark = item.get_closest_marker(RANKS_MARK)
    return mark.args[0] if mark is not None else None


def world_size_of(item: pytest.Item, spec: DistributedSpec) -> int:
    """The ranks of a distributed item: the marker's, or its cell's value of the ``world_size`` axis."""
    if spec.world_size is not None:
        return spec.world_size
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get(WORLD_SIZE_AXIS) if callspec is not None else None
    assert isinstance(value, int), "checked at collection (grid.check_ranks)"
    return value


def rank_from_env() -> RankInfo | None:
    """In a rank of a distributed cell: where it stands (the launcher's ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK``); None in any other process."""
    if not os.environ.get(RANKS_ENV):
        return None
    return RankInfo(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------- merging the ranks


def merge(ranks: Sequence[Measurement]) -> Measurement:
    """The cell's measurement from its ranks' (in rank order): what the job sees.

    * ``step_time``: per step, the slowest rank's time; ``throughput``: the items of all ranks per
      step over that time;
    * ``straggler`` (seconds, reported): the median over steps of the slowest rank's time minus the
      fastest's;
    * ``peak_memory``, ``reserved_memory``, ``peak_rss``: the largest rank's, gated; every rank's
      ``peak_memory`` is stored in its breakdown (``rank 0``, ``rank 1``, ...);
    * anything else (``flops``, ``loss``, the work and communication counts, recorded metrics): rank
      0's, with a note when the ranks disagree on ``flops`` or the communication.

    A rank that did not measure (out of memory) gives the cell its outcome, named in the detail.
    """
    first = ranks[0]
    for r, m in enumerate(ranks):
        if m.outcome is not Outcome.MEASURED:
            return replace(m, detail=f"rank {r} of {len(ranks)}: {m.detail}")
    if len(ranks) == 1:
        return first
    metrics: list[Metric] = []
    per_step = _per_step(ranks)
    slowest = tuple(max(step) for step in per_step)
    items = [m.items_per_step for m in ranks]
    job_items = sum(i for i in items if i is not None) if all(i is not None for i in items) else None
    for metric in first.metrics:
        mine = [m.metric(metric.name) for m in ranks]
        if metric.name == "step_time" and slowest:
            metrics.append(replace(metric, value=statistics.median(slowest), samples=slowest))
            metrics.append(Metric("straggler", statistics.median(max(s) - min(s) for s in per_step), "s"))
        elif metric.name == "throughput" and slowest and job_items is not None:
            rates = tuple(float(f"{job_items / s:.9g}") for s in slowest)
            metrics.append(replace(metric, value=statistics.median(rates), samples=rates))
        elif metric.name in ("peak_memory", "reserved_memory", "peak_rss"):
            metrics.append(replace(metric, value=max(m.value for m in mine if m is not None)))
        else:
            metrics.append(metric)
    breakdowns = first.breakdowns
    peaks = [m.metric("peak_memory") for m in ranks]
    if all(p is not None for p in peaks):
        breakdowns = (*(b for b in breakdowns if b.metric != "peak_memory"),
                      Breakdown("peak_memory", tuple((f"rank {r}", p.value) for r, p in enumerate(peaks) if p), "B",
                                "ranks whose peak memory grew"))
    notes = list(first.notes)
    for name in AGREE:
        values = [m.metric(name) for m in ranks]
        shown = [f"{v.value:g}" if v is not None else "none" for v in values]
        if len(set(shown)) > 1:
            notes.append(f"the ranks' {name} differ ({', '.join(f'rank {r}: {v}' for r, v in enumerate(shown))}); "
                         "rank 0's is the cell's")
    return replace(first, metrics=tuple(metrics), breakdowns=breakdowns, notes=tuple(notes),
                   items_per_step=job_items)


def loss_disagreement(curves: Sequence[Sequence[float]], rtol: float, call: str = "trainperf.train") -> str:
    """Where the ranks' losses (``curves[r]``: rank ``r``'s loss curve) first stop agreeing with rank
    0's within the relative tolerance ``rtol``: the first step, the first rank that differs, both
    values; empty when they agree at every step every rank took. Steps are numbered as in the loss
    curve (0: the counting step, 1: the memory step, then the warm-up and the timed steps), as in the
    fixture's ``loss diverged`` message."""
    if len(curves) < 2:
        return ""
    lengths = {len(c) for c in curves}
    for step in range(max(lengths)):
        if any(step >= len(c) for c in curves):
            break
        ours = curves[0][step]
        for r, curve in enumerate(curves[1:], start=1):
            theirs = curve[step]
            if not math.isclose(ours, theirs, rel_tol=rtol, abs_tol=0.0):
                return (f"the ranks' losses disagree at {call} step {step}: rank 0 returned {ours!r}, rank {r} "
                        f"returned {theirs!r} (expected equal within a relative {rtol:g}: tp.ranks(same_loss=...))")
    if len(lengths) > 1:
        shown = ", ".join(f"rank {r}: {len(c)}" for r, c in enumerate(curves))
        return f"the ranks returned losses for different numbers of {call} steps ({shown})"
    return ""


def _per_step(ranks: Sequence[Measurement]) -> list[tuple[float, ...]]:
    """Each timed step's time on every rank (the steps every rank timed)."""
    samples = [m.metric("step_time") for m in ranks]
    if any(s is None or not s.samples for s in samples):
        return []
    return list(zip(*(s.samples for s in samples if s is not None), strict=False))


# --------------------------------------------------------------------------- the parent


@dataclass(frozen=True)
class Launched:
    """How a distributed cell's launch ended."""

    timed_out: bool
    """The ranks ran past the cell's timeout and were killed."""
    exitcodes: dict[int, int]
    """The exit status of each rank that failed (minus the signal's number for a signal), by rank."""
    error: str
    """Why the launcher itself failed (not a rank), or empty."""
    seconds: float
    """Wall time of the launch, start to end."""


class Ranks:
    """The parent's runner: launches the ranks of each distributed cell; hands any other cell to ``inner``."""

    def __init__(self, inner: CellRunner, settings: Settings, config: pytest.Config) -> None:
        self.inner = inner
        self.settings = settings
        self.config = config
        self.label = getattr(inner, "label", "")
        self.launches: dict[str, int] = {}
        """Launches so far by test id: a multi-node cell's run id counts them (every node makes the same)."""
        self.store: object | None = None
        """Multi-node, on the node the endpoint names: the c10d store of every cell's rendezvous, kept
        for the session (:func:`host_store`)."""
        self.hosting = False
        """Whether this node has looked into hosting the store (at its first multi-node launch)."""

    def _launch(self, item: pytest.Function, spec: DistributedSpec, world: int, workdir: Path) -> Launched:
        """The cell's ranks launched, on this node and (``--trainperf-nnodes``) the others."""
        nodes = self.settings.nnodes
        if nodes == 1:
            return launch(self._argv(item, world, workdir), world, workdir, spec.timeout)
        count = self.launches[item.nodeid] = self.launches.get(item.nodeid, 0) + 1
        assert self.settings.rdzv_endpoint is not None and self.settings.rdzv_id is not None, "checked at configure"
        if not self.hosting:  # the first multi-node launch of the session: host the store, if it is ours
            self.store, self.hosting = host_store(self.settings.rdzv_endpoint, spec.timeout), True
        run_id = f"{self.settings.rdzv_id}-{hashlib.sha1(item.nodeid.encode()).hexdigest()[:12]}-{count}"
        return launch(self._argv(item, world, workdir), world // nodes, workdir, spec.timeout, nodes=nodes,
                      endpoint=self.settings.rdzv_endpoint, run_id=run_id)

    def header(self) -> str | None:
        return self.inner.header()

    def close(self) -> None:
        self.store = None  # the session's rendezvous store, if this node hosted it, closed
        self.inner.close()

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        spec = spec_of(item)
        if spec is None:
            return self.inner.run(item, fixture)
        if self.settings.against is not None:
            pytest.skip(f"trainperf: {item.nodeid}: a distributed cell (tp.ranks) is not compared with "
                        f"--trainperf-against={self.settings.against}: its ranks cannot take turns step by step "
                        "with another revision's; compare it against a stored baseline instead")
        world = world_size_of(item, spec)
        nodes = self.settings.nnodes
        if world % nodes:
            pytest.fail(f"trainperf: distributed cell {item.nodeid}: world_size={world} over --trainperf-nnodes="
                        f"{nodes}: expected a world size divisible by the nodes (the same ranks on each node)",
                        pytrace=False)
        workdir = scratch.directory("ranks")
        try:
            return self._run(item, fixture, spec, world, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run(self, item: pytest.Function, fixture: TrainPerf, spec: DistributedSpec, world: int,
             workdir: Path) -> CellRun | None:
        launched = self._launch(item, spec, world, workdir)
        per_node = world // self.settings.nnodes
        where = f"trainperf: distributed cell {item.nodeid} ({world} rank{'s' * (world != 1)})"
        if launched.timed_out:
            detail = (f"timed out after {spec.timeout:g} s (tp.ranks(timeout=...)): a hung collective or a "
                      f"rank that never finished; its {world} ranks were killed")
            return self._died(item, fixture, where, Outcome.TIMEOUT, detail, workdir, world)
        if launched.error:
            pytest.fail(f"{where}: the launcher failed: {launched.error}", pytrace=False)
        here = _here(workdir, world, self.settings.nnodes, launched.exitcodes)  # this node's ranks
        outcomes = {r: _outcome(workdir, r) for r in here}
        oom = next(((r, c) for r in here if (c := _record(outcomes[r], item.nodeid)) is not None
                    and c.verdict.measurement.outcome.out_of_memory), None)
        if oom is not None:  # the others then failed in their collectives: the cell is out of memory
            rank, short = oom
            measured = short.verdict.measurement
            return CellRun(cell=fixture.cell, fingerprint=short.fingerprint, side_by_side=False,
                           measurement=replace(measured, detail=f"rank {rank} of {world}: {measured.detail}"))
        culprit = _culprit(outcomes, launched.exitcodes, workdir)
        if culprit is not None and outcomes[culprit] is None:  # died without a result
            outcome, detail = death(launched.exitcodes.get(culprit, 0))
            lines = _output(workdir, culprit, per_node).splitlines()
            last = next((line.strip() for line in reversed(lines) if line.strip()), "")
            if outcome is Outcome.CRASHED and last:
                detail += f"; last output: {last[:DETAIL_CHARS]}"
            return self._died(item, fixture, where, outcome, f"rank {culprit} of {world} {detail}", workdir, world,
                              culprit)
        by_rank: dict[int, CellResult] = {}
        first = [culprit] if culprit is not None else []  # the failing rank's failure is the cell's
        for r in first + [r for r in here if r != culprit]:
            done = outcomes[r]
            assert done is not None
            run = ChildRun(returncode=launched.exitcodes.get(r, 0), peak_rss=0.0, output=_output(workdir, r, per_node),
                           outcome=done)
            failure = ""
            try:
                record = child_record(item, done, run)
            except pytest.fail.Exception as exc:
                failure = str(exc.msg or "").replace("(in the isolated run of", f"(in rank {r}'s run of")
            if failure:  # outside the handler: one message, not a chained traceback
                pytest.fail(f"trainperf: rank {r} of {world} failed:\n{failure}", pytrace=False)
            if record is None:  # a plain run, or a test that measured nothing
                return None
            by_rank[r] = record
        nodes = self.settings.nnodes
        if 0 not in here:  # another node holds rank 0: that node judges the cell (gathered there)
            pytest.skip(f"trainperf: {item.nodeid}: ranks {here[0]}-{here[-1]} of {world} ran here; the cell is "
                        f"judged, stored and reported on the node of rank 0 (--trainperf-nnodes={nodes})")
        every = [by_rank[r].verdict.measurement if r in by_rank else _gathered(workdir, r, world)
                 for r in range(world)]
        if spec.same_loss is not None and all(m.outcome is Outcome.MEASURED for m in every):
            disagreement = loss_disagreement([m.loss_curve for m in every], spec.same_loss,
                                             f"trainperf.{every[0].kind}")
            if disagreement:
                pytest.fail(f"{where}: {disagreement}", pytrace=False)
        merged = merge(every)

        def retime() -> Measurement | None:  # a timing regression's confirmation: the ranks launched again
            return self._again(item, spec, world)

        return CellRun(cell=fixture.cell, fingerprint=by_rank[0].fingerprint, measurement=merged,
                       timing_only=fixture.timing_only, side_by_side=False, deadline=fixture.deadline,
                       # multi-node: no re-launch (only this node judges: the others would not join it)
                       retime=retime if self.settings.nnodes == 1 else None)

    def _again(self, item: pytest.Function, spec: DistributedSpec, world: int) -> Measurement | None:
        """The cell measured once more by a fresh job of ranks; None when it did not measure."""
        workdir = scratch.directory("ranks")
        try:
            launched = self._launch(item, spec, world, workdir)
            records = [_record(_outcome(workdir, r), item.nodeid) for r in range(world)]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if launched.timed_out or launched.error or any(r is None for r in records):
            return None
        measured = [r.verdict.measurement for r in records if r is not None]
        if any(m.outcome is not Outcome.MEASURED for m in measured):
            return None
        return merge(measured)

    def _argv(self, item: pytest.Function, world: int, workdir: Path) -> list[str]:
        """A rank's arguments after ``python``: this module, the cell's directory, pytest's arguments.
        The ranks measure against no baseline (the parent judges the merged cell) and share the
        machine's cores (``--trainperf-threads``, unless the session gives it)."""
        config = self.config
        settings = replace(self.settings, update=False, rounds=1, confirm=0, baselines=workdir / "no-baselines",
                           threads=self._threads(world // self.settings.nnodes))
        argv = command([item.nodeid], config.rootpath, workdir / "tmp", config.inipath, config, settings)
        skipped = [arg for name in NOT_LOADED if config.pluginmanager.has_plugin(name) for arg in ("-p", f"no:{name}")]
        return ["-c", BOOT, str(workdir), *argv[3:], *skipped]  # argv: python -m pytest ...

    def _died(self, item: pytest.Function, fixture: TrainPerf, where: str, outcome: Outcome, detail: str,
              workdir: Path, world: int, rank: int | None = None) -> CellRun:
        """The cell of ranks that ended without a result: timed out, crashed or killed."""
        per_node = world // self.settings.nnodes
        if not self.settings.enabled:
            shown = _here(workdir, world, self.settings.nnodes, {}) if rank is None else [rank]
            tails = "\n".join(f"rank {r}'s output ended:\n{_output(workdir, r, per_node)}" for r in shown)
            pytest.fail(f"{where} {outcome.value}: {detail}\n{tails}", pytrace=False)
        cell = fixture.cell
        measurement = Measurement(test=cell.test, cell=cell.cell, params=cell.params, metrics=(), outcome=outcome,
                                  detail=detail)
        fingerprint = replace(fixture.fingerprint(), threads=self._threads(per_node))  # as the ranks' would say
        return CellRun(cell=cell, fingerprint=fingerprint, measurement=measurement, side_by_side=False)

    def _threads(self, world: int) -> int:
        """The threads of each rank: the session's ``--trainperf-threads``, or the machine's shared out."""
        from pytest_trainperf.measure.timing import default_threads

        return self.settings.threads or max(1, default_threads() // world)


def _record(done: ChildOutcome | None, nodeid: str) -> CellResult | None:
    if done is None:
        return None
    return next((c for c in done.results.cells if c.nodeid == nodeid), None)


def launch(args: Sequence[str], world: int, workdir: Path, timeout: float, *, nodes: int = 1,
           endpoint: str = RENDEZVOUS, run_id: str | None = None) -> Launched:
    """Launch ``world`` ranks of ``python <args>`` on this node with torch's elastic launcher (no
    restarts, output to files in ``workdir``); kill them all after ``timeout`` seconds, or when the
    wait is interrupted. One node: the c10d rendezvous on a free port of localhost under a fresh run
    id; ``nodes`` > 1: the c10d rendezvous at ``endpoint`` under ``run_id``, which the other nodes'
    launches of the cell share (``world`` ranks on each)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rdzv: dict[str, object] = {"join_timeout": max(1, math.ceil(timeout))}  # how long nodes wait for each other
    if nodes > 1:  # the store is the session's (host_store): no launch hosts it, so none takes it away
        rdzv.update(is_host=False, read_timeout=max(60, math.ceil(timeout)))
    config = LaunchConfig(min_nodes=nodes, max_nodes=nodes, nproc_per_node=world, run_id=run_id or uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=0, monitor_interval=0.05,
                          rdzv_configs=rdzv,
                          logs_specs=DefaultLogsSpecs(log_dir=str(workdir / "logs"), redirects=Std.ALL))
    exitcodes: dict[int, int] = {}
    errors: list[str] = []

    def run() -> None:  # in a thread: the launcher installs no signal handler there, and the wait can time out
        with warnings.catch_warnings():  # the launcher leaves its ranks' log files to the garbage collector
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                elastic_launch(config, sys.executable)(*args)
            except ChildFailedError as exc:
                exitcodes.update({rank: failure.exitcode for rank, failure in exc.failures.items()})
            except Exception as exc:  # the launcher's own failure (rendezvous): reported, never raised in a thread
                errors.append(f"{type(exc).__name__}: {exc}")
            gc.collect()

    quiet = _Quiet()
    loggers = _launcher_loggers()
    for logger in loggers:  # the cell's outcome says what failed: the launcher's log lines would repeat it
        logger.addFilter(quiet)
    started = time.perf_counter()
    thread = threading.Thread(target=run, name="trainperf-ranks", daemon=True)
    thread.start()
    timed_out = False
    try:
        thread.join(timeout)
        timed_out = thread.is_alive()
    finally:
        if thread.is_alive():  # timed out, or interrupted (Ctrl-C): no rank outlives its cell
            give_up = time.perf_counter() + KILL_WAIT_S
            while thread.is_alive() and time.perf_counter() < give_up:
                kill_ranks(workdir)
                thread.join(POLL_S)
        for logger in loggers:
            logger.removeFilter(quiet)
        with warnings.catch_warnings():  # and a failed rank's, which its exception held: closed here, quietly
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    return Launched(timed_out=timed_out, exitcodes=exitcodes, error="; ".join(errors),
                    seconds=time.perf_counter() - started)


LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torchelastic-events")
"""The prefixes of the loggers of torch's launcher, its agent and its events."""
LAUNCHER_MODULES = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
                    "torch.distributed.elastic.agent.server.local_elastic_agent", "torch.distributed.launcher.api",
                    "torchelastic-events-null")
"""Loggers that log while a cell launches, made before it so that they are quieted too."""


class _Quiet(logging.Filter):
    """Keeps the launcher's errors only: its progress (rendezvous, workers started, SIGTERM sent) is noise in
    a test's report, and so is its warning that in a thread it cannot stop its workers on a signal (the
    parent kills them itself, :func:`kill_ranks`, and the kernel when the parent dies)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _launcher_loggers() -> list[logging.Logger]:
    names = set(LAUNCHER_MODULES) | {n for n in logging.Logger.manager.loggerDict if n.startswith(LAUNCHER_LOGGERS)}
    return [logging.getLogger(n) for n in sorted(names)]


def kill_ranks(workdir: Path) -> None:
    """SIGKILL the process group of every rank of the cell whose directory is ``workdir`` (the launcher
    starts each rank, a child of this process, in a session of its own: its group holds what it
    started, data loader workers included)."""
    import psutil  # type: ignore[import-untyped]

    for child in psutil.Process().children():
        try:
            if str(workdir) in child.cmdline():
                os.killpg(child.pid, signal.SIGKILL)
        except (psutil.Error, OSError):  # gone already
            continue


def host_store(endpoint: str, timeout: float) -> object | None:
    """On the node that ``endpoint`` (``host:port``) names, the c10d store the cells' rendezvous meet
    in, for the whole session (None on the other nodes, or when another session on this machine hosts
    it already: two "nodes" on one machine). A launch that hosted it would take it down when its cell
    ends, under another node's next rendezvous; each launch is a client instead (``is_host=False``),
    and each cell's keys are its own (its run id)."""
    from datetime import timedelta

    from torch.distributed import TCPStore  # type: ignore[attr-defined]  # public, re-exported from C++
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname, parse_rendezvous_endpoint

    host, port = parse_rendezvous_endpoint(endpoint, default_port=29400)
    if not _matches_machine_hostname(host):
        return None
    try:
        return TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                        timeout=timedelta(seconds=max(60.0, timeout)))
    except RuntimeError:  # the port is taken: another session on this machine hosts the store
        return None


GATHERED = "gathered.pickle"
"""The file in which rank 0 of a multi-node cell leaves every rank's measurement (gathered over the
process group after the test) for its node's parent."""


def _here(workdir: Path, world: int, nodes: int, exitcodes: dict[int, int]) -> list[int]:
    """The global ranks that ran on this node: all of them on one node; with several, those that wrote
    an outcome here or failed here (each node runs ``world / nodes`` consecutive ranks)."""
    if nodes == 1:
        return list(range(world))
    seen = {int(p.stem.split("-")[1]) for p in workdir.glob("rank-*.json")} | set(exitcodes)
    per_node = world // nodes
    blocks = sorted({r // per_node for r in seen})
    return [b * per_node + i for b in blocks for i in range(per_node)] if blocks else []


def _gathered(workdir: Path, rank: int, world: int) -> Measurement:
    """Rank ``rank``'s measurement, run on another node and gathered by rank 0 (:class:`Rank`)."""
    path = workdir / GATHERED
    found = pickle.loads(path.read_bytes()) if path.exists() else None  # noqa: S301  # written by this cell's rank 0
    measurement = found[rank] if isinstance(found, list) and len(found) == world else None
    if not isinstance(measurement, Measurement):
        pytest.fail(f"trainperf: rank {rank} of {world} ran on another node and its measurement did not reach "
                    f"rank 0 (expected it gathered in {path.name}, got {type(measurement).__name__})", pytrace=False)
    return measurement


def _outcome(workdir: Path, rank: int) -> ChildOutcome | None:
    path = workdir / f"rank-{rank}.json"
    if not path.exists():
        return None
    try:
        return load_outcome(f"outcome of rank {rank} ({path.name})", path.read_text(encoding="utf-8", errors="replace"))
    except ChildError:
        return None


def _failed(done: ChildOutcome | None) -> bool:
    return done is not None and any(r.outcome == "failed" for r in done.reports)


def _culprit(outcomes: dict[int, ChildOutcome | None], exitcodes: dict[int, int], workdir: Path) -> int | None:
    """The rank that made the cell fail, or None when every rank passed: a rank that died without a
    result by a signal other than the launcher's SIGTERM or by its own exit comes first (the others then
    fail in their collectives), then the rank whose test failed first (its outcome file was written
    first), then a rank the launcher stopped."""
    dead = [r for r, done in outcomes.items() if done is None]
    own = [r for r in dead if exitcodes.get(r) != -signal.SIGTERM]
    if own:
        return own[0]
    failed = [r for r, done in outcomes.items() if _failed(done)]
    if failed:
        return min(failed, key=lambda r: ((workdir / f"rank-{r}.json").stat().st_mtime_ns, r))
    return dead[0] if dead else None


def _output(workdir: Path, rank: int, per_node: int = 0) -> str:
    """The last lines of a rank's output (stdout, then stderr, as the launcher wrote them)."""
    lines: list[str] = []
    local = rank % per_node if per_node else rank  # the launcher's log directories are by local rank
    for name in ("stdout.log", "stderr.log"):
        for path in sorted((workdir / "logs").rglob(f"attempt_*/{local}/{name}")):
            lines += path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(lines[-OUTPUT_LINES:])


# --------------------------------------------------------------------------- a rank


class Rank:
    """A rank's runner: the test runs here, in the default process group of its job."""

    def __init__(self, inner: InProcess) -> None:
        self.inner = inner

    def header(self) -> str | None:
        return None

    def close(self) -> None:
        self.inner.close()

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        spec = spec_of(item)
        if spec is None:
            return self.inner.run(item, fixture)
        from datetime import timedelta

        import torch.distributed as dist

        device = fixture.device
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=min(spec.timeout * PG_TIMEOUT_FACTOR, MAX_PG_TIMEOUT_S))
        if backend == "nccl":
            dist.init_process_group(backend, timeout=timeout, device_id=device)
        else:
            dist.init_process_group(backend, timeout=timeout)
        try:
            run = self.inner.run(item, fixture)
            if dist.get_world_size() != int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())):
                _gather(run.measurement if run is not None else None)
            return run
        finally:
            fixture.release()  # the test's model (a DDP one holds the group) is freed before the group
            dist.destroy_process_group()


def _gather(measurement: Measurement | None) -> None:
    """In a rank of a multi-node cell, after its test: every rank's measurement to rank 0, which leaves
    them in :data:`GATHERED` for its node's parent (the parent of rank 0 judges the cell)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    found: list[object] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(measurement, found, dst=0)
    if found is not None:
        directory = Path(os.environ[RANKS_ENV])
        (directory / f"{GATHERED}.tmp").write_bytes(pickle.dumps(found))
        (directory / f"{GATHERED}.tmp").replace(directory / GATHERED)


def enter() -> None:
    """In a rank, at configure: die with the launcher's thread in the parent (``PR_SET_PDEATHSIG``: a
    session killed by SIGKILL leaves no rank behind)."""
    arm = die_with_parent(os.getppid())
    if arm is not None:
        arm()
