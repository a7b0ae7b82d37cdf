"""The device a cell measures on: resolved, checked, made current; and how its steps are timed there.

**Which device.** :func:`select_device` turns ``--trainperf-device`` (or this xdist worker's one of
``--trainperf-devices``) into a ``torch.device``, checks that its backend is available and that
``cuda:N`` (``xpu:N``) exists, and makes it the process's current device, before any other CUDA call
of the cell: a worker given ``cuda:3`` opens its context on GPU 3 only, and ``torch.device("cuda")``
in the test means that GPU.

**How it is timed.** :func:`choose_timing` decides, from the device type and the APIs the installed
torch has (:class:`Apis`), how a step is timed to completion (a pure function, tested without the
hardware); :func:`timing_plan` reads those APIs off torch. The device-generic APIs are preferred
where torch has them and the device is torch's current accelerator: ``torch.accelerator.synchronize``
(torch 2.6), ``torch.accelerator.device_index`` (2.8), ``torch.accelerator.current_stream`` (2.6) and
``torch.Event`` (2.4); elsewhere the backend's own (``torch.cuda.synchronize``, ``torch.cuda.Event``,
``torch.cuda.device``, ``torch.cuda.current_stream``...), which torch 2.1 has.

- CPU: the host clock; nothing is queued.
- CUDA, XPU: a pair of timing events per step, recorded on the device's current stream under the
  device's context, and a synchronization at the end of every step (the sample is the device's own
  clock from the step's start to its last kernel's end).
- MPS, and any other accelerator torch can synchronize: the host clock from the step's start to the
  end of the synchronization that ends each step (the device is idle when a step starts, since the
  previous one was synchronized, so this is the step's time to completion, launch overhead included).
- A device torch cannot synchronize from Python: refused (:class:`DeviceError`), since its step time
  would be the time to queue the work.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EVENT_BACKENDS = ("cuda", "xpu")
"""Device types whose timing events measure the device's own time between two points of a stream."""
INDEXED_BACKENDS = ("cuda", "xpu")
"""Device types with several numbered devices (``cuda:N``): the index is checked against the count."""


class DeviceError(ValueError):
    """A device that cannot be measured on: unavailable, absent, or not timeable. The message names
    the option, the value received and what was expected."""


class Clock(enum.Enum):
    """What a step's time is read from."""

    HOST = "host"
    """``time.perf_counter_ns`` around the step (the CPU: nothing is queued)."""
    HOST_SYNCED = "host-synced"
    """The host clock from the step's start to the end of the device synchronization that ends it."""
    EVENTS = "events"
    """Two timing events on the device's current stream, read after the synchronization that ends the step."""


class Api(enum.Enum):
    """Which family of torch calls reaches the device."""

    NONE = "none"
    """Nothing to call (the CPU)."""
    GENERIC = "generic"
    """``torch.accelerator`` / ``torch.Event``: the device is torch's current accelerator."""
    BACKEND = "backend"
    """The backend's own module: ``torch.cuda``, ``torch.xpu``, ``torch.mps``."""


@dataclass(frozen=True)
class Apis:
    """What the installed torch offers for one device type (read by :func:`timing_plan`)."""

    accelerator: bool
    """``torch.accelerator`` exists and the device type is its current accelerator."""
    generic_event: bool
    """``torch.Event`` exists (device-generic timing events)."""
    accelerator_context: bool
    """``torch.accelerator.device_index`` exists (a context manager making a device index current)."""
    backend_sync: bool
    """``torch.<type>.synchronize`` exists."""
    backend_event: bool
    """``torch.<type>.Event`` exists."""
    backend_context: bool
    """``torch.<type>.device`` exists (a context manager making a device current)."""


@dataclass(frozen=True)
class TimingPlan:
    """How the steps of one device type are timed."""

    device_type: str
    """``cpu``, ``cuda``, ``mps``, ``xpu``..."""
    clock: Clock
    """What a step's time is read from."""
    sync: Api
    """Which synchronize call ends every step (:attr:`Api.NONE` on the CPU)."""
    events: Api
    """Which timing events (:attr:`Api.NONE` unless :attr:`clock` is :attr:`Clock.EVENTS`)."""
    context: Api
    """Which context manager makes the device current around the steps (:attr:`Api.NONE`: none needed)."""


def choose_timing(device_type: str, apis: Apis) -> TimingPlan:
    """How to time steps on ``device_type`` with the APIs in ``apis``; :class:`DeviceError` if they
    cannot be timed to completion."""
    if device_type == "cpu":
        return TimingPlan(device_type, Clock.HOST, Api.NONE, Api.NONE, Api.NONE)
    if apis.accelerator:
        sync = Api.GENERIC
    elif apis.backend_sync:
        sync = Api.BACKEND
    else:
        raise DeviceError(f"cannot time steps on {device_type}: this torch has neither torch.accelerator for "
                          f"{device_type} nor torch.{device_type}.synchronize, so the step time would be the "
                          "time to queue the work, not to do it; measure on cpu or cuda, or upgrade torch")
    context = Api.NONE
    if device_type in INDEXED_BACKENDS:
        context = (Api.GENERIC if apis.accelerator and apis.accelerator_context
                   else Api.BACKEND if apis.backend_context else Api.NONE)
    events = Api.NONE
    if device_type in EVENT_BACKENDS:
        events = (Api.GENERIC if apis.accelerator and apis.generic_event
                  else Api.BACKEND if apis.backend_event else Api.NONE)
    clock = Clock.EVENTS if events is not Api.NONE else Clock.HOST_SYNCED
    return TimingPlan(device_type, clock, sync, events, context)


