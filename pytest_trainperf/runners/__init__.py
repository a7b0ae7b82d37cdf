"""How a cell's measurement is obtained: one module per way, behind the :class:`CellRunner` protocol.

* :mod:`~pytest_trainperf.runners.inprocess`: the test runs in this process (the default, and what
  every child process below runs inside itself);
* :mod:`~pytest_trainperf.runners.isolated`: in a fresh child process per cell (``--trainperf-isolate``);
* :mod:`~pytest_trainperf.runners.lockstep`: in two child processes, this tree and a git revision,
  taking turns step by step (``--trainperf-against``);
* :mod:`~pytest_trainperf.runners.ranks`: a distributed cell (``tp.ranks``) as a job of ranks,
  launched by torch's elastic launcher; it wraps the runner of the other cells.

The session picks one runner from the settings (:func:`choose`), asks it for each cell's
:class:`CellRun`, and hands that to the judge, the store and the report. A runner returns records: it
never imports the plugin and never touches the session's state. A new way to run a cell is a new module
here and a line in :func:`choose`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pytest_trainperf.judge import Retimed
from pytest_trainperf.records import Cell, Fingerprint, Measurement
from pytest_trainperf.results import Ledger, SessionResults

if TYPE_CHECKING:
    import pytest

    from pytest_trainperf.fixture import TrainPerf
    from pytest_trainperf.settings import Settings


@dataclass(frozen=True)
class CellRun:
    """What a runner obtained for one cell."""

    cell: Cell
    """Which cell."""
    fingerprint: Fingerprint
    """Where it was measured."""
    measurement: Measurement
    """What was measured (for a side-by-side pair: this tree's side, its timings per pair)."""
    reference: Measurement | None = None
    """Side by side: the same cell measured at the other revision; None: judged against the stored
    baseline, or (with :attr:`compared` set) nothing could be measured there."""
    compared: str = ""
    """Side by side: the other revision as the user named it (``main``); empty: the stored baseline."""
    revision: str = ""
    """Side by side: the other revision with its commit, ``main (1a2b3c4d5e6f)``."""
    problem: str = ""
    """Side by side without a reference: why there is none."""
    written: SessionResults | None = None
    """The cell was judged and its baseline written where it ran (an isolated child's update): what
    that process concluded, to be taken in as it is."""
    retime: Callable[[], Measurement | None] | None = None
    """Run the cell again for its timings (a distributed cell's ranks launched again) to confirm a timing
    regression; None when it cannot be run again here. Never a call of a step after its test returned:
    what the step used may be gone."""
    confirmed: Retimed | None = None
    """How the timings were confirmed inside the test, before it returned (an in-process cell); None: not
    there."""
    deadline: float = math.inf
    """The ``time.perf_counter()`` past which the cell may not be re-timed (``--trainperf-max-time``)."""
    elapsed: float | None = None
    """Seconds the cell's measurement took in this process (None: measured elsewhere)."""
    notes: tuple[str, ...] = ()
    """One-line notes for the session summary."""
    timing_only: bool = False
    """A noise round of an update: only the timed steps ran."""
    side_by_side: bool = True
    """Whether a regression of the cell may be confirmed side by side (False: a distributed cell,
    whose ranks cannot take turns with another revision's; its stored verdict stands)."""


class CellRunner(Protocol):
    """A way to obtain a cell's measurement."""

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        """Run the test of ``item`` so as to measure its cell; None when nothing was measured (a plain
        run, a test that never called the fixture). Fails, skips or xfails ``item`` as its test did."""
        ...

    def header(self) -> str | None:
        """A line for pytest's report header, or None."""
        ...

    def close(self) -> None:
        """Release what the runner holds (child processes, worktrees); safe to call twice."""
        ...


def choose(settings: Settings, config: pytest.Config, call: Callable[[pytest.Function], object],
           ledger: Ledger) -> CellRunner:
    """The runner of this process: in a child of another runner, the in-process runner that serves its
    parent (a lockstep worker also registers its serving loop); else the one the settings ask for.
    ``call`` runs a test function in this process."""
    from pytest_trainperf.runners import children, inprocess
    from pytest_trainperf.runners.ranks import Rank, Ranks

    if os.environ.get(children.RANKS_ENV):  # a rank of a distributed cell
        from pytest_trainperf.runners.ranks import enter

        enter()
        return Rank(inprocess.InProcess(call, peak_rss=True))
    channel = os.environ.get(children.LOCKSTEP_ENV)
    if channel:
        from pytest_trainperf.runners.lockstep import Channel, lockstep_timer, serve

        pipes = Channel.from_env(channel)
        serve(config, ledger, pipes)
        return inprocess.InProcess(call, timer=lockstep_timer(pipes))
    return Ranks(_single(settings, config, call), settings, config)  # distributed cells launch their ranks


def _single(settings: Settings, config: pytest.Config, call: Callable[[pytest.Function], object]) -> CellRunner:
    """The runner of the cells that are not distributed."""
    from pytest_trainperf.runners import children, inprocess

    if os.environ.get(children.CHILD_ENV):
        return inprocess.InProcess(call, peak_rss=True)
    if settings.against is not None:
        from pytest_trainperf.runners.lockstep import Lockstep

        return Lockstep.start(settings, config)
    if settings.isolate:
        from pytest_trainperf.runners.isolated import Isolated

        return Isolated.start(settings, config)
    return inprocess.InProcess(call)
