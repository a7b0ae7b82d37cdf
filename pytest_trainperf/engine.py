"""The one measurement of a cell's step, driven one step at a time by whatever runs the steps.

``trainperf.train`` and ``trainperf.run`` drive it around each call of their function;
``trainperf.step``, ``trainperf.steps`` and the framework callbacks (:mod:`pytest_trainperf.integrations`)
around each step of a loop they do not own. The phases are the same for all of them:

1. the first step runs under the counting pass (FLOPs and work counts, :mod:`.measure.counting`);
2. the second under the peak-memory tracker (:mod:`.measure.memory`);
3. then ``warmup`` untimed steps and ``count`` timed ones (:class:`.measure.timing.StepClock`).

A noise round of an update (``timing_only``) skips the first two. Around all of them the intra-op thread
count is pinned, the cuDNN policy set, the utilization probe and the compile watch run, as ``train``
always did; they are entered at the first step and left after the last one, so that the code a loop
runs between its steps (fetching the next batch, logging) runs under them too.

torch is imported inside the methods, never at import of this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pytest_trainperf.measure.compiled import CompileWatch
    from pytest_trainperf.measure.counting import StepCounts
    from pytest_trainperf.measure.flops import FlopCount
    from pytest_trainperf.measure.memory import FoundPeak, MemoryPeak, Preexisting
    from pytest_trainperf.measure.timing import StepClock, Timed
    from pytest_trainperf.measure.utilization import Probe
    from pytest_trainperf.measure.work import WorkCount


class Phase(enum.Enum):
    """What the next step of a measurement runs under."""

    COUNT = "count"
    """The counting pass: FLOPs and work counts."""
    MEMORY = "memory"
    """The peak-memory tracker."""
    TIMED = "timed"
    """The warm-up and timed steps."""
    DONE = "done"
    """Nothing: the measurement is complete (or over its memory budget: not timed)."""


class Engine:
    """One cell's measurement of its step (see the module docstring).

    Use: :meth:`open` once; for each step :meth:`begin`, the step, :meth:`end` while :attr:`phase` is
    not ``DONE`` (or :meth:`time_with` a function for the warm-up and timed steps); :meth:`close` in
    every case (idempotent: it restores threads, garbage collection, cuDNN and the probe).
    """

    def __init__(self, device: torch.device, *, count: int, warmup: int, timing_only: bool, threads: int,
                 policy: str, preexisting: Callable[[], Preexisting], budget: int | None = None,
                 settle: bool = True, between: Callable[[], None] | None = None) -> None:
        self.device = device
        self.count = count
        self.warmup = warmup
        self.timing_only = timing_only
        self.threads = threads
        self._policy = policy
        self._preexisting = preexisting
        self._budget = budget
        self._settle = settle
        self._between = between
        self.phase = Phase.TIMED if timing_only else Phase.COUNT
        self._outer = ExitStack()
        self._inner = ExitStack()
        self._in_step = False
        self._opened = False
        self.cudnn_setting = ""
        """The cuDNN benchmark setting in effect during the measurement (``on``/``off``)."""
        self.probe: Probe | None = None
        self.watch: CompileWatch | None = None
        self.clock: StepClock | None = None
        self.flops: FlopCount | None = None
        self.work: WorkCount | None = None
        self.peak: MemoryPeak | None = None
        self.over = False
        """Whether the step's peak memory exceeded the budget (then nothing is timed)."""
        self.timed: Timed | None = None
        self.steps_run = 0
        """Steps begun and ended so far."""
        self._counts: StepCounts | None = None
        self._found: FoundPeak | None = None

    # ------------------------------------------------------------------ the measurement's frame

    def open(self) -> None:
        """Pin the threads, set the cuDNN policy, start the probe and the compile watch (idempotent)."""
        from pytest_trainperf.measure.compiled import CompileWatch
        from pytest_trainperf.measure.cudnn import cudnn_benchmark
        from pytest_trainperf.measure.timing import fixed_threads
        from pytest_trainperf.measure.utilization import Probe

        if self._opened:
            return
        self._opened = True
        self._outer.enter_context(fixed_threads(self.threads))
        self.cudnn_setting = self._outer.enter_context(cudnn_benchmark(self._policy))
        self.probe = self._outer.enter_context(Probe(self.device, self.threads, enabled=not self.timing_only))
        self.watch = CompileWatch()  # torch.compile: dynamo reset, its counters read around the cell

    def close(self) -> None:
        """Leave everything :meth:`open` and the steps entered, innermost first (idempotent)."""
        try:
            self._inner.close()
            if self.clock is not None:
                self.clock.close()
        finally:
            self._in_step = False
            self._outer.close()
            if self.watch is not None:
                self.watch.finish()

    # ------------------------------------------------------------------ one step at a time

    @property
    def timing(self) -> bool:
        """Whether the next step (or the one running) is a timed one (not warm-up, not instrumented)."""
        return self.phase is Phase.TIMED and self.clock is not None and self.clock.timing

    def begin(self) -> None:
        """A step begins: enter its phase's instrumentation (or start its clock)."""
        from pytest_trainperf.measure.compiled import eager_instrumented
        from pytest_trainperf.measure.counting import counting
        from pytest_trainperf.measure.memory import peak_of

        assert not self._in_step and self.phase is not Phase.DONE
        self.open()
        self._in_step = True
        if self.phase is Phase.COUNT:  # one counting pass: FLOPs, syncs, ops, memory traffic (torch.compile off)
            self._counts = self._inner.enter_context(counting(self.device.type))
        elif self.phase is Phase.MEMORY:
            self._inner.enter_context(eager_instrumented())
            self._found = self._inner.enter_context(peak_of(self.device, self._preexisting()))
        else:
            self._timer().start()

    def data_ready(self) -> None:
        """Inside a step: its data has arrived (a timed step's sample is split there)."""
        if self.phase is Phase.TIMED and self.clock is not None:
            self.clock.data_ready()

    def end(self) -> None:
        """The step ends: leave its instrumentation (or stop its clock) and move to the next phase."""
        assert self._in_step
        self._in_step = False
        self.steps_run += 1
        if self.phase is Phase.TIMED:
            assert self.clock is not None
            self.clock.stop()
            if self.clock.finished:
                self.phase = Phase.DONE
            return
        self._inner.close()
        if self.phase is Phase.COUNT:
            assert self._counts is not None
            self.flops, self.work = self._counts.flops, self._counts.work
            self.phase = Phase.MEMORY
            return
        assert self._found is not None
        self.peak = self._found.peak
        self.over = self.peak is not None and self._budget is not None and self.peak.peak_bytes > self._budget
        self.phase = Phase.DONE if self.over else Phase.TIMED  # a cell over its budget would not have run

    def timed_result(self, kept: list[object]) -> Timed:
        """What the loop's timed steps measured (once :attr:`phase` is ``DONE``)."""
        assert self.clock is not None
        self.clock.close()
        self.timed = self.clock.timed(kept)
        return self.timed

    def time_with(self, timer: Callable[..., Timed], fn: Callable[[], Any],
                  keep: Callable[[Any], object] | None) -> None:
        """Run the warm-up and timed steps as calls of ``fn`` with ``timer`` (``time_steps`` or a
        stand-in with its signature: the lockstep child's, a rank's)."""
        assert self.phase is Phase.TIMED and not self._in_step
        self.open()
        self.timed = timer(fn, self.count, self.device, keep, self.warmup, on_timed=self._on_timed)
        self.phase = Phase.DONE

    def _timer(self) -> StepClock:
        from pytest_trainperf.measure.timing import StepClock

        if self.clock is None:
            self.clock = StepClock(self.device, self.count, self.warmup, self._settle, on_timed=self._on_timed,
                                   between=self._between)
        return self.clock

    def _on_timed(self) -> None:
        """Right before the first timed step's clock starts: mark the compile watch, start the probe."""
        if self.watch is not None:
            self.watch.mark_timed()
        if self.probe is not None:
            self.probe.start()
