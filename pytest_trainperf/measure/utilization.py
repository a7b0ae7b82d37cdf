"""Utilization during the timed steps: the GPU's through NVML, the process's CPU on the CPU.

**CUDA.** :class:`NvmlSampler` runs a daemon thread around the timed steps only (started after the
warm-up's last step, stopped after the last timed one; never during the FLOP or memory step). NVML
keeps a ring buffer of utilization samples taken at the device's own period (1/6 s to 1 s,
depending on the GPU); the thread drains it every :data:`POLL_SECONDS` with
``nvmlDeviceGetSamples(handle, NVML_GPU_UTILIZATION_SAMPLES | NVML_MEMORY_UTILIZATION_SAMPLES,
last_seen)``, so it wakes rarely and the samples are the device's, not the poller's. Which samples
count is decided on NVML's own timestamps, never the host clock: a first drain at start records the
newest timestamp already buffered, and only later samples count (de-duplicated by timestamp; a
sample stamped at the end of its period may reach up to one period back before the window).

Where the device supports it, ``nvmlDeviceGetProcessUtilization`` attributes the utilization to this
process (samples whose pid is ``os.getpid()``); otherwise the figures are device-wide and the note says
why, naming NVML's error as it is (``NVMLError_NotSupported``: the device does not attribute;
``NVMLError_NoPermission``, ``NVMLError_Unknown``... : the call failed), or no samples for our pid (as
in a container's own PID namespace). A device without utilization samples falls back to polling
``nvmlDeviceGetUtilizationRates`` every :data:`RATES_SECONDS` (each value covers NVML's last sample
period: approximate at the window's edges). No ``pynvml`` module (the ``nvml`` extra), no NVML library
or no access to the device: no utilization metric and a one-line note, never a failure.

Metrics (percent, higher is better, reported and not gated unless a test gives a tolerance):
``sm_utilization`` and ``memory_utilization`` are the means over the samples in the window,
``sm_utilization_max`` and ``memory_utilization_max`` the largest.

**CPU.** :class:`CpuUtilization` reads the process's CPU time and the wall clock before the first
and after the last timed step: ``cpu_utilization`` = CPU time / wall time / the fixed intra-op
thread count, in percent (100% = every thread busy throughout). Threads other than torch's
intra-op pool (inter-op, data loading) can take it above 100%.

**Finding the GPU.** torch's CUDA device is found in NVML by its PCI bus id, else by its UUID, else by
index, and by index only where the numbering is NVML's (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or one GPU
on the host): CUDA numbers the fastest GPU first by default, NVML by PCI bus. :func:`mig_mode` says
whether that GPU is in MIG mode (for :mod:`.mfu`).

The NVML surface used here is a handful of ``pynvml`` calls on one module object, so tests pass a
fake of those calls; torch is only imported to find the device.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_trainperf.records import Direction, Metric

if TYPE_CHECKING:
    import torch

POLL_SECONDS = 1.0
"""How often the sampler thread drains NVML's sample buffers (which hold several seconds of samples)."""
RATES_SECONDS = 1 / 6
"""Polling period of the ``nvmlDeviceGetUtilizationRates`` fallback: NVML's shortest sample period."""
PCI_BUS_ORDER = "PCI_BUS_ID"
"""The ``CUDA_DEVICE_ORDER`` under which CUDA numbers GPUs as NVML does."""
PERCENT = "%"
"""The unit of every utilization metric."""
VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
"""The field of ``nvmlValue_t`` to read for each ``nvmlValueType_t`` (``NVML_VALUE_TYPE_DOUBLE`` = 0 ...)."""


@dataclass(frozen=True)
class ProcessSample:
    """One sample of ``nvmlDeviceGetProcessUtilization``."""

    pid: int
    """The process, as the host (driver) numbers it."""
    timestamp: int
    """NVML's timestamp of the sample (microseconds)."""
    sm: float
    """The process's share of SM time in the sample period, percent."""
    memory: float
    """The process's share of memory-controller time in the sample period, percent."""


