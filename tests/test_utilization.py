"""Utilization (NVML sampler against a fake of NVML's few calls; process CPU for real), MFU, the CUDA
fingerprint fields and ``--trainperf-cudnn-benchmark``."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import pytest_trainperf as tp
from pytest_trainperf import store
from pytest_trainperf.env import fingerprint
from pytest_trainperf.measure import mfu as mfu_module
from pytest_trainperf.measure.cudnn import cudnn_benchmark
from pytest_trainperf.measure.timing import time_steps
from pytest_trainperf.measure.utilization import (
    CpuUtilization,
    NvmlSampler,
    Probe,
    ProcessSample,
    attribute,
    in_window,
    load_nvml,
    mig_enabled,
    nvml_id,
)
from pytest_trainperf.records import CellVerdict, Direction, Fingerprint, Measurement, Metric, MetricVerdict, Status
from pytest_trainperf.stats import judge

PID = 4242
"""The pid the fake NVML attributes 'our' samples to."""
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ a fake of NVML's few calls


class NVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(value)
        self.value = value


class NVMLError_NotSupported(NVMLError):  # pynvml's names
    def __init__(self) -> None:
        super().__init__(3)


class NVMLError_NotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(6)


class NVMLError_NoPermission(NVMLError):
    def __init__(self) -> None:
        super().__init__(4)

    def __str__(self) -> str:
        return "Insufficient Permissions"


class FakeNvml:
    """The ``pynvml`` calls the sampler makes, over a timeline the test writes with :meth:`emit`.

    ``capacity``: how many samples per stream NVML's ring buffer keeps. ``inclusive``: return the
    sample stamped ``last_seen`` again (as a driver may), so the sampler must de-duplicate.
    """

    NVML_GPU_UTILIZATION_SAMPLES = 1
    NVML_MEMORY_UTILIZATION_SAMPLES = 2
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_NoPermission = NVMLError_NoPermission
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, samples: bool = True, processes: bool = True, capacity: int = 1000,
                 inclusive: bool = False) -> None:
        self.supports_samples = samples
        self.supports_processes = processes
        self.capacity = capacity
        self.inclusive = inclusive
        self.buffers: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
        self.process_buffer: list[tuple[int, int, int, int]] = []
        self.rates = (0, 0)
        self.calls = 0
        self.called = threading.Event()
        self.fail_with: Exception | None = None
        self.process_error: Exception | None = None
        self.mig: int | Exception = 0
        self.shutdowns = 0

    def emit(self, stamp: int, sm: int, memory: int, pids: dict[int, tuple[int, int]] | None = None) -> None:
        for kind, value in ((1, sm), (2, memory)):
            self.buffers[kind] = (self.buffers[kind] + [(stamp, value)])[-self.capacity:]
        for pid, (psm, pmem) in (pids or {}).items():
            self.process_buffer.append((pid, stamp, psm, pmem))
        self.rates = (sm, memory)

    def _after(self, stamp: int, last: int) -> bool:
        return stamp >= last if self.inclusive and last else stamp > last

    def nvmlDeviceGetSamples(self, handle: object, kind: int, last: int) -> tuple[int, list[Any]]:
        assert handle == "gpu0"
        self.calls += 1
        self.called.set()
        if self.fail_with is not None:
            raise self.fail_with
        if not self.supports_samples:
            raise NVMLError_NotSupported()
        got = [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=v))
               for t, v in self.buffers[kind] if self._after(t, last)]
        if not got:
            raise NVMLError_NotFound()
        return 1, got  # NVML_VALUE_TYPE_UNSIGNED_INT

    def nvmlDeviceGetProcessUtilization(self, handle: object, last: int) -> list[Any]:
        if not self.supports_processes:
            raise NVMLError_NotSupported()
        if self.process_error is not None:
            raise self.process_error
        got = [SimpleNamespace(pid=p, timeStamp=t, smUtil=s, memUtil=m, encUtil=0, decUtil=0)
               for p, t, s, m in self.process_buffer if self._after(t, last)]
        if not got:
            raise NVMLError_NotFound()
        return got

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> Any:
        return SimpleNamespace(gpu=self.rates[0], memory=self.rates[1])

    def nvmlDeviceGetMigMode(self, handle: object) -> tuple[int, int]:
        if isinstance(self.mig, Exception):
            raise self.mig
        return self.mig, self.mig

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1


def sampler(nvml: FakeNvml, poll: float = 3600.0) -> NvmlSampler:
    """A sampler whose thread, with the default poll, never wakes before stop (stop drains once more)."""
    return NvmlSampler(nvml, "gpu0", pid=PID, poll=poll, rates_period=poll)


def drained(nvml: FakeNvml) -> None:
    """Wait until the sampler thread has made two NVML calls that began after this point (so both
    streams were read after what the test emitted)."""
    for _ in range(2):
        nvml.called.clear()
        assert nvml.called.wait(10), "the sampler thread never drained"


def named(metrics: list[Metric]) -> dict[str, float]:
    return {m.name: m.value for m in metrics}


# ------------------------------------------------------------------ the NVML sampler's logic


def test_samples_before_the_window_are_left_out_and_the_window_is_summarized() -> None:
    nvml = FakeNvml(processes=False)
    nvml.emit(100, 99, 99)
    nvml.emit(200, 99, 99)
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 40, 10)
    nvml.emit(400, 60, 30)
    result = s.stop()
    assert result.sm == (40.0, 60.0) and result.memory == (10.0, 30.0)
    assert named(result.metrics()) == pytest.approx({"sm_utilization": 50.0, "sm_utilization_max": 60.0,
                                                     "memory_utilization": 20.0, "memory_utilization_max": 30.0})
    assert result.scope == "device"
    assert "device-wide" in result.note and "does not attribute" in result.note


def test_samples_returned_twice_count_once() -> None:
    nvml = FakeNvml(processes=False, inclusive=True)
    nvml.emit(100, 99, 99)
    s = sampler(nvml, poll=0.001)
    s.start()
    for stamp, value in ((300, 40), (400, 60), (500, 80)):
        nvml.emit(stamp, value, value)
        drained(nvml)
        drained(nvml)  # more drains: the inclusive fake returns the last sample again each time
    result = s.stop()
    assert result.sm == (40.0, 60.0, 80.0)
    assert named(result.metrics())["sm_utilization"] == pytest.approx(60.0)


def test_the_thread_drains_the_buffer_before_it_wraps() -> None:
    nvml = FakeNvml(processes=False, capacity=2)
    s = sampler(nvml, poll=0.001)
    s.start()
    for stamp in range(10, 70, 10):  # six samples through a buffer of two
        nvml.emit(stamp, stamp, stamp)
        drained(nvml)
    result = s.stop()
    assert result.sm == (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)


def test_only_the_stop_drain_would_lose_samples_of_a_wrapped_buffer() -> None:
    """The counterpart of the test above: without a drain in between, the buffer's wrap loses samples
    (so the test above passes because the thread drains, not by accident)."""
    nvml = FakeNvml(processes=False, capacity=2)
    s = sampler(nvml)
    s.start()
    for stamp in range(10, 70, 10):
        nvml.emit(stamp, stamp, stamp)
    assert s.stop().sm == (50.0, 60.0)


def test_utilization_is_attributed_to_our_process_where_nvml_can() -> None:
    nvml = FakeNvml()
    nvml.emit(100, 99, 99, {PID: (99, 99)})
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 90, 50, {PID: (30, 20), 7: (60, 30)})
    nvml.emit(400, 95, 55, {PID: (50, 40), 7: (45, 15)})
    result = s.stop()
    assert result.scope == "process" and result.note == ""
    assert named(result.metrics()) == pytest.approx({"sm_utilization": 40.0, "sm_utilization_max": 50.0,
                                                     "memory_utilization": 30.0, "memory_utilization_max": 40.0})


def test_no_samples_of_our_pid_falls_back_to_the_device_and_says_so() -> None:
    nvml = FakeNvml()
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 80, 40, {1234: (80, 40)})  # e.g. our pid as the host numbers it, in a container
    result = s.stop()
    assert result.scope == "device" and result.sm == (80.0,)
    assert f"pid {PID}" in result.note and "device-wide" in result.note


def test_no_sample_within_the_window_gives_no_metric_and_a_note() -> None:
    nvml = FakeNvml(processes=False)
    nvml.emit(100, 50, 50)
    s = sampler(nvml)
    s.start()
    result = s.stop()
    assert result.metrics() == []
    assert "no NVML utilization sample fell within" in result.note


def test_a_device_without_samples_is_polled_for_its_rates() -> None:
    nvml = FakeNvml(samples=False, processes=False)
    nvml.emit(100, 70, 35)
    s = sampler(nvml)
    s.start()
    result = s.stop()
    assert named(result.metrics()) == pytest.approx({"sm_utilization": 70.0, "sm_utilization_max": 70.0,
                                                     "memory_utilization": 35.0, "memory_utilization_max": 35.0})
    assert "nvmlDeviceGetUtilizationRates" in result.note


def test_an_nvml_error_while_sampling_is_a_note_not_a_failure() -> None:
    nvml = FakeNvml(processes=False)
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 40, 10)
    nvml.fail_with = NVMLError(15)  # GPU is lost
    result = s.stop()
    assert result.metrics() == [] and result.note.startswith("NVML sampling failed")


def test_a_device_that_does_not_attribute_to_processes_says_so_by_name() -> None:
    nvml = FakeNvml(processes=False)
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 40, 10)
    result = s.stop()
    assert result.scope == "device"
    assert result.note == ("GPU utilization is device-wide: NVML does not attribute utilization to processes on "
                           "this device (NVMLError_NotSupported)")


@pytest.mark.parametrize(("error", "named_as"), [
    (NVMLError_NoPermission(), "NVMLError_NoPermission: Insufficient Permissions"),
    (NVMLError(999), "NVMLError: 999"),  # NVML_ERROR_UNKNOWN, say
])
def test_a_failing_per_process_call_is_named_not_called_unsupported(error: Exception, named_as: str) -> None:
    nvml = FakeNvml()
    nvml.process_error = error
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 40, 10)
    result = s.stop()
    assert result.scope == "device" and result.sm == (40.0,)
    assert result.note == f"GPU utilization is device-wide: nvmlDeviceGetProcessUtilization failed ({named_as})"
    assert "does not attribute" not in result.note


def test_a_per_process_call_failing_mid_window_is_named_too() -> None:
    nvml = FakeNvml()
    s = sampler(nvml)
    s.start()
    nvml.emit(300, 40, 10, {PID: (30, 5)})
    nvml.process_error = NVMLError_NoPermission()
    result = s.stop()
    assert "nvmlDeviceGetProcessUtilization failed (NVMLError_NoPermission" in result.note


@pytest.mark.parametrize(("mode", "expected"), [
    (1, (True, "")),
    (0, (False, "")),
    (NVMLError_NotSupported(), (False, "")),  # a GPU without MIG (pre-Ampere, consumer)
    (NVMLError_NoPermission(), (None, "MIG mode unknown: nvmlDeviceGetMigMode failed (NVMLError_NoPermission: "
                                      "Insufficient Permissions)")),
])
def test_mig_mode_from_nvml(mode: int | Exception, expected: tuple[bool | None, str]) -> None:
    nvml = FakeNvml()
    nvml.mig = mode
    assert mig_enabled(nvml, "gpu0") == expected


def test_window_and_attribution_are_pure() -> None:
    assert in_window([(5, 1.0), (3, 9.0), (5, 2.0), (7, 3.0)], after=3) == [1.0, 3.0]
    samples = [ProcessSample(1, 10, 5.0, 1.0), ProcessSample(2, 11, 50.0, 9.0), ProcessSample(1, 12, 7.0, 3.0),
               ProcessSample(1, 12, 7.0, 3.0), ProcessSample(1, 2, 99.0, 99.0)]
    assert attribute(samples, pid=1, after=5) == ([5.0, 7.0], [1.0, 3.0])


@pytest.mark.parametrize(("index", "visible", "expected"), [
    (1, None, 1),
    (1, "", 1),
    (1, "3,2", 2),
    (0, "GPU-8f2c,GPU-1a2b", "GPU-8f2c"),
    (2, "1,0", 2),  # beyond the list: torch would not see it; NVML's own number
])
def test_torch_device_index_to_nvml(index: int, visible: str | None, expected: int | str) -> None:
    assert nvml_id(index, visible, "PCI_BUS_ID", host_gpus=4) == expected


@pytest.mark.parametrize(("index", "visible", "order", "host_gpus", "expected"), [
    (1, None, None, 4, None),  # CUDA's default order is fastest first: an index is not NVML's
    (1, "3,2", "FASTEST_FIRST", 4, None),
    (0, "GPU-8f2c", None, 4, "GPU-8f2c"),  # a UUID names one GPU whatever the order
    (0, None, None, 1, 0),  # one GPU on the host: only one it can be
    (1, None, "pci_bus_id", 4, 1),
])
def test_an_index_is_nvml_s_only_under_pci_bus_order(index: int, visible: str | None, order: str | None,
                                                      host_gpus: int, expected: int | str | None) -> None:
    assert nvml_id(index, visible, order, host_gpus) == expected


def test_no_pynvml_is_a_note_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    nvml, note = load_nvml()
    assert nvml is None and "pynvml is not installed" in note
    with Probe(torch.device("cuda"), threads=1) as probe:
        probe.start()
    assert probe.metrics == []
    assert probe.notes == [note]


def test_no_nvml_library_is_a_note_not_a_failure() -> None:
    pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the nvml extra)")
    nvml, note = load_nvml()
    if nvml is not None:
        pynvml.nvmlShutdown()
        pytest.skip("NVML is available on this machine: the missing-library path cannot be exercised")
    assert note.startswith("no GPU utilization: NVML is not available")


# ------------------------------------------------------------------ CPU utilization, for real


def test_cpu_utilization_of_a_busy_step_is_well_above_a_sleeping_one() -> None:
    busy, idle = CpuUtilization(threads=1), CpuUtilization(threads=1)
    busy.start()
    start = time.process_time()
    while time.process_time() - start < 0.2:
        sum(range(1000))
    busy_metric = busy.stop()
    idle.start()
    time.sleep(0.2)
    idle_metric = idle.stop()
    assert busy_metric is not None and idle_metric is not None
    assert busy_metric.name == "cpu_utilization" and busy_metric.unit == "%"
    assert 0 <= idle_metric.value < busy_metric.value <= 105
    assert busy_metric.value > 2 * idle_metric.value


def test_the_samplers_start_after_the_warmup_and_before_the_timed_steps() -> None:
    log: list[str] = []
    time_steps(lambda: log.append("step"), 3, torch.device("cpu"), warmup=2, on_timed=lambda: log.append("start"))
    assert log == ["step", "step", "start", "step", "step", "step"]


# ------------------------------------------------------------------ MFU


@pytest.mark.parametrize(("name", "product"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090"),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
    ("Tesla T4", "T4"),
    ("NVIDIA A10G", None),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_the_peak_table_is_keyed_by_device_name(name: str, product: str | None) -> None:
    peak = mfu_module.find_peak(name)
    assert (peak.product if peak is not None else None) == product


def test_the_peak_table_is_dense_and_ordered_by_precision() -> None:
    for peak in mfu_module.PEAKS:
        flops = peak.flops
        assert all(v > 0 for v in flops.values()), peak.product
        assert flops["float32"] <= flops.get("tf32", flops["float32"]) <= flops["float16"], peak.product
        assert flops.get("bfloat16", flops["float16"]) == flops["float16"], peak.product
        assert flops["float16"] < 1000e12, f"{peak.product}: a sparse figure?"


def test_unknown_device_or_precision_gives_no_peak_and_a_note() -> None:
    assert mfu_module.peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == (312e12, "")
    peak, note = mfu_module.peak_flops("NVIDIA A10G", "float32")
    assert peak is None and "not in the peak FLOP/s table" in note and "peak_flops" in note
    peak, note = mfu_module.peak_flops("Tesla V100-SXM2-16GB", "bfloat16")
    assert peak is None and "no bfloat16 peak" in note
    assert mfu_module.device_peaks(torch.device("cpu")) == mfu_module.NO_PEAKS


def split_cell(step_time: float, **flops: float) -> Measurement:
    total = sum(flops.values())
    return cell_of(Metric("step_time", step_time, "s"), Metric("flops", total, "FLOP"),
                   *(Metric(f"flops_{p}", v, "FLOP") for p, v in flops.items()))


def test_each_precision_s_flops_are_judged_against_its_own_peak() -> None:
    peaks = mfu_module.peaks_for("NVIDIA H200", mig=False, slice_sms=132)
    assert peaks.product == "H200 SXM" and peaks.peak("float8") == pytest.approx(1979e12)
    # 989.5e12 bf16 FLOPs take 1 s at peak, 67e12 fp32 FLOPs 1 s more: 2 s of peak work in a 4 s step
    metric, note = mfu_module.measured_mfu(split_cell(4.0, bf16=989.5e12, fp32=67e12), peaks, "float32")
    assert metric is not None and note == ""
    assert metric.value == pytest.approx(50.0)
    # the same bf16 FLOPs judged against the fp32 peak would read 14.8 times higher
    metric, _ = mfu_module.measured_mfu(split_cell(4.0, fp32=989.5e12 + 67e12), peaks, "float32")
    assert metric is not None and metric.value > 350


def test_without_a_split_every_flop_counts_at_the_fallback_precision() -> None:
    peaks = mfu_module.peaks_for("NVIDIA A100-SXM4-80GB", mig=False, slice_sms=108)
    metric, _ = mfu_module.measured_mfu(split_cell(1.0), peaks, "tf32")
    assert metric is not None and metric.value == 0.0  # no matmul/conv/attention work at all
    cell = cell_of(Metric("step_time", 1.0, "s"), Metric("flops", 156e12, "FLOP"))
    metric, _ = mfu_module.measured_mfu(cell, peaks, "tf32")
    assert metric is not None and metric.value == pytest.approx(100.0)


def test_a_precision_without_a_peak_gives_no_mfu_and_says_which() -> None:
    peaks = mfu_module.peaks_for("Tesla V100-SXM2-16GB", mig=False, slice_sms=80)
    metric, note = mfu_module.measured_mfu(split_cell(1.0, bf16=1e12, fp16=1e12), peaks, "float32")
    assert metric is None and "FLOPs run in bfloat16, which has no peak" in note and "V100 SXM2" in note


def test_a_mig_slice_gets_its_share_of_the_peak_and_a_note() -> None:
    peaks = mfu_module.peaks_for("NVIDIA H100 80GB HBM3 MIG 3g.40gb", mig=True, slice_sms=60)
    assert peaks.peak("bfloat16") == pytest.approx(989.5e12 * 60 / 132)
    assert "60/132 of the H100 SXM peaks" in peaks.note
    metric, note = mfu_module.measured_mfu(split_cell(1.0, bf16=989.5e12 * 60 / 132), peaks, "float32")
    assert metric is not None and metric.value == pytest.approx(100.0) and note == peaks.note


def test_a_mig_slice_of_a_gpu_whose_sm_count_is_unknown_gets_no_mfu() -> None:
    peaks = mfu_module.peaks_for("NVIDIA L4 MIG", mig=True, slice_sms=20)
    assert peaks.flops == () and "no SM count for L4" in peaks.note
    metric, note = mfu_module.measured_mfu(split_cell(1.0, bf16=1e12), peaks, "float32")
    assert metric is None and note == peaks.note


def test_mfu_is_flops_per_second_over_the_peak() -> None:
    metric = mfu_module.mfu(flops=1e12, step_time=0.01, peak=312e12)
    assert metric.name == "mfu" and metric.unit == "%"
    assert metric.value == pytest.approx(100 * 1e14 / 312e12)


def test_the_precision_in_use_follows_the_default_dtype() -> None:
    assert mfu_module.precision_in_use(torch.device("cpu")) == "float32"
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert mfu_module.precision_in_use(torch.device("cpu")) == "float64"
    finally:
        torch.set_default_dtype(before)


# ------------------------------------------------------------------ report-only, gateable


def cell_of(*metrics: Metric) -> Measurement:
    return Measurement(test="t", cell="default", params=(), metrics=metrics)


def test_utilization_is_reported_not_gated_unless_a_test_gives_a_tolerance() -> None:
    before = cell_of(Metric("sm_utilization", 60.0, "%", Direction.HIGHER_IS_BETTER))
    now = cell_of(Metric("sm_utilization", 40.0, "%", Direction.HIGHER_IS_BETTER))
    assert judge(now, before).metric("sm_utilization").status is Status.UNCHANGED  # type: ignore[union-attr]
    gated = judge(now, before, {"sm_utilization": 0.1}).metric("sm_utilization")
    assert gated is not None and gated.status is Status.REGRESSED


def test_tp_tolerance_accepts_the_new_metrics() -> None:
    @tp.tolerance(sm_utilization=0.1, memory_utilization_max=0.2, cpu_utilization=0.3, mfu=0.05)
    def test() -> None: ...

    (mark,) = test.pytestmark  # type: ignore[attr-defined]
    assert mark.args[0] == {"sm_utilization": 0.1, "memory_utilization_max": 0.2, "cpu_utilization": 0.3,
                            "mfu": 0.05}


def test_a_new_report_only_metric_leaves_an_unchanged_cell_unchanged() -> None:
    step = MetricVerdict("step_time", Status.UNCHANGED, 1.0, 1.0, 0.1)
    added = MetricVerdict("cpu_utilization", Status.NEW, 90.0, None, math.inf)
    gated = MetricVerdict("eval_loss", Status.NEW, 1.0, None, 0.01)
    assert CellVerdict(cell_of(), (step, added)).status is Status.UNCHANGED
    assert CellVerdict(cell_of(), (step, added, gated)).status is Status.NEW


# ------------------------------------------------------------------ fingerprint and the cuDNN policy


CPU_KEY = "cpu | AMD EPYC | torch 2.13.0+cpu | cuda none | threads 1 | malloc glibc-fixed"


def test_the_cpu_key_is_unchanged() -> None:
    fp = Fingerprint(device="AMD EPYC", device_type="cpu", torch="2.13.0+cpu", cuda=None, threads=1,
                     cpu="AMD EPYC", malloc="glibc-fixed", python="3.11.7", platform="linux-x86_64")
    assert fp.key == CPU_KEY
    here = fingerprint(torch.device("cpu"), 1, "glibc-fixed", "on")
    assert (here.compute_capability, here.driver, here.cudnn, here.cudnn_benchmark) == ("", "", "", "")
    assert "cudnn" not in here.key


def test_committed_baselines_still_match_their_keys() -> None:
    files = sorted((REPO / "baselines").rglob("*.json"))
    assert files, "no committed baselines to check"
    for path in files:
        for key, env in store.read(path).environments.items():
            assert env.fingerprint.key == key, path


def test_a_cuda_key_carries_cudnn_and_its_benchmark_policy() -> None:
    fp = Fingerprint(device="NVIDIA H100 80GB HBM3", device_type="cuda", torch="2.13.0", cuda="12.8", threads=7,
                     cpu="AMD EPYC", malloc="glibc-fixed", compute_capability="9.0", driver="570.86.15",
                     cudnn="91002", cudnn_benchmark="off")
    assert fp.key == ("cuda | NVIDIA H100 80GB HBM3 | torch 2.13.0 | cuda 12.8 | cudnn 91002 | "
                      "cudnn.benchmark off | threads 7 | cpu AMD EPYC | malloc glibc-fixed")


@pytest.mark.parametrize(("policy", "inside"), [("on", "on"), ("off", "off")])
def test_the_cudnn_policy_is_set_for_the_measurement_and_restored(policy: str, inside: str) -> None:
    before = torch.backends.cudnn.benchmark
    for start in (True, False):
        torch.backends.cudnn.benchmark = start
        with cudnn_benchmark(policy) as used:
            assert used == inside and torch.backends.cudnn.benchmark is (inside == "on")
        assert torch.backends.cudnn.benchmark is start
    with cudnn_benchmark("keep") as used:
        assert used == ("on" if start else "off")
    torch.backends.cudnn.benchmark = before


def test_the_cudnn_option_is_listed_and_checked(pytester: pytest.Pytester) -> None:
    pytester.runpytest("--help").stdout.fnmatch_lines(["*--trainperf-cudnn-benchmark=POLICY*"])
    result = pytester.runpytest("--trainperf-cudnn-benchmark=fast")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--trainperf-cudnn-benchmark*expected one of keep, on, off, got 'fast'*"])
    pytester.makeini("[pytest]\ntrainperf_cudnn_benchmark = sometimes\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*trainperf_cudnn_benchmark*expected one of keep, on, off, got 'sometimes'*"])


# ------------------------------------------------------------------ through the plugin


WORKLOAD = """
import torch
from torch import nn
import pytest_trainperf as tp

