"""Which device a cell measures on, and how its steps are timed there: the choice per backend is
tested as a choice (the APIs a torch offers in, the plan out), without the hardware."""

from __future__ import annotations

import pytest
import torch

from pytest_trainperf.distributed import worker_device
from pytest_trainperf.measure.device import (
    Api,
    Apis,
    Clock,
    DeviceError,
    choose_timing,
    missing_device,
    select_device,
    synchronizer,
    timing_plan,
)
from pytest_trainperf.measure.timing import time_steps

NEW = Apis(accelerator=True, generic_event=True, accelerator_context=True, backend_sync=True, backend_event=True,
           backend_context=True)
"""A torch >= 2.8 whose current accelerator is the device's type."""
OLD = Apis(accelerator=False, generic_event=False, accelerator_context=False, backend_sync=True, backend_event=True,
           backend_context=True)
"""torch 2.1 to 2.5 (no torch.accelerator): the backend's own module."""
NOTHING = Apis(accelerator=False, generic_event=False, accelerator_context=False, backend_sync=False,
               backend_event=False, backend_context=False)


def test_the_cpu_is_timed_by_the_host_clock_with_nothing_to_synchronize() -> None:
    plan = choose_timing("cpu", NOTHING)
    assert (plan.clock, plan.sync, plan.events, plan.context) == (Clock.HOST, Api.NONE, Api.NONE, Api.NONE)
    assert timing_plan(torch.device("cpu")) == plan


@pytest.mark.parametrize(("apis", "api"), [(NEW, Api.GENERIC), (OLD, Api.BACKEND)])
def test_cuda_and_xpu_are_timed_by_events_under_the_device_context_and_synchronized(apis: Apis, api: Api) -> None:
    for device_type in ("cuda", "xpu"):
        plan = choose_timing(device_type, apis)
        assert plan.clock is Clock.EVENTS
        assert (plan.sync, plan.events, plan.context) == (api, api, api)


def test_cuda_on_torch_2_6_and_2_7_synchronizes_generically_and_enters_the_cuda_context() -> None:
    # torch.accelerator without device_index (2.8): the context is torch.cuda.device
    apis = Apis(accelerator=True, generic_event=True, accelerator_context=False, backend_sync=True,
                backend_event=True, backend_context=True)
    plan = choose_timing("cuda", apis)
    assert (plan.clock, plan.sync, plan.events, plan.context) == (Clock.EVENTS, Api.GENERIC, Api.GENERIC, Api.BACKEND)


def test_a_cuda_device_that_is_not_the_current_accelerator_uses_torch_cuda() -> None:
    apis = Apis(accelerator=False, generic_event=True, accelerator_context=False, backend_sync=True,
                backend_event=True, backend_context=True)
    plan = choose_timing("cuda", apis)
    assert (plan.sync, plan.events) == (Api.BACKEND, Api.BACKEND)


@pytest.mark.parametrize("apis", [NEW, OLD])
def test_mps_is_synchronized_and_timed_to_completion_on_the_host_clock(apis: Apis) -> None:
    plan = choose_timing("mps", apis)
    assert plan.clock is Clock.HOST_SYNCED and plan.sync is not Api.NONE
    assert plan.events is Api.NONE and plan.context is Api.NONE  # one device


def test_xpu_without_timing_events_falls_back_to_the_synchronized_host_clock() -> None:
    apis = Apis(accelerator=False, generic_event=False, accelerator_context=False, backend_sync=True,
                backend_event=False, backend_context=True)
    plan = choose_timing("xpu", apis)
    assert (plan.clock, plan.sync, plan.events) == (Clock.HOST_SYNCED, Api.BACKEND, Api.NONE)


def test_another_accelerator_is_timed_through_torch_accelerator() -> None:
    plan = choose_timing("privateuseone", NEW)
    assert (plan.clock, plan.sync) == (Clock.HOST_SYNCED, Api.GENERIC)


def test_a_device_that_cannot_be_synchronized_is_refused_rather_than_timed_by_its_queue() -> None:
    with pytest.raises(DeviceError, match="cannot time steps on hpu: .*time to queue the work"):
        choose_timing("hpu", NOTHING)


def test_the_cpu_synchronizer_does_nothing_and_timing_on_the_cpu_is_unchanged() -> None:
    assert synchronizer(torch.device("cpu"))() is None
    assert len(time_steps(lambda: 1, 3, torch.device("cpu"), warmup=0).samples) == 3


@pytest.mark.parametrize(("device_type", "index", "count", "expected"), [
    ("cuda", 1, 1, "cuda:1 does not exist: torch sees 1 cuda device(s) (cuda:0 only)"),
    ("cuda", 4, 4, "cuda:4 does not exist: torch sees 4 cuda device(s) (cuda:0 to cuda:3)"),
    ("xpu", 0, 0, "xpu:0 does not exist: torch sees 0 xpu device(s) (none)"),
    ("cuda", 3, 4, ""),
    ("cuda", None, 1, ""),
    ("mps", 0, 0, ""),
])
def test_a_device_index_beyond_the_count_is_named(device_type: str, index: int | None, count: int,
                                                  expected: str) -> None:
    assert missing_device(device_type, index, count) == expected


def test_the_cpu_is_selected_as_is() -> None:
    assert select_device("cpu", "--trainperf-device=cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the refusal is for machines without it")
def test_an_unavailable_backend_is_refused_naming_the_option() -> None:
    with pytest.raises(DeviceError, match=r"^--trainperf-device=cuda:1, but torch.cuda.is_available\(\) is False"):
        select_device("cuda:1", "--trainperf-device=cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks cuda:N against the device count")
def test_a_cuda_index_beyond_the_device_count_is_refused_naming_option_value_and_count() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"--trainperf-device=cuda:{count}: cuda:{count} does not exist: "
                                          rf"torch sees {count} cuda device\(s\)"):
        select_device(f"cuda:{count}", f"--trainperf-device=cuda:{count}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: makes the selected device current")
def test_the_selected_cuda_device_becomes_current() -> None:
    last = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    try:
        assert select_device(f"cuda:{last}", "--trainperf-device") == torch.device("cuda", last)
        assert torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(before)


@pytest.mark.parametrize(("worker", "expected"), [(None, "cuda:0"), ("gw0", "cuda:0"), ("gw1", "cuda:1"),
                                                  ("gw2", "cuda:0")])
def test_each_worker_gets_its_own_device_of_the_list(worker: str | None, expected: str) -> None:
    assert worker_device(("cuda:0", "cuda:1"), worker) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the refusal is for machines without it")
def test_a_worker_device_that_cannot_be_used_is_a_setup_error_naming_the_list(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_dev="""
        def test_device(trainperf):
            trainperf.device
    """)
    result = pytester.runpytest("--trainperf", "--trainperf-devices=cuda:1,cuda:0")
    result.assert_outcomes(errors=1)
    assert "During handling" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*--trainperf-devices=cuda:1,cuda:0 (this worker's: cuda:1), but "
                                 "torch.cuda.is_available() is False*"])