@dataclass(frozen=True)
class Utilization:
    """Utilization over the timed steps of one cell."""

    sm: tuple[float, ...]
    """SM utilization samples in the window, percent, oldest first."""
    memory: tuple[float, ...]
    """Memory-controller utilization samples in the window, percent, oldest first."""
    scope: str
    """``process`` (attributed to this process) or ``device`` (the whole GPU)."""
    note: str = ""
    """What the reader should know about the figures (device-wide, too few samples); empty if nothing."""

    def metrics(self) -> list[Metric]:
        """``sm_utilization``, ``memory_utilization`` (means) and their ``_max``; none without samples."""
        out = []
        for name, values in (("sm_utilization", self.sm), ("memory_utilization", self.memory)):
            if values:
                out.append(Metric(name, statistics.fmean(values), PERCENT, Direction.HIGHER_IS_BETTER))
                out.append(Metric(f"{name}_max", max(values), PERCENT, Direction.HIGHER_IS_BETTER))
        return out


def in_window(samples: Iterable[tuple[int, float]], after: int) -> list[float]:
    """The values of the samples stamped after ``after``, oldest first, each timestamp once."""
    seen: dict[int, float] = {}
    for stamp, value in samples:
        if stamp > after:
            seen.setdefault(stamp, value)
    return [seen[s] for s in sorted(seen)]


def attribute(samples: Iterable[ProcessSample], pid: int, after: int) -> tuple[list[float], list[float]]:
    """The SM and memory utilization samples of process ``pid`` stamped after ``after``, oldest first."""
    ours = {s.timestamp: s for s in samples if s.pid == pid and s.timestamp > after}
    ordered = [ours[t] for t in sorted(ours)]
    return [s.sm for s in ordered], [s.memory for s in ordered]


def nvml_error(exc: BaseException) -> str:
    """An NVML error as what it is: ``NVMLError_NoPermission: Insufficient Permissions``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unattributed(exc: BaseException, nvml: Any) -> str:
    """Why the per-process call gave nothing: the device does not attribute (``NotSupported``), or the
    call failed, named."""
    cls = getattr(nvml, "NVMLError_NotSupported", None)
    if isinstance(cls, type) and isinstance(exc, cls):
        return f"NVML does not attribute utilization to processes on this device ({type(exc).__name__})"
    return f"nvmlDeviceGetProcessUtilization failed ({nvml_error(exc)})"


def summarize(sm: Sequence[float], memory: Sequence[float], process: tuple[list[float], list[float]] | None,
              pid: int, seconds: float, source: str = "samples", why_not: str = "") -> Utilization:
    """Choose between the process's samples (``process``; None: the per-process call gave nothing,
    ``why_not`` says why) and the device's, and say which was used and why."""
    if process is not None and process[0]:
        return Utilization(sm=tuple(process[0]), memory=tuple(process[1]), scope="process")
    if process is None:
        why = why_not or "NVML does not attribute utilization to processes on this device"
    else:
        why = f"NVML reported no samples for this process (pid {pid}; another PID namespace?)"
    note = f"GPU utilization is device-wide: {why}"
    if source == "rates":
        note += "; polled nvmlDeviceGetUtilizationRates (the device keeps no samples)"
    if not sm and not memory:
        note = (f"no NVML utilization sample fell within the {seconds:.3g} s of timed steps (NVML samples "
                "every 1/6 s to 1 s): time more steps to get sm_utilization")
    return Utilization(sm=tuple(sm), memory=tuple(memory), scope="device", note=note)


def _value(sample: Any, value_type: int) -> float:
    return float(getattr(sample.sampleValue, VALUE_FIELDS[value_type]))


