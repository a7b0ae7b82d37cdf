"""Per-step timing: warm-up until the step time settles, with the number of calls fixed."""

from __future__ import annotations

import statistics
import time
import types
from collections.abc import Callable

import pytest
import torch

from pytest_trainperf.measure import timing
from pytest_trainperf.measure.timing import SETTLE_MAX_SHARE, settled_from, time_steps


@pytest.mark.parametrize(("samples", "expected"), [
    ([5.0] * 10, 0),  # flat: nothing to drop
    ([9.0, 8.0, 7.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], 2),  # getting faster until a window's median settles
    ([9.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], 0),  # one slow step in a window of 3 is not a trend
    ([5.0, 5.1, 4.9, 5.2, 5.0, 4.8, 5.1, 5.0], 0),  # noise within 5%
    ([20.0, 19.0, 18.0, 17.0, 16.0, 15.0, 14.0, 13.0, 12.0, 11.0], 5),  # never settles: capped at half
    ([30.0, 20.0, 19.0, 18.0, 17.0, 16.0, 15.0, 14.0, 13.0], 4),  # cap of 4 (half of 9)
    ([9.0, 5.0, 5.0, 5.0, 5.0], 0),  # too few to tell
])
def test_settled_from(samples: list[float], expected: int) -> None:
    assert settled_from(samples) == expected


def test_time_steps_moves_unsettled_timed_calls_to_the_warmup_and_keeps_every_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that is slow for its first five calls and asked for two warm-up calls: the timed calls
    until a window's median is fast count as warm-up, and all 2 + 12 calls happened. The timer reads a
    clock that each call advances by its duration (20 ms, then 2 ms): no wall-clock time is involved."""
    calls = []
    now = [0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter_ns=lambda: now[0]))

    def step() -> int:
        calls.append(len(calls))
        now[0] += 20_000_000 if len(calls) <= 5 else 2_000_000
        return len(calls)

    timed = time_steps(step, 12, torch.device("cpu"), keep=lambda n: n, warmup=2)

    assert len(calls) == 14 and timed.kept == list(range(1, 15))
    assert timed.warmup == 4  # timed calls 3 and 4 (20 ms) were still warm-up; call 5 is one slow step left
    assert timed.samples == pytest.approx([0.02] + [0.002] * 9)


def test_time_steps_without_warmup_or_settling_keeps_every_sample() -> None:
    def step() -> None:
        time.sleep(0.001)

    assert len(time_steps(step, 6, torch.device("cpu"), warmup=0).samples) == 6
    assert len(time_steps(step, 6, torch.device("cpu"), warmup=2, settle=False).samples) == 6
    assert SETTLE_MAX_SHARE == 0.5


CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs CUDA: compares the device's events with the host clock")
STEP_SECONDS = 0.020
"""The GPU step the event timing is checked on."""
AGREEMENT = 0.05
"""How far the events' median may be from the synchronized host clock's on a step that long."""


def gpu_step(device: torch.device, seconds: float = STEP_SECONDS) -> Callable[[], torch.Tensor]:
    """A step of back-to-back matmuls on ``device`` lasting about ``seconds`` (calibrated here)."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)

    def matmuls(n: int) -> torch.Tensor:
        out = a
        for _ in range(n):
            out = a @ b
        return out

    matmuls(3)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    matmuls(50)
    torch.cuda.synchronize(device)
    n = max(1, round(50 * seconds / (time.perf_counter() - start)))
    return lambda: matmuls(n)


def host_times(step: Callable[[], object], device: torch.device, count: int) -> list[float]:
    out = []
    for _ in range(count):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        out.append(time.perf_counter() - start)
    return out


@CUDA
@pytest.mark.parametrize("index", sorted({0, torch.cuda.device_count() - 1}) if torch.cuda.is_available() else [0])
def test_cuda_events_agree_with_a_synchronized_host_clock(index: int) -> None:
    """On the last GPU too, while another is current: the events must be on the step's device and stream."""
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        step = gpu_step(device)
    torch.cuda.set_device(0)  # the current device is not the measured one (where there are two)
    events = statistics.median(time_steps(step, 15, device, warmup=3).samples)
    with torch.cuda.device(device):
        host = statistics.median(host_times(step, device, 15))
    assert events == pytest.approx(host, rel=AGREEMENT)
    assert events == pytest.approx(STEP_SECONDS, rel=0.5)  # a real device time, not the launch time
