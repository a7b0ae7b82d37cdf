"""The cell runs in this process: the test calls the ``trainperf`` fixture, which measures its steps.

This is the default runner, and the one every child process of the other runners uses inside itself
(an isolated child adds its process's ``peak_rss``; a lockstep child times its steps when its parent
says so).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_trainperf.records import Metric
from pytest_trainperf.runners import CellRun
from pytest_trainperf.runners.children import rss_bytes

if TYPE_CHECKING:
    import pytest

    from pytest_trainperf.fixture import Timer, TrainPerf


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (torch is loaded if a cell allocated anything)."""
    if isinstance(exc, MemoryError):
        return True
    if "torch" not in sys.modules:
        return False
    from pytest_trainperf.measure.memory import is_out_of_memory

    return is_out_of_memory(exc)


class InProcess:
    """Calls the test function here; the fixture's measurement is the cell's."""

    def __init__(self, call: Callable[[pytest.Function], object], timer: Timer | None = None,
                 peak_rss: bool = False, on_close: Callable[[], None] | None = None) -> None:
        self._call = call
        self._timer = timer
        self._peak_rss = peak_rss
        self._on_close = on_close

    def header(self) -> str | None:
        return None

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def run(self, item: pytest.Function, fixture: TrainPerf) -> CellRun | None:
        from pytest_trainperf.fixture import EmulatedOutOfMemory

        if self._timer is not None:
            fixture.use_timer(self._timer)
        oom = ""
        try:
            self._call(item)
        except Exception as exc:
            if not fixture.enabled or not out_of_memory(exc):
                raise
            if not isinstance(exc, EmulatedOutOfMemory):  # an emulated one is already the fixture's result
                text = str(exc).strip()
                oom = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        # out of the except block: the exception, its traceback and the test's frames are gone now
        if not fixture.enabled:
            return None
        if oom:
            from pytest_trainperf.measure.memory import recover

            recover(fixture.device)
            fixture.out_of_memory(oom)
        if self._peak_rss and not fixture.timing_only and fixture.result() is not None:
            import resource

            fixture.add_metric(Metric("peak_rss", rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "B"))
        measurement = fixture.result()
        if measurement is None:
            return None
        return CellRun(cell=fixture.cell, fingerprint=fixture.fingerprint(), measurement=measurement,
                       confirmed=fixture.confirmed, deadline=fixture.deadline, elapsed=fixture.elapsed,
                       notes=fixture.notes,
                       timing_only=fixture.timing_only)