class NvmlSampler:
    """Samples one GPU's utilization between :meth:`start` and :meth:`stop`, on a daemon thread.

    ``nvml`` is the ``pynvml`` module (or a fake of its few calls), initialized; ``handle`` the
    device's NVML handle.
    """

    def __init__(self, nvml: Any, handle: object, pid: int | None = None, poll: float = POLL_SECONDS,
                 rates_period: float = RATES_SECONDS) -> None:
        self._nvml = nvml
        self._handle = handle
        self._pid = os.getpid() if pid is None else pid
        self._poll = poll
        self._rates_period = rates_period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kinds = {"sm": nvml.NVML_GPU_UTILIZATION_SAMPLES, "memory": nvml.NVML_MEMORY_UTILIZATION_SAMPLES}
        self._samples: dict[str, list[tuple[int, float]]] = {"sm": [], "memory": []}
        self._last: dict[str, int] = {"sm": 0, "memory": 0, "process": 0}
        self._after: dict[str, int] = {"sm": 0, "memory": 0, "process": 0}
        self._processes: list[ProcessSample] | None = []  # None: not supported, or the call failed
        self._process_error = ""
        self._rates = False  # polling nvmlDeviceGetUtilizationRates instead of reading samples
        self._rate_samples: list[tuple[int, float, float]] = []
        self._started = 0.0
        self._error = ""

    # ------------------------------------------------------------------ NVML calls

    def _is(self, exc: BaseException, name: str) -> bool:
        cls = getattr(self._nvml, name, None)
        return isinstance(cls, type) and isinstance(exc, cls)

    def _drain_samples(self, kind: str) -> list[tuple[int, float]]:
        nvml = self._nvml
        try:
            value_type, raw = nvml.nvmlDeviceGetSamples(self._handle, self._kinds[kind], self._last[kind])
        except nvml.NVMLError as exc:
            if self._is(exc, "NVMLError_NotFound"):  # no sample since last_seen
                return []
            raise
        got = [(int(s.timeStamp), _value(s, value_type)) for s in raw]
        if got:
            self._last[kind] = max(self._last[kind], max(t for t, _ in got))
        return got

    def _drain_processes(self) -> list[ProcessSample]:
        nvml = self._nvml
        try:
            raw = nvml.nvmlDeviceGetProcessUtilization(self._handle, self._last["process"])
        except nvml.NVMLError as exc:
            if self._is(exc, "NVMLError_NotFound") or getattr(exc, "value", None) == 0:
                return []  # no sample since last_seen (pynvml raises NVMLError(NVML_SUCCESS) for none at all)
            raise
        got = [ProcessSample(int(s.pid), int(s.timeStamp), float(s.smUtil), float(s.memUtil)) for s in raw]
        if got:
            self._last["process"] = max(self._last["process"], max(s.timestamp for s in got))
        return got

    def _collect(self) -> None:
        """One drain of every stream: by the thread while it runs, then once more by :meth:`stop`
        after joining it (so never two at once). A process stream that errors stops being read."""
        nvml = self._nvml
        if self._rates:
            rates = nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self._rate_samples.append((time.monotonic_ns() // 1000, float(rates.gpu), float(rates.memory)))
        else:
            for kind in ("sm", "memory"):
                self._samples[kind] += self._drain_samples(kind)
        if self._processes is not None:
            try:
                self._processes.extend(self._drain_processes())
            except nvml.NVMLError as exc:
                self._processes, self._process_error = None, unattributed(exc, nvml)

    # ------------------------------------------------------------------ the window

    def start(self) -> None:
        """Mark the window's start (NVML's newest buffered timestamps) and start the thread."""
        nvml = self._nvml
        try:
            for kind in ("sm", "memory"):
                self._drain_samples(kind)
        except nvml.NVMLError as exc:
            if not self._is(exc, "NVMLError_NotSupported"):
                raise
            self._rates = True
        try:
            self._drain_processes()
        except nvml.NVMLError as exc:
            self._processes, self._process_error = None, unattributed(exc, nvml)
        self._after = dict(self._last)
        self._started = time.perf_counter()
        period = self._rates_period if self._rates else self._poll
        self._thread = threading.Thread(target=self._run, args=(period,), name="trainperf-nvml", daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self._collect()
            except Exception as exc:  # a sampler error must never fail the measurement
                self._error = f"{type(exc).__name__}: {exc}"
                return

    def stop(self) -> Utilization:
        """Stop the thread, drain what is left, and summarize the window."""
        seconds = time.perf_counter() - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._error:
            try:
                self._collect()
            except Exception as exc:  # reported in the note, never raised
                self._error = f"{type(exc).__name__}: {exc}"
        if self._error:
            return Utilization(sm=(), memory=(), scope="device", note=f"NVML sampling failed: {self._error}")
        process = None if self._processes is None else attribute(self._processes, self._pid, self._after["process"])
        if self._rates:
            sm = [g for _, g, _ in self._rate_samples]
            memory = [m for _, _, m in self._rate_samples]
            return summarize(sm, memory, process, self._pid, seconds, source="rates", why_not=self._process_error)
        return summarize(in_window(self._samples["sm"], self._after["sm"]),
                         in_window(self._samples["memory"], self._after["memory"]), process, self._pid, seconds,
                         why_not=self._process_error)

    def close(self) -> None:
        """Shut NVML down (the thread must have stopped)."""
        self._nvml.nvmlShutdown()


# ------------------------------------------------------------------ finding the device


def nvml_id(index: int, visible: str | None, order: str | None = PCI_BUS_ORDER, host_gpus: int = 1) -> int | str | None:
    """NVML's index (int) or UUID (str) of torch's CUDA device ``index`` under ``CUDA_VISIBLE_DEVICES``
    (``visible``) and ``CUDA_DEVICE_ORDER`` (``order``), with ``host_gpus`` GPUs on the host; None where
    it cannot be told.

    Used when torch does not give the device's PCI bus id or UUID. NVML numbers every GPU of the host
    by PCI bus and ignores ``CUDA_VISIBLE_DEVICES``; an entry of the list is an index (in CUDA's order)
    or a ``GPU-...`` UUID. CUDA's default order (``FASTEST_FIRST``) is not NVML's: an index means the
    same GPU to both only under ``PCI_BUS_ID`` or with one GPU on the host.
    """
    entry = str(index)
    if visible is not None and visible.strip():
        entries = [e.strip() for e in visible.split(",")]
        entry = entries[index] if index < len(entries) else str(index)
    if not entry.isdigit():
        return entry
    if (order or "").strip().upper() != PCI_BUS_ORDER and host_gpus > 1:
        return None
    return int(entry)


def pci_bus_id(device: torch.device) -> str | None:
    """The PCI bus id of a CUDA device as NVML writes it (``00000000:01:00.0``), if torch knows it."""
    import torch

    props = torch.cuda.get_device_properties(device)
    try:
        domain, bus, dev = props.pci_domain_id, props.pci_bus_id, props.pci_device_id  # type: ignore[attr-defined]
    except AttributeError:
        return None
    return f"{domain:08x}:{bus:02x}:{dev:02x}.0"


def load_nvml() -> tuple[Any, str]:
    """The ``pynvml`` module, initialized, or None and why not."""
    try:
        import pynvml
    except ImportError:
        return None, "no GPU utilization: pynvml is not installed (pip install 'pytest-trainperf[nvml]')"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"no GPU utilization: NVML is not available ({nvml_error(exc)})"
    return pynvml, ""


def torch_uuid(device: torch.device) -> str | None:
    """The device's UUID as NVML writes it (``GPU-8f2c...``, ``MIG-...``), if torch knows it."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def find_handle(nvml: Any, device: torch.device) -> tuple[object | None, str]:
    """NVML's handle of the CUDA ``device`` (by PCI bus id, UUID, then index where the numbering is
    NVML's), or None and why not."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = torch.device("cuda", index)
    bus = pci_bus_id(cuda)
    if bus is not None:  # the PCI bus id names the same GPU for CUDA and NVML, whatever the ordering
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(bus), ""
        except nvml.NVMLError:
            pass
    uuid = torch_uuid(cuda)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid), ""
        except nvml.NVMLError:
            pass
    try:
        host_gpus = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        host_gpus = 2  # unknown: do not trust an index
    ident = nvml_id(index, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER"), host_gpus)
    if ident is None:
        return None, (f"NVML cannot find {device}: no PCI bus id or UUID from torch, and CUDA numbers GPUs "
                      f"fastest first (CUDA_DEVICE_ORDER is not {PCI_BUS_ORDER}) while NVML numbers them by bus")
    try:
        return (nvml.nvmlDeviceGetHandleByIndex(ident) if isinstance(ident, int)
                else nvml.nvmlDeviceGetHandleByUUID(ident)), ""
    except nvml.NVMLError as exc:
        return None, f"NVML cannot find {device} (bus id {bus}, NVML id {ident!r}: {nvml_error(exc)})"


def open_sampler(device: torch.device, nvml: Any = None) -> tuple[NvmlSampler | None, str]:
    """A sampler of the CUDA ``device`` (NVML initialized; :meth:`NvmlSampler.close` shuts it down), or
    None and a one-line note saying why there is none."""
    if nvml is None:
        nvml, note = load_nvml()
        if nvml is None:
            return None, note
    handle, why = find_handle(nvml, device)
    if handle is None:
        nvml.nvmlShutdown()
        return None, f"no GPU utilization: {why}"
    return NvmlSampler(nvml, handle), ""


def mig_enabled(nvml: Any, handle: object) -> tuple[bool | None, str]:
    """Whether the GPU of ``handle`` is in MIG mode (None and why where NVML cannot say); a GPU
    without MIG (``NVMLError_NotSupported``) is not."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError as exc:
        cls = getattr(nvml, "NVMLError_NotSupported", None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return False, ""
        return None, f"MIG mode unknown: nvmlDeviceGetMigMode failed ({nvml_error(exc)})"
    return int(current) == int(getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)), ""


def mig_mode(device: torch.device, nvml: Any = None) -> tuple[bool | None, str]:
    """Whether the CUDA ``device`` is a MIG slice, as NVML says (None and why where it cannot)."""
    own = nvml is None
    if own:
        nvml, note = load_nvml()
        if nvml is None:
            return None, note
    try:
        handle, why = find_handle(nvml, device)
        return mig_enabled(nvml, handle) if handle is not None else (None, why)
    finally:
        if own:
            nvml.nvmlShutdown()


@functools.lru_cache(maxsize=1)
def driver_version() -> str:
    """The NVIDIA driver version NVML reports (``550.54.15``), or ``""`` without NVML."""
    nvml, _ = load_nvml()
    if nvml is None:
        return ""
    try:
        version = nvml.nvmlSystemGetDriverVersion()
    except nvml.NVMLError:
        return ""
    finally:
        nvml.nvmlShutdown()
    return version.decode() if isinstance(version, bytes) else str(version)


# ------------------------------------------------------------------ CPU


class CpuUtilization:
    """The process's CPU utilization between :meth:`start` and :meth:`stop`: two clock reads each."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._cpu = self._wall = 0.0

    def start(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def stop(self) -> Metric | None:
        """``cpu_utilization``: CPU time / wall time / threads, percent (None if no time passed)."""
        cpu, wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        if wall <= 0:
            return None
        return Metric("cpu_utilization", 100.0 * cpu / wall / self._threads, PERCENT, Direction.HIGHER_IS_BETTER)


# ------------------------------------------------------------------ what the fixture uses


class Probe:
    """Utilization across the timed steps of one cell, as a context manager around the whole
    measurement: entering opens NVML (before the instrumented and warm-up steps), :meth:`start` opens
    the window right before the first timed step (a drain and a thread start, or two clock reads),
    leaving closes it (also when a step raised) into :attr:`metrics` and :attr:`notes`."""

    def __init__(self, device: torch.device, threads: int, enabled: bool = True) -> None:
        self._device = device
        self._threads = threads
        self._enabled = enabled
        self._cpu: CpuUtilization | None = None
        self._nvml: NvmlSampler | None = None
        self._started = False
        self.metrics: list[Metric] = []
        """The utilization metrics of the window (none if it never opened)."""
        self.notes: list[str] = []
        """One-line notes for the session summary (no NVML, device-wide figures, too few samples)."""

    def __enter__(self) -> Probe:
        if not self._enabled:
            return self
        if self._device.type == "cpu":
            self._cpu = CpuUtilization(self._threads)
        elif self._device.type == "cuda":
            self._nvml, note = open_sampler(self._device)
            if note:
                self.notes.append(note)
        return self

    def start(self) -> None:
        """Open the window (called once, right before the first timed step)."""
        self._started = True
        if self._cpu is not None:
            self._cpu.start()
        if self._nvml is not None:
            try:
                self._nvml.start()
            except Exception as exc:  # never fail a measurement for a utilization figure
                self.notes.append(f"no GPU utilization: NVML sampling failed to start ({type(exc).__name__}: {exc})")
                self._close()

    def __exit__(self, *exc_info: object) -> None:
        if self._started and self._cpu is not None:
            cpu = self._cpu.stop()
            if cpu is not None:
                self.metrics.append(cpu)
        if self._started and self._nvml is not None:
            result = self._nvml.stop()
            self.metrics += result.metrics()
            if result.note:
                self.notes.append(result.note)
        self._close()

    def _close(self) -> None:
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            try:
                nvml.close()
            except Exception:  # a failed shutdown changes nothing measured
                pass