def _module(device_type: str) -> Any:
    """``torch.cuda``, ``torch.xpu``, ``torch.mps``... or None."""
    import torch

    return getattr(torch, device_type, None)


def accelerator_type() -> str | None:
    """The type of torch's current accelerator (``cuda``, ``mps``, ``xpu``...), None without one or
    without ``torch.accelerator`` (torch < 2.6)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:
        return None
    try:
        if not accelerator.is_available():
            return None
        current = accelerator.current_accelerator()
    except RuntimeError:
        return None
    return None if current is None else str(current.type)


def apis_of(device_type: str) -> Apis:
    """What the installed torch offers for ``device_type``."""
    import torch

    module = _module(device_type)
    generic = accelerator_type() == device_type
    return Apis(
        accelerator=generic,
        generic_event=hasattr(torch, "Event"),
        accelerator_context=generic and hasattr(torch.accelerator, "device_index"),
        backend_sync=callable(getattr(module, "synchronize", None)),
        backend_event=isinstance(getattr(module, "Event", None), type),
        backend_context=callable(getattr(module, "device", None)),
    )


def timing_plan(device: torch.device) -> TimingPlan:
    """How steps on ``device`` are timed by the installed torch (:class:`DeviceError` if they cannot be)."""
    return choose_timing(device.type, apis_of(device.type))


def device_index(device: torch.device) -> int | None:
    """The device's index: its own, else the backend's current one; None for the CPU and MPS."""
    if device.index is not None:
        return device.index
    if device.type not in INDEXED_BACKENDS:
        return None
    return int(_module(device.type).current_device())


def synchronizer(device: torch.device, plan: TimingPlan | None = None) -> Callable[[], None]:
    """A function that waits until every kernel queued on ``device`` has finished (a no-op on the CPU)."""
    import torch

    plan = plan or timing_plan(device)
    if plan.sync is Api.NONE:
        return lambda: None
    if plan.sync is Api.GENERIC:
        return lambda: torch.accelerator.synchronize(device)
    sync = _module(device.type).synchronize
    if device.type == "mps":  # one device, no argument before torch 2.x's device-generic API
        return lambda: sync()
    return lambda: sync(device)


def current_stream(device: torch.device, plan: TimingPlan) -> Any:
    """The current stream of ``device`` (where its next kernels go), None where events are not used."""
    import torch

    if plan.events is Api.NONE:
        return None
    if plan.events is Api.GENERIC:
        return torch.accelerator.current_stream(device)
    return _module(device.type).current_stream(device)


def timing_events(device: torch.device, plan: TimingPlan, count: int) -> list[tuple[Any, Any]]:
    """A pair of timing events per step (created before the loop); none unless the plan uses events."""
    import torch

    if plan.events is Api.NONE:
        return []
    if plan.events is Api.GENERIC:
        def make() -> Any:
            return torch.Event(device=device, enable_timing=True)
    else:
        event = _module(device.type).Event

        def make() -> Any:
            return event(enable_timing=True)
    return [(make(), make()) for _ in range(count)]


def on_device(device: torch.device, plan: TimingPlan | None = None) -> Any:
    """A context manager making ``device`` current for its body (a no-op where none is needed)."""
    import torch

    plan = plan or timing_plan(device)
    index = device_index(device)
    if plan.context is Api.NONE or index is None:
        return nullcontext()
    if plan.context is Api.GENERIC:
        return torch.accelerator.device_index(index)
    return _module(device.type).device(index)


# ------------------------------------------------------------------ selecting the device


def missing_device(device_type: str, index: int | None, count: int) -> str:
    """Why ``<device_type>:<index>`` cannot be used when torch sees ``count`` such devices ("" if it can)."""
    if index is None or device_type not in INDEXED_BACKENDS or index < count:
        return ""
    have = (f"{device_type}:0 to {device_type}:{count - 1}" if count > 1
            else f"{device_type}:0 only" if count else "none")
    return f"{device_type}:{index} does not exist: torch sees {count} {device_type} device(s) ({have})"


def select_device(wanted: str, option: str) -> torch.device:
    """The device named ``wanted`` (``auto``: CUDA if available, else the CPU), checked and made
    current; ``option`` (``--trainperf-device=cuda:1``) names where the value came from in errors."""
    import torch

    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(wanted)
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else _module(device.type)
    if backend is None or not backend.is_available():
        raise DeviceError(f"{option}, but torch.{device.type}.is_available() is False (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda})")
    if device.type in INDEXED_BACKENDS:
        missing = missing_device(device.type, device.index, int(_module(device.type).device_count()))
        if missing:
            raise DeviceError(f"{option}: {missing}")
    plan = timing_plan(device)
    _make_current(device, plan)
    return device


def _make_current(device: torch.device, plan: TimingPlan) -> None:
    """Make ``device`` the process's current device (before any other call opens a context elsewhere)."""
    import torch

    if device.index is None or device.type not in INDEXED_BACKENDS:
        return
    if plan.sync is Api.GENERIC and hasattr(torch.accelerator, "set_device_index"):
        torch.accelerator.set_device_index(device.index)
    else:
        _module(device.type).set_device(device.index)

