"""How long a step on the CPU waited for *another process* to give up the core (Linux only).

A side-by-side pair (:mod:`pytest_trainperf.runners.lockstep`) runs both workers on the same CPUs.
A neighbour process that shares them (a busy CI runner, another job pinned to the core) takes its
time slices in the middle of a step: the step's wall time grows by a slice or two whatever the code
does: committed +5% and +10% slowdowns measured +3.5% and +6.8% with a spinning neighbour on the core,
against +4.1% and +7.9% without (``docs/performance.md``, the screen benchmark), in intervals up to ±21%.
The kernel counts that time per thread: the second field of ``/proc/thread-self/schedstat`` is the
*run delay*, nanoseconds the thread was ready to run but waited while something else ran on its CPU.
A step's time less its thread's run delay is what the step takes when it has the core, and the
neighbour's slices no longer water a change down.

The run delay also counts time the thread waited for *its own process's* other threads (a data-loading
thread spinning on the same core is the code's own cost). So what is left out is the run delay less
the CPU time the process's other threads got meanwhile (``time.process_time_ns`` less
``time.thread_time_ns``), never below zero: the part of the wait that no thread of this process can account for.
Only the thread that runs the step is read, so on a step that fans out to intra-op threads a wait of
those threads stays in the time (left out too little, never too much).

Both sides of a pair leave the same thing out, and only in a pair: stored baselines and in-process
timings stay wall time. On an accelerator nothing is left out (a host thread preempted while the device
works may cost no time at all). The files are read outside the timed span, never inside it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SCHEDSTAT = Path("/proc/thread-self/schedstat")
"""Linux's per-thread scheduler counters: run time (ns), run delay (ns), time slices. The run delay is
brought up to date whenever the thread gets the CPU, so a running thread reads all of its own."""

Snapshot = tuple[int, int, int]
"""This thread's CPU time and run delay, and the process's CPU time, in nanoseconds."""


def available() -> bool:
    """Whether the kernel has the counters (Linux with scheduler statistics)."""
    try:
        read()
    except (OSError, ValueError, IndexError):
        return False
    return True


def read() -> Snapshot:
    """The calling thread's counters, now."""
    fd = os.open(SCHEDSTAT, os.O_RDONLY)
    try:
        waited = os.read(fd, 128).split()[1]  # the file's run time lags the running thread by up to a tick
    finally:
        os.close(fd)
    process = time.process_time_ns()  # then this thread's: other threads' share is the difference
    return time.thread_time_ns(), int(waited), process


def neighbour_wait(before: Snapshot, after: Snapshot, elapsed: int) -> int:
    """Nanoseconds of a step of ``elapsed`` ns that its thread waited for another process: the run delay
    between the two snapshots less the CPU time the process's other threads got meanwhile, at least 0.
    A wait as long as the step or longer (it began before the step's clock started) counts as none: the
    step keeps its wall time."""
    ran, waited, process = (a - b for a, b in zip(after, before, strict=True))
    others = max(process - ran, 0)
    wait = max(waited - others, 0)
    return wait if wait < elapsed else 0