PEAK = {peak}

def test_mlp(trainperf):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)).to(trainperf.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64).to(trainperf.device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=10, warmup=2)
    if PEAK:
        trainperf.record("peak_flops", PEAK, unit="FLOP/s")
"""


def measured(pytester: pytest.Pytester, *args: str, peak: float = 0.0) -> tuple[pytest.RunResult, dict[str, Any]]:
    pytester.makeini("[pytest]\ntrainperf_threads = 1\n")
    pytester.makepyfile(test_work=WORKLOAD.format(peak=peak))
    result = pytester.runpytest("--trainperf", "--trainperf-json=out.json", *args)
    result.assert_outcomes(passed=1)
    (cell,) = json.loads((pytester.path / "out.json").read_text())["cells"]
    return result, cell


def test_a_cpu_cell_reports_its_cpu_utilization_and_no_mfu_without_a_peak(pytester: pytest.Pytester) -> None:
    result, cell = measured(pytester, "--trainperf-device=cpu")
    metrics = {m["name"]: m for m in cell["verdict"]["measurement"]["metrics"]}
    assert 0 < metrics["cpu_utilization"]["value"] <= 105 and metrics["cpu_utilization"]["unit"] == "%"
    assert metrics["cpu_utilization"]["direction"] == "higher"
    assert "mfu" not in metrics and "sm_utilization" not in metrics
    verdicts = {m["name"]: m for m in cell["verdict"]["metrics"]}
    assert verdicts["cpu_utilization"]["tolerance"] == "inf"
    assert "trainperf note" not in result.stdout.str()


def test_a_recorded_peak_gives_mfu_on_the_cpu(pytester: pytest.Pytester) -> None:
    _, cell = measured(pytester, "--trainperf-device=cpu", peak=1e9)
    metrics = {m["name"]: m["value"] for m in cell["verdict"]["measurement"]["metrics"]}
    assert metrics["mfu"] == pytest.approx(100 * metrics["flops"] / metrics["step_time"] / 1e9)
    assert metrics["peak_flops"] == pytest.approx(1e9)


CUDA_WORKLOAD = """
import torch


