"""Per-step wall-clock timing, with the measurement hygiene of ``torch.utils.benchmark.Timer``.

Each step is timed on its own with ``time.perf_counter_ns``; on CUDA the device is synchronized
before the clock starts and before it stops, so the time is the step's device time as the host sees
it. The garbage collector is collected before and disabled during the timed steps; the intra-op
thread count is fixed for the whole measurement and restored afterwards.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

NS_PER_S = 1e9
"""Nanoseconds per second."""


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
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_steps(fn: Callable[[], T], count: int, device: torch.device,
               keep: Callable[[T], object] | None = None, warmup: int = 0) -> tuple[list[float], list[object]]:
    """Call ``fn`` ``warmup`` times untimed, then ``count`` times timing each call.

    Returns seconds per timed call and what ``keep`` kept of every call, warm-up included. The
    garbage collector runs once before the warm-up (whose steps bring the caches back after it) and is
    off until the last timed call. ``keep`` turns each result into what is kept (e.g. a detached
    loss); None keeps nothing, so results die before the next call starts.
    """
    sync = synchronizer(device)
    clock = time.perf_counter_ns
    samples: list[int] = []
    kept: list[object] = []
    with no_gc():
        for _ in range(warmup):
            result = fn()
            if keep is not None:
                kept.append(keep(result))
            del result
        sync()
        for _ in range(count):
            start = clock()
            result = fn()
            sync()
            samples.append(clock() - start)
            if keep is not None:
                kept.append(keep(result))
            del result
    return [s / NS_PER_S for s in samples], kept
