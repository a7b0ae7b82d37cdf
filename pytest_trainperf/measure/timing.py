"""Per-step wall-clock timing, with the measurement hygiene of ``torch.utils.benchmark.Timer``.

Each step is timed on its own with ``time.perf_counter_ns``. On an accelerator the device is
synchronized at the end of every step (so the host clock is right too, and nothing of one step runs
into the next), and the steps run under the device's context (:func:`.device.on_device`). On CUDA and
XPU each step is also bracketed by a pair of timing events recorded on the device's current stream;
the sample is the events' elapsed time, the device's own clock from the step's start to its last
kernel's end. :mod:`.device` chooses per backend (:func:`.device.choose_timing`) and refuses a device
it cannot synchronize. The garbage collector is collected before and disabled during the timed
steps; the intra-op thread count is fixed for the whole measurement and restored afterwards.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

NS_PER_S = 1e9
"""Nanoseconds per second."""
MS_PER_S = 1e3
"""Milliseconds per second (CUDA events measure in milliseconds)."""
SETTLE_WINDOW = 3
"""Timed steps compared at a time to decide whether the step time has settled."""
SETTLE_TOLERANCE = 0.05
"""A leading window of timed steps more than this much slower than the steps after it is still warm-up."""
SETTLE_MAX_SHARE = 0.5
"""At most this share of the timed steps may be moved to the warm-up."""


def default_threads() -> int:
    """Intra-op threads when the user sets none: torch's own count less one, at least one.

    One core is left to the OS, pytest and any neighbour: on a fully subscribed machine every stray
    process stalls a thread barrier and step times jump. Measured on a 2-core runner (examples/,
    10 cells, 8 unchanged reruns against one update): with torch's 2 threads 5 of 100 cells falsely
    regressed and most were flagged as improved; with 1 thread, 1 of 80 regressed and none improved.
    """
    import torch

    return max(1, torch.get_num_threads() - 1)


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(threads)``; restore the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def no_gc() -> Iterator[None]:
    """Collect garbage now, then keep the collector out of the body; restore its state after."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU); raises
    :class:`.device.DeviceError` for a device that cannot be synchronized."""
    from pytest_trainperf.measure.device import synchronizer as device_synchronizer

    return device_synchronizer(device)


@dataclass(frozen=True)
class Timed:
    """What :func:`time_steps` (or a :class:`StepClock`) measured."""

    samples: list[float]
    """Seconds per timed call that counts: the calls after the step time settled."""
    kept: list[object]
    """What ``keep`` kept of every call, warm-up included, in order."""
    warmup: int
    """Calls that count as warm-up: the ones asked for, and leading timed calls before the step time settled."""
    data: list[float] = field(default_factory=list)
    """Of each sample, the seconds spent waiting for the step's data (:meth:`StepClock.data_ready`); empty
    when the steps were not split into data and compute."""


def settled_from(samples: Sequence[float], window: int = SETTLE_WINDOW, tolerance: float = SETTLE_TOLERANCE,
                 max_share: float = SETTLE_MAX_SHARE) -> int:
    """How many leading samples are still warm-up: the smallest ``k`` such that the median of the
    ``window`` samples from ``k`` is no more than ``tolerance`` slower than the median of the samples
    after them, at most ``max_share`` of the samples (0 when there are too few to tell)."""
    cap = int(len(samples) * max_share)
    for k in range(cap + 1):
        head, rest = samples[k:k + window], samples[k + window:]
        if len(rest) < window:  # too few left to tell: as far as the samples allow
            return k
        if statistics.median(head) <= (1 + tolerance) * statistics.median(rest):
            return k
    return cap


def warm_up(fn: Callable[[], T], warmup: int, keep: Callable[[T], object] | None, kept: list[object]) -> None:
    """Call ``fn`` ``warmup`` times untimed, keeping ``keep(result)`` of each in ``kept``; each result
    dies before the next call starts."""
    for _ in range(warmup):
        result = fn()
        if keep is not None:
            kept.append(keep(result))
        del result


class StepClock:
    """Times a loop one step at a time: what :func:`time_steps` does around each call of a function,
    for a loop that is not one (``trainperf.step``, ``trainperf.steps``, a framework's callbacks).

    The first ``warmup`` steps are untimed, the next ``count`` timed; :meth:`start` and :meth:`stop`
    bracket each step (warm or timed), :attr:`finished` says when all have run. The device context and
    the garbage collector's pause (collected once, then off) hold from the first step's start until
    :meth:`close`, so the code the loop runs between steps runs under them too. Before the first timed
    step's clock starts the device is synchronized and ``on_timed`` is called; each timed step ends
    with a synchronization inside its clock, as in :func:`time_steps`. :meth:`data_ready` marks, inside a
    timed step, the moment its data arrived: the sample is then split into a data wait and compute.
    """

    def __init__(self, device: torch.device, count: int, warmup: int = 0, settle: bool = True,
                 on_timed: Callable[[], None] | None = None, between: Callable[[], None] | None = None) -> None:
        from pytest_trainperf.measure.device import timing_plan

        self.count = count
        """Timed steps."""
        self.warmup = warmup
        """Untimed steps before them."""
        self._device = device
        self._settle = settle
        self._on_timed = on_timed
        self._between = between
        self._plan = timing_plan(device)
        self._sync = synchronizer(device)
        self._stack = ExitStack()
        self._opened = False
        self._events: list[tuple[Any, Any]] = []
        self._mids: list[tuple[Any, Any]] = []
        self._stream: Any = None
        self._ended = 0
        self._start = 0
        self._mid: int | None = None
        self._ns: list[int] = []
        self._data_ns: list[int | None] = []

    @property
    def timing(self) -> bool:
        """Whether the next step is a timed one."""
        return self.warmup <= self._ended < self.warmup + self.count

    @property
    def finished(self) -> bool:
        """Whether every warm-up and timed step has run."""
        return self._ended >= self.warmup + self.count

    def __enter__(self) -> StepClock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the device context and let the garbage collector run again (idempotent)."""
        self._stack.close()

    def start(self) -> None:
        """A step begins (its clock starts if it is a timed one)."""
        from pytest_trainperf.measure.device import current_stream, on_device, timing_events

        if not self._opened:
            self._opened = True
            self._stack.enter_context(on_device(self._device, self._plan))
            self._stack.enter_context(no_gc())
        if not self.timing:
            return
        i = self._ended - self.warmup
        if i == 0:  # after the warm-up: its work done, the events made, the samplers started
            self._sync()
            self._events = timing_events(self._device, self._plan, self.count)
            self._mids = timing_events(self._device, self._plan, self.count)
            self._stream = current_stream(self._device, self._plan)
            if self._on_timed is not None:
                self._on_timed()
        if self._between is not None:
            self._between()
        self._mid = None
        self._start = time.perf_counter_ns()
        if self._events:
            self._events[i][0].record(self._stream)

    def data_ready(self) -> None:
        """The step's data has arrived: what ran since :meth:`start` was the wait for it."""
        if self.timing:
            self._mid = time.perf_counter_ns()
            if self._mids:
                self._mids[self._ended - self.warmup][0].record(self._stream)

    def stop(self) -> None:
        """The step ends (a timed one after a synchronization, inside its clock)."""
        if self.timing:
            i = self._ended - self.warmup
            if self._events:
                self._events[i][1].record(self._stream)
            self._sync()
            end = time.perf_counter_ns()
            self._ns.append(end - self._start)
            self._data_ns.append(None if self._mid is None else self._mid - self._start)
        self._ended += 1

    def timed(self, kept: list[object]) -> Timed:
        """What the timed steps measured (after every step ran), with ``kept`` as the kept results."""
        seconds = [s / NS_PER_S for s in self._ns]
        split = bool(self._data_ns) and all(d is not None for d in self._data_ns)
        data = [(d or 0) / NS_PER_S for d in self._data_ns] if split else []
        if self._events:  # the device's own clock, from the start event to the end of the step's last kernel
            seconds = [begin.elapsed_time(end) / MS_PER_S for begin, end in self._events]
            if split:
                data = [begin.elapsed_time(mid[0]) / MS_PER_S
                        for (begin, _), mid in zip(self._events, self._mids, strict=True)]
        skip = settled_from(seconds) if self._settle and self.warmup > 0 else 0
        return Timed(samples=seconds[skip:], kept=kept, warmup=self.warmup + skip, data=data[skip:])


def time_steps(fn: Callable[[], T], count: int, device: torch.device,
               keep: Callable[[T], object] | None = None, warmup: int = 0, settle: bool = True,
               on_timed: Callable[[], None] | None = None, between: Callable[[], None] | None = None) -> Timed:
    """Call ``fn`` ``warmup`` times untimed, then ``count`` times timing each call.

    With ``settle`` (and ``warmup`` >= 1), leading timed calls whose time had not settled yet
    (:func:`settled_from`) count as warm-up and are dropped from the samples: the warm-up lasts until
    the step time settles, and the number of calls, so the state a training run ends in, stays fixed.
    The garbage collector runs once before the warm-up (whose steps bring the caches back after it)
    and is off until the last timed call. ``keep`` turns each result into what is kept (e.g. a
    detached loss); None keeps nothing, so results die before the next call starts. ``on_timed`` is
    called once, after the warm-up (and its synchronization), before the first timed call's clock
    starts: where utilization samplers start. ``between`` is called before each timed call, outside its
    clock (a distributed cell's barrier: every rank starts each step together).
    """
    kept: list[object] = []
    with StepClock(device, count, warmup, settle, on_timed, between) as clock:
        while not clock.finished:
            clock.start()
            result = fn()
            clock.stop()
            if keep is not None:
                kept.append(keep(result))
            del result
    return clock.timed(kept)
