"""``--trainperf-isolate``: each trainperf cell runs in a fresh child process.

A cell that the kernel kills (the OOM killer sends SIGKILL) or that crashes the interpreter (a
segfault in an extension, an abort) takes only its own process down: the session reports the cell
as out of memory (:attr:`Outcome.OOM_KILLED`) or crashed (:attr:`Outcome.CRASHED`) and goes on.
Every isolated cell also reports ``peak_rss``, the peak resident set size of its process (bytes,
report-only unless a test gives it a tolerance).

How the work is split:

* The **parent** (the pytest session the user started) collects, sets up and tears down every test as
  usual, and reports it through pytest's own machinery. For an item that uses the ``trainperf``
  fixture, the session's ``pytest_pyfunc_call`` asks this runner (:class:`Isolated`) for the cell, and
  it runs the test function in a child, ``python -m pytest <node id>``, instead of calling it. The
  item then passes or fails as the child's run says, with the parent's own verdict against the
  baseline (re-judged here, so the grid correction spans all the cells of the session), or with the
  child's failure message.

  Why ``pytest_pyfunc_call`` and not a protocol of our own: the reports, ``-x``, xfail, JUnit and the
  terminal all stay pytest's. The price: the test's fixtures are set up in the parent too (the
  ``trainperf`` fixture itself is cheap there). Build the model and data inside the test function, as
  the examples do, so the parent never allocates the workload.

* The **child** (marked by :data:`CHILD_ENV`, the path it writes to; it is never isolated again)
  measures its one cell as a normal session would, confirmation re-measurements included, adds
  ``peak_rss`` (``getrusage``) to the cell's measurement, and at the end writes the reports of its
  test and its results (:mod:`pytest_trainperf.results`) to that file
  (:class:`~pytest_trainperf.runners.children.ChildReporter`).

* A child that leaves no result: exit by SIGKILL is out of memory (killed), any other signal or exit
  is a crash, with the last lines of its output in the failure. Its ``peak_rss`` comes from the
  kernel's accounting of the dead child (``os.wait4``), its environment fingerprint from the parent.

Updates: the child writes its cell's baseline itself, as a pytest-xdist worker does, under the lock
that :func:`store.update` holds, after its own noise rounds (``--trainperf-rounds``: the rounds of one
cell run back to back in its child, not interleaved with other cells); the parent takes in the cell
and the baseline changes. A killed cell's outcome is written by the parent (its child wrote nothing);
a crashed cell is never written. The options of the session reach the child on its command line,
built from the resolved :class:`Settings` (:func:`~pytest_trainperf.runners.children.command`), with
the same rootdir and ini file.
"""


from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING

import pytest

from pytest_trainperf import scratch
from pytest_trainperf.records import Measurement, Metric, Outcome
from pytest_trainperf.runners import CellRun
from pytest_trainperf.runners.children import (
    DETAIL_CHARS,
    ChildError,
    ChildRun,
    child_env,
    child_record,
    command,
    death,
    run_child,
)
from pytest_trainperf.settings import Settings
from pytest_trainperf.units import format_value

if TYPE_CHECKING:
    from pytest_trainperf.fixture import TrainPerf


class Isolated:
    """Runs each trainperf test function in a child process and returns the cell it measured."""

    def __init__(self, settings: Settings, config: pytest.Config) -> None:
        self.settings = settings
        self.config = config

    @classmethod
    def start(cls, settings: Settings, config: pytest.Config) -> Isolated:
        """The runner of ``--trainperf-isolate``; a usage error where children cannot be waited for."""
        if not hasattr(os, "wait4"):
            raise pytest.UsageError(f"--trainperf-isolate: expected a POSIX system (Linux, macOS) with os.wait4; "
                                    f"this one ({sys.platform}) has none")
        return cls(settings, config)

    def header(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        if fixture.timing_only:  # an update's noise rounds of an isolated cell ran in its child
            return None
        run = self._run(item)
        if run.outcome is None:
            return self._dead(item, fixture, run)
        record = child_record(item, run.outcome, run)
        if record is None:
            return None
        written = run.outcome.results if self.settings.update else None  # the child wrote the cell's baseline
        return CellRun(cell=fixture.cell, fingerprint=record.fingerprint, measurement=record.verdict.measurement,
                       written=written)

    def _run(self, item: pytest.Function) -> ChildRun:
        config = self.config
        workdir = scratch.directory("isolate")
        argv = command([item.nodeid], config.rootpath, workdir / "tmp", config.inipath, config, self.settings)
        try:
            return run_child(argv, config.rootpath, child_env(os.environ), workdir)
        except ChildError as exc:
            pytest.fail(f"trainperf: {item.nodeid}: the isolated run's {exc}", pytrace=False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _dead(self, item: pytest.Function, fixture: TrainPerf, run: ChildRun) -> CellRun:
        """The cell of a child that died: out of memory if killed by SIGKILL, else crashed."""
        outcome, detail = death(run.returncode)
        if not self.settings.enabled:
            pytest.fail(f"trainperf: isolated cell {item.nodeid} {detail}; its process's peak RSS was "
                        f"{format_value(run.peak_rss, 'B')}.\nThe last lines of its output:\n{run.output}",
                        pytrace=False)
        last = next((line.strip() for line in reversed(run.output.splitlines()) if line.strip()), "")
        if outcome is Outcome.CRASHED and last:
            detail += f"; last output: {last[:DETAIL_CHARS]}"
        cell = fixture.cell
        measurement = Measurement(test=cell.test, cell=cell.cell, params=cell.params,
                                  metrics=(Metric("peak_rss", run.peak_rss, "B"),), outcome=outcome, detail=detail)
        return CellRun(cell=cell, fingerprint=fixture.fingerprint(), measurement=measurement)