def test_matmuls(trainperf):
    device = trainperf.device
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    w = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step():
        w.grad = None
        loss = sum((a @ w).float().square().mean() for _ in range(8))
        loss.backward()
        return loss

    trainperf.train(step, steps=60, warmup=3)  # well over NVML's sample period of timed steps
"""


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: measures GPU utilization (NVML) and MFU for real")
def test_a_cuda_cell_reports_utilization_mfu_and_its_bf16_flops(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the nvml extra) for GPU utilization")
    if mfu_module.find_peak(torch.cuda.get_device_name()) is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in the peak table: no mfu to check")
    before = torch.backends.cudnn.benchmark
    pytester.makeini("[pytest]\ntrainperf_threads = 1\n")
    pytester.makepyfile(test_work=CUDA_WORKLOAD)
    result = pytester.runpytest("--trainperf", "--trainperf-json=out.json", "--trainperf-device=cuda",
                                "--trainperf-cudnn-benchmark=on")
    result.assert_outcomes(passed=1)
    (cell,) = json.loads((pytester.path / "out.json").read_text())["cells"]
    assert torch.backends.cudnn.benchmark is before  # restored after the measurement
    metrics = {m["name"]: m["value"] for m in cell["verdict"]["measurement"]["metrics"]}
    assert 0 < metrics["sm_utilization"] <= metrics["sm_utilization_max"] <= 100
    assert metrics["flops_bf16"] == metrics["flops"] > 0  # every matmul, forward and backward, in bf16
    assert 1 < metrics["mfu"] <= 100  # against the bf16 peak: a bf16 matmul loop is far above 1%
    fp = cell["fingerprint"]
    major, minor = torch.cuda.get_device_capability()
    assert fp["compute_capability"] == f"{major}.{minor}" and fp["cudnn_benchmark"] == "on"
    assert "cudnn.benchmark on" in cell["environment"] and f"cudnn {fp['cudnn']}" in cell["environment"]
