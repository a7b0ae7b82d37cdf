"""The ``trainperf`` fixture: what a test calls to train, run and record.

torch is imported inside the methods, never at import of this module.
"""

from __future__ import annotations

import functools
import math
import numbers
import statistics
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from pytest_trainperf.records import Cell, Direction, Fingerprint, Measurement, Metric, Outcome, RankInfo, Scalar
from pytest_trainperf.settings import METRIC_RE, Settings
from pytest_trainperf.stats import BUILTIN_METRICS

if TYPE_CHECKING:
    import torch

    from pytest_trainperf.judge import Retimed
    from pytest_trainperf.measure.memory import Preexisting
    from pytest_trainperf.measure.mfu import DevicePeaks
    from pytest_trainperf.measure.timing import Timed

DEFAULT_WARMUP = 3
"""Warm-up steps before the timed ones when the test does not say."""
CONFIRM_WARMUP = 1
"""Untimed steps before a re-measurement (after its garbage collection)."""
RETIMED = "re-timed to confirm a timing regression, and the re-timing is invalid (neither confirmed nor cleared)"
"""How the failure of a cell whose confirmation re-timing compiled begins (the reason follows)."""
RATE_DIGITS = 9
"""Significant digits kept of a throughput sample (step times are exact nanoseconds)."""
FORECAST_TRAIN_STEPS = 2
"""Training steps a forecast runs: the second holds the optimizer state the first created."""
FORECAST_RUN_CALLS = 1
"""Calls of an inference function a forecast runs."""
FORECAST_METRIC = "peak_memory_forecast"
"""The metric of a forecast: the peak CUDA memory of the step, in bytes."""
FORECAST_REFUSED = ("tp.forecast: the step cannot run on the meta device: it needs tensor values, which meta "
                    "tensors do not have, or an op has no meta kernel (forecast a step without .item(), "
                    ".tolist(), bool(tensor), nonzero, boolean-mask indexing or unique, or measure it on a real "
                    "device)")
"""The start of the failure of a forecast whose step needs data."""


class Timer(Protocol):
    """What times the steps of a cell: :func:`~pytest_trainperf.measure.timing.time_steps` or a stand-in."""

    def __call__(self, fn: Callable[[], Any], count: int, device: torch.device,
                 keep: Callable[[Any], object] | None = None, warmup: int = 0, settle: bool = True,
                 on_timed: Callable[[], None] | None = None) -> Timed:
        ...


class Step(Protocol):
    """A training step: runs forward, backward and the optimizer, returns the loss."""

    def __call__(self) -> Any:  # a 0-d tensor or a float
        ...


def _usage(cell: Cell, message: str) -> None:
    """Fail the test with a message naming the cell (no traceback into the plugin)."""
    pytest.fail(f"{cell.nodeid}: {message}", pytrace=False)


def _check_count(cell: Cell, call: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _usage(cell, f"{call}({name}={value!r}): expected an integer >= {minimum}")
    assert isinstance(value, int)
    return value


def _check_items(cell: Cell, call: str, name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        _usage(cell, f"{call}({name}={value!r}): expected a positive number or None")
    return float(value)  # type: ignore[arg-type]


class TrainPerf:
    """The ``trainperf`` fixture of one cell: ``.device``, ``.params``, ``.train``, ``.run``, ``.record``.

    Without ``--trainperf`` the test runs as a quick functional test: ``train`` and ``run`` call the
    step once, check what it returns, and measure nothing.
    """

    def __init__(self, cell: Cell, settings: Settings, malloc: str = "", timing_only: bool = False,
                 memory_budget: int | None = None, forecast: Forecasting | None = None,
                 rank: RankInfo | None = None) -> None:
        self._cell = cell
        self._forecast = forecast
        self._rank = rank
        self._timing_only = timing_only
        self._budget = memory_budget
        self._started = time.perf_counter()
        self._settings = settings
        self._malloc = malloc
        self._device: torch.device | None = None
        self._measured: Measurement | None = None
        self._recorded: list[Metric] = []
        self._info: dict[str, Scalar] = {}
        self._used = ""
        self._threads: int | None = None
        self._preexisting: Preexisting | None = None
        self._retime: Callable[[], list[Metric]] | None = None
        self._cudnn_benchmark = ""
        self._peaks: DevicePeaks | None = None
        self._notes: dict[str, None] = {}
        self._peak_precision = ""
        self._timer: Timer | None = None
        self._confirm: Callable[[TrainPerf], Retimed] | None = None
        self._confirmed: Retimed | None = None

    def begin(self, records_only: bool = False) -> None:
        """Called by the fixture before the test body under ``--trainperf``: resolve the device and
        note the tensors already alive, which this cell's peak memory leaves out; not for a test that
        can only ``record`` (:func:`records_only`): that snapshot scans every object of the process."""
        from pytest_trainperf.measure.memory import Preexisting

        self._started = time.perf_counter()
        if self._forecast is not None:  # a forecast counts what its step reaches on meta, nothing else
            return
        if not self._timing_only and not records_only:  # a noise round measures no memory
            self._preexisting = Preexisting(self.device)

    # ------------------------------------------------------------------ what the test sees

    @property
    def device(self) -> torch.device:
        """The device to measure on (``--trainperf-device``, or this xdist worker's one of
        ``--trainperf-devices``; default CUDA if available, else CPU), checked and made current."""
        if self._device is None and self._forecast is not None:
            import torch

            self._device = torch.device("meta")
        if self._device is None:
            from pytest_trainperf.measure.device import DeviceError, select_device

            wanted, devices = self._settings.device, self._settings.devices
            option = (f"--trainperf-devices={','.join(devices)} (this worker's: {wanted})" if devices
                      else f"--trainperf-device={wanted}")
            error = ""
            try:
                self._device = select_device(self._rank_device(wanted), option)
            except DeviceError as exc:
                error = str(exc)
            if error:  # outside the handler: the failure reads as one message, not a chained traceback
                _usage(self._cell, error)
        assert self._device is not None
        return self._device

    def _rank_device(self, wanted: str) -> str:
        """A rank's device: on an accelerator without an index, the one of its local rank."""
        if self._rank is None or ":" in wanted or wanted == "cpu":
            return wanted
        if wanted == "auto":
            import torch

            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        return wanted if wanted == "cpu" else f"{wanted}:{self._rank.local_rank}"

    @property
    def rank(self) -> int:
        """This process's rank in a distributed cell (``tp.ranks``); 0 in any other cell."""
        return self._rank.rank if self._rank is not None else 0

    @property
    def world_size(self) -> int:
        """The ranks of a distributed cell (``tp.ranks``); 1 in any other cell."""
        return self._rank.world_size if self._rank is not None else 1

    @property
    def params(self) -> Mapping[str, Scalar]:
        """This cell's axis values, e.g. ``{"batch_size": 4, "seq_len": 16}``."""
        return dict(self._cell.params)

    @property
    def enabled(self) -> bool:
        """True under ``--trainperf`` (measuring); False in a plain run (one functional step)."""
        return self._settings.enabled

    def train(self, step: Step, *, steps: int, warmup: int = DEFAULT_WARMUP,
              items_per_step: float | None = None) -> Measurement | None:
        """Measure a training step: step time, throughput, peak memory, FLOPs and the loss.

        ``step()`` must return the loss (a 0-d tensor or a float). The step runs once under the FLOP
        counter, once under the memory tracker, ``warmup`` times, then ``steps`` timed times; the
        loss of every call makes the loss curve, and the last one is the gated ``loss``. Returns the
        measurement under ``--trainperf``, None in a plain run.
        """
        call = "trainperf.train"
        steps = _check_count(self._cell, call, "steps", steps, 1)
        warmup = _check_count(self._cell, call, "warmup", warmup, 0)
        items = _check_items(self._cell, call, "items_per_step", items_per_step)
        self._claim(call)
        if self._forecast is not None:
            return self._forecast_run("train", step, FORECAST_TRAIN_STEPS)
        if not self._settings.enabled:
            self._check_losses([self._loss(step())], call)
            return None
        return self._measure("train", step, steps, warmup, items)

    def run(self, fn: Callable[[], object], *, iters: int, warmup: int = DEFAULT_WARMUP,
            items_per_call: float | None = None) -> Measurement | None:
        """Measure inference latency of ``fn()``: step time (per call), throughput, memory, FLOPs."""
        call = "trainperf.run"
        iters = _check_count(self._cell, call, "iters", iters, 1)
        warmup = _check_count(self._cell, call, "warmup", warmup, 0)
        items = _check_items(self._cell, call, "items_per_call", items_per_call)
        self._claim(call)
        if self._forecast is not None:
            return self._forecast_run("run", fn, FORECAST_RUN_CALLS)
        if not self._settings.enabled:
            fn()
            return None
        return self._measure("run", fn, iters, warmup, items)

    def record(self, name: str, value: float, *, unit: str = "", higher_is_better: bool = False,
               tolerance: float | None = None) -> None:
        """Record a metric of your own (e.g. a test-set loss), stored and compared like the built-ins."""
        where = f"trainperf.record({name!r}, ...)"
        if not isinstance(name, str) or not METRIC_RE.match(name) or name in BUILTIN_METRICS:
            _usage(self._cell, f"{where}: expected a metric name (letters, digits, _ or .) other than "
                               f"the built-in {', '.join(BUILTIN_METRICS)}, got {name!r}")
        if any(m.name == name for m in self._recorded):
            _usage(self._cell, f"{where}: metric {name!r} recorded twice in one cell")
        if not isinstance(unit, str):
            _usage(self._cell, f"{where}: expected unit to be a string such as 's' or '', got {unit!r:.80}")
        try:
            number = self._number(value)
        except (OverflowError, TypeError, ValueError, RuntimeError):  # 10**400, a complex tensor
            number = None
        if number is None or not math.isfinite(number):
            _usage(self._cell, f"{where}: expected a finite number or 0-d tensor, got {value!r:.80}")
        if tolerance is not None and (isinstance(tolerance, bool)
                                      or not isinstance(tolerance, numbers.Real)
                                      or math.isnan(tolerance) or tolerance < 0):
            _usage(self._cell, f"{where}: expected tolerance to be a non-negative number or None, "
                               f"got {tolerance!r}")
        assert number is not None
        direction = Direction.HIGHER_IS_BETTER if higher_is_better else Direction.LOWER_IS_BETTER
        self._recorded.append(Metric(name=name, value=number, unit=unit, direction=direction,
                                     tolerance=None if tolerance is None else float(tolerance)))

    def info(self, **values: Scalar) -> None:
        """Free-form metadata of this cell (``trainperf.info(model="gpt2", tokens=412)``: strings,
        numbers, booleans): shown in the JSON results, the CSV and the Markdown report, never judged,
        not stored with the baseline. A key given again takes the later value."""
        from pytest_trainperf.records import info_problem

        for key, value in values.items():
            problem = info_problem(key, value)
            if problem is not None:
                _usage(self._cell, f"trainperf.info({key}=...): {problem.split(': ', 1)[1]}")
            self._info[key] = value

    # ------------------------------------------------------------------ what the plugin reads

    @property
    def cell(self) -> Cell:
        """The cell this fixture serves."""
        return self._cell

    @property
    def timing_only(self) -> bool:
        """True in a noise round of an update: only the timed steps run (no FLOP or memory step)."""
        return self._timing_only

    @property
    def elapsed(self) -> float:
        """Seconds since this cell's measurement began."""
        return time.perf_counter() - self._started

    @property
    def deadline(self) -> float:
        """The ``time.perf_counter()`` past which adaptive measurement stops (``--trainperf-max-time``)."""
        return self._started + self._settings.max_time

    def result(self) -> Measurement | None:
        """Everything measured and recorded in this cell; None if nothing was."""
        if self._measured is None and not self._recorded:
            return None
        base = self._measured or Measurement(test=self._cell.test, cell=self._cell.cell,
                                             params=self._cell.params, metrics=(), kind="record")
        derived = tuple(self._mfu(base))
        return replace(base, metrics=base.metrics + derived + tuple(self._recorded), info=tuple(self._info.items()))

    def out_of_memory(self, detail: str, outcome: Outcome = Outcome.OOM) -> Measurement:
        """Record that the cell ran out of memory (the plugin calls this once the error is gone):
        the measurement keeps what was recorded before, and nothing is re-timed."""
        kind = "run" if self._used == "trainperf.run" else "train"
        self._measured = Measurement(test=self._cell.test, cell=self._cell.cell, params=self._cell.params,
                                     metrics=(), kind=kind, outcome=outcome, detail=detail)
        self._retime = None
        return self.result()  # type: ignore[return-value]

    def retime(self) -> Measurement | None:
        """Time the measured step again (same count, threads, device); None if nothing was timed.

        Returns the cell's measurement with fresh ``step_time``/``throughput`` samples and every other
        metric as first measured. Used to confirm a timing regression before it fails the cell.
        """
        if self._retime is None or self._measured is None:
            return None
        fresh = {m.name: m for m in self._retime()}
        self._measured = replace(self._measured, metrics=tuple(fresh.get(m.name, m)
                                                                for m in self._measured.metrics))
        return self.result()

    @property
    def notes(self) -> tuple[str, ...]:
        """One-line notes for the session summary, e.g. why ``mfu`` or GPU utilization is missing."""
        return tuple(self._notes)

    def confirm_with(self, confirm: Callable[[TrainPerf], Retimed]) -> None:
        """Confirm a timing regression inside the test's lifetime: once ``train``/``run`` has measured,
        and before it returns to the test, ``confirm(self)`` judges the measurement against the stored
        baseline and re-times the step (:meth:`retime`) while its timings regress. Everything the step
        uses (a process group, a data loader, a framework's trainer) is still alive then; after the
        test body it may not be."""
        self._confirm = confirm

    @property
    def confirmed(self) -> Retimed | None:
        """How the timings were confirmed inside the test (None: no confirmation ran there)."""
        return self._confirmed

    def use_timer(self, timer: Timer) -> None:
        """Time the steps of ``train``/``run`` with ``timer`` instead of
        :func:`~pytest_trainperf.measure.timing.time_steps` (same arguments, same result): the lockstep
        child of ``--trainperf-against`` times one step whenever its parent says so."""
        self._timer = timer

    def add_metric(self, metric: Metric) -> None:
        """Add a metric the plugin measured around the cell rather than in its step (``peak_rss`` of an
        isolated cell's process); unlike :meth:`record`, built-in names are the point."""
        self._recorded.append(metric)

    def fingerprint(self) -> Fingerprint:
        """The environment of this cell's measurement (device, torch, CUDA, threads, CPU)."""
        import torch

        if self._forecast is not None:
            from pytest_trainperf.env import forecast_fingerprint

            return forecast_fingerprint()

        from pytest_trainperf.env import fingerprint
        from pytest_trainperf.measure.timing import default_threads

        cudnn = self._cudnn_benchmark or ("on" if torch.backends.cudnn.benchmark else "off")
        return fingerprint(self.device, self._threads or self._settings.threads or default_threads(),
                           self._malloc, cudnn)

    # ------------------------------------------------------------------ inside

    def _claim(self, call: str) -> None:
        if self._used:
            _usage(self._cell, f"{call} called after {self._used} in the same cell; expected one "
                               "train or run per cell (spread variants over a tp.grid axis)")
        self._used = call

    @staticmethod
    def _number(value: object) -> float | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, numbers.Real):
            return float(value)
        numel = getattr(value, "numel", None)
        if callable(numel) and numel() == 1:
            return float(value.detach().reshape(()).item())  # type: ignore[attr-defined]
        if getattr(value, "shape", None) == () and hasattr(value, "item"):
            return float(value.item())
        return None

    def _mfu(self, measured: Measurement) -> list[Metric]:
        """``mfu`` from the measured FLOPs (each precision's share against its own peak) and step time,
        or the total FLOPs against a recorded ``peak_flops``."""
        from pytest_trainperf.measure.mfu import NO_PEAKS, PEAK_METRIC, measured_mfu, mfu

        flops, step = measured.metric("flops"), measured.metric("step_time")
        if flops is None or step is None or not step.value > 0:
            return []
        recorded = next((m.value for m in self._recorded if m.name == PEAK_METRIC), None)
        if recorded is not None and not recorded > 0:
            self._notes.setdefault(f"no mfu in {self._cell.nodeid}: {PEAK_METRIC} recorded as {recorded}, "
                                   "expected FLOP/s > 0")
            return []
        if recorded is not None:
            return [mfu(flops.value, step.value, recorded)]
        metric, note = measured_mfu(measured, self._peaks or NO_PEAKS, self._peak_precision)
        if note:
            self._notes.setdefault(note)
        if metric is not None and metric.value > 100:
            self._notes.setdefault(f"mfu of {self._cell.nodeid} is {metric.value:.0f}% of the table's dense peaks: "
                                   "the step runs faster than the table allows (sparse or lower-precision kernels "
                                   f"the counter cannot see); record the peak that applies: "
                                   f"trainperf.record({PEAK_METRIC!r}, <FLOP/s>)")
        return [metric] if metric is not None else []

    def _loss(self, out: object) -> object:
        """Check one step's return value; keep it cheaply (a detached tensor or a float)."""
        import torch

        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                _usage(self._cell, "the step passed to trainperf.train must return the loss as a 0-d "
                                   f"tensor or a float; got a Tensor of shape {tuple(out.shape)}")
            return out.detach().reshape(())
        number = None if out is None else self._number(out)
        if number is None:
            _usage(self._cell, "the step passed to trainperf.train must return the loss as a 0-d tensor "
                               f"or a float; got {type(out).__name__} {out!r:.80}")
        return number

    def _check_losses(self, kept: list[object], call: str) -> list[float]:
        curve = [float(v) for v in kept]  # type: ignore[arg-type]
        for i, value in enumerate(curve):
            if not math.isfinite(value):
                _usage(self._cell, f"loss diverged: {call} step {i} returned {value}")
        return curve

    def _forecast_run(self, kind: str, fn: Callable[[], object], calls: int) -> Measurement | None:
        """Forecast the CUDA memory of ``calls`` calls of ``fn`` on ``meta``; a plain run forecasts too (the
        check that the step runs there, with the forecast's memo of meta kernels: many of them are slow
        Python functions), and measures nothing."""
        from pytest_trainperf.measure.forecast import NeedsData, forecast_peak

        assert self._forecast is not None
        key = self._forecast.key(self._cell, kind)
        found = self._forecast.memo.get(key)
        if found is None:
            error = ""
            try:
                out, found = forecast_peak(fn, calls)
            except NeedsData as exc:
                error = f"{FORECAST_REFUSED}: {exc}"
            if error:
                _usage(self._cell, error)
            assert found is not None
            if kind == "train":
                self._loss_shape(out)
            del out
            self._forecast.memo[key] = found
        if not self._settings.enabled:  # a plain run: the step ran on meta (the memo makes that quick)
            return None
        return self._forecasted(kind, calls, found)

    def _forecasted(self, kind: str, calls: int, found: Any) -> Measurement:
        from pytest_trainperf.measure.forecast import CATEGORIES
        from pytest_trainperf.records import Breakdown
        from pytest_trainperf.units import format_value

        assert self._forecast is not None
        memory = self._forecast.memory
        parts = tuple((name, float(amount)) for name, amount in found.parts)
        shown = ", ".join(f"{name.replace('_', ' ')} {format_value(amount, 'B')}" for name, amount in parts
                          if amount > 0 and name in CATEGORIES)
        outcome, detail = Outcome.MEASURED, ""
        over = memory is not None and found.peak_bytes > memory
        if over:
            assert memory is not None
            outcome = Outcome.OOM_FORECAST
            detail = (f"forecast peak {format_value(float(found.peak_bytes), 'B')} exceeds the device's "
                      f"{format_value(float(memory), 'B')} ({shown})")
        notes = tuple(f"{self._cell.nodeid}: scaled_dot_product_attention forecast with the {kernel} kernel "
                      f"({count} call(s))" for kernel, count in found.attention if kernel == "math")
        self._measured = Measurement(
            test=self._cell.test, cell=self._cell.cell, params=self._cell.params,
            metrics=(Metric(FORECAST_METRIC, float(found.peak_bytes), "B"),), kind=kind, steps=calls,
            outcome=outcome, detail=detail, notes=notes,
            breakdowns=(Breakdown(FORECAST_METRIC, parts, "B", "parts of the forecast peak that grew"),))
        if over:  # as on that device: the test stops here, as a real out-of-memory error would stop it
            raise ForecastOutOfMemory(detail)
        return self.result()  # type: ignore[return-value]

    def _loss_shape(self, out: object) -> None:
        """A forecast step's loss: a 0-d tensor or a number, whose value meta cannot give."""
        numel = getattr(out, "numel", None)
        if not (isinstance(out, numbers.Real) or (callable(numel) and numel() == 1)):
            _usage(self._cell, "the step passed to trainperf.train must return the loss as a 0-d tensor "
                               f"or a float; got {type(out).__name__} {out!r:.80}")

    def _measure(self, kind: str, fn: Callable[[], object], count: int, warmup: int,
                 items: float | None) -> Measurement:
        from pytest_trainperf.measure.comm import distributed_now
        from pytest_trainperf.measure.compiled import (
            EAGER_NOTE,
            CompileWatch,
            Snapshot,
            eager_step,
            snapshot,
            timed_failure,
        )
        from pytest_trainperf.measure.counting import count_step
        from pytest_trainperf.measure.cudnn import cudnn_benchmark
        from pytest_trainperf.measure.memory import allocator_pressure, measure_peak
        from pytest_trainperf.measure.mfu import device_peaks, precision_in_use
        from pytest_trainperf.measure.timing import default_threads, fixed_threads, time_steps
        from pytest_trainperf.measure.utilization import Probe

        device = self.device
        keep: Callable[[object], object] | None = self._loss if kind == "train" else None
        kept: list[object] = []
        flops = peak = timed = work = None
        threads = self._threads = self._settings.threads or default_threads()
        pressure = allocator_pressure(device)
        policy = self._settings.cudnn_benchmark
        probe = Probe(device, threads, enabled=not self._timing_only)  # utilization over the timed steps
        watch = CompileWatch()  # torch.compile: dynamo reset, its counters read around the cell
        eager = eager_step(fn)  # what the instrumented steps run: torch.compile off, dynamo never sees their modes

        def on_timed() -> None:
            watch.mark_timed()
            probe.start()

        with fixed_threads(threads), cudnn_benchmark(policy) as self._cudnn_benchmark, probe:
            # instrumented steps first, so that the warm-up runs right before the timed steps
            if not self._timing_only:
                # one counting pass: FLOPs, syncs, ops, memory traffic (torch.compile off)
                out, flops, work = count_step(eager, device.type)
                if keep is not None:
                    kept.append(keep(out))
                del out
                if self._preexisting is None:  # not taken at the start (no --trainperf then): take it now
                    from pytest_trainperf.measure.memory import Preexisting

                    self._preexisting = Preexisting(device)
                out, peak = measure_peak(eager, device, self._preexisting)
                if keep is not None:
                    kept.append(keep(out))
                del out
            over = peak is not None and self._budget is not None and peak.peak_bytes > self._budget
            if not over:  # a cell over its budget would not have run: no timing
                timer = self._timer or (ranks_in_step if self._rank is not None else time_steps)
                timed = timer(fn, count, device, keep, warmup, on_timed=on_timed)
        watch.finish()
        if watch.timed_failure:
            _usage(self._cell, watch.timed_failure)
        self._notes.update(dict.fromkeys(probe.notes))
        if not self._timing_only:
            self._peaks = device_peaks(device)
            self._peak_precision = precision_in_use(device)
        curve = (self._check_losses(kept + (timed.kept if timed is not None else []), f"trainperf.{kind}")
                 if keep is not None else [])
        metrics = timing_metrics(timed.samples, items) if timed is not None else []

        def retime() -> list[Metric]:
            marks: list[Snapshot] = []  # dynamo's counters when the re-timed steps start
            with fixed_threads(threads), cudnn_benchmark(policy):
                again = time_steps(fn, count, device, warmup=CONFIRM_WARMUP,
                                   on_timed=lambda: marks.append(snapshot()))
            invalid = timed_failure(marks[0], snapshot()) if marks else ""
            if invalid:  # timings mixing compiled and compiling steps confirm nothing, and clear nothing
                _usage(self._cell, f"{RETIMED}: {invalid}")
            return timing_metrics(again.samples, items)

        self._retime = retime if timed is not None else None
        if peak is not None:
            metrics.append(Metric("peak_memory", float(peak.peak_bytes), "B"))
            if peak.reserved_bytes is not None:
                metrics.append(Metric("reserved_memory", float(peak.reserved_bytes), "B"))
        if flops is not None:
            metrics += flops.metrics()  # flops, and flops_bf16, flops_tf32... by the precision they run in
        if work is not None:
            metrics += work.metrics(float(flops.total) if flops is not None else None)
            if distributed_now():
                metrics += work.comm.metrics()
        metrics += probe.metrics
        compiled = watch.metrics if not self._timing_only else []  # graph_breaks, recompiles...: compiled cells only
        if compiled:
            metrics += compiled
            self._notes.setdefault(EAGER_NOTE)
        if curve and not self._timing_only and timed is not None:
            metrics.append(Metric("loss", curve[-1], "", Direction.EXACT))
        retries, ooms = (after - before for after, before in zip(allocator_pressure(device), pressure, strict=True))
        notes = (f"the CUDA caching allocator flushed its cache {retries} time(s) and recovered from {ooms} "
                 "out-of-memory error(s) during the measurement: the step runs near the memory limit, and "
                 "its timings include that thrashing",) if retries or ooms else ()
        outcome, detail = Outcome.MEASURED, ""
        if over:
            from pytest_trainperf.units import format_value

            assert peak is not None and self._budget is not None
            outcome = Outcome.OOM_EMULATED
            detail = (f"peak memory {format_value(float(peak.peak_bytes), 'B')} exceeds the memory budget of "
                      f"{format_value(float(self._budget), 'B')} (emulated out of memory; not timed)")
        self._measured = Measurement(
            test=self._cell.test, cell=self._cell.cell, params=self._cell.params,
            metrics=tuple(metrics), loss_curve=tuple(curve), kind=kind, steps=count, warmup=warmup,
            outcome=outcome, detail=detail, notes=notes, items_per_step=items,
            breakdowns=(work.breakdowns() + (work.comm.breakdowns() if distributed_now() else ())
                        if work is not None else ()))
        if over:  # as on a device of the budget's size: the test stops here, as a real OOM would stop it
            raise EmulatedOutOfMemory(detail)
        if self._confirm is not None and self._retime is not None and not self._timing_only:
            self._confirmed = self._confirm(self)  # before the test goes on and tears down what the step uses
        return self.result()  # type: ignore[return-value]


RECORD_ONLY_ATTRIBUTES = frozenset({"record", "info"})
"""The fixture's attributes that measure nothing: a test using only these takes no memory snapshot."""
INTROSPECTION = frozenset({"locals", "vars", "eval", "exec", "globals", "_getframe", "currentframe", "stack"})
"""Names through which a function could reach its own arguments without naming them."""


def records_only(function: object, name: str) -> bool:
    """Whether the test ``function`` can only ``record`` with its fixture argument ``name``: every use
    of the argument in its bytecode is ``name.record``, no closure captures it, and the function does
    not reach its own frame. False whenever unsure (a wrapper, another use, a Python whose bytecode
    reads otherwise): the cell then takes its memory snapshot as every cell did."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return code is not None and _records_only(code, name)


@functools.lru_cache(maxsize=1024)
def _records_only(code: types.CodeType, name: str) -> bool:
    """:func:`records_only` of a code object, read once per test function (not once per cell)."""
    import dis

    if name not in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
        return False
    if name in code.co_cellvars or INTROSPECTION & set(code.co_names):
        return False
    instructions = list(dis.get_instructions(code))
    for ins, following in zip(instructions, [*instructions[1:], None], strict=True):
        if not (ins.argval == name or (isinstance(ins.argval, tuple) and name in ins.argval)):
            continue  # an instruction that does not touch the argument (nor a string equal to its name)
        if (ins.opname != "LOAD_FAST" or ins.argval != name or following is None
                or following.opname not in ("LOAD_ATTR", "LOAD_METHOD")
                or following.argval not in RECORD_ONLY_ATTRIBUTES):
            return False
    return True


class EmulatedOutOfMemory(MemoryError):
    """Raised by ``train``/``run`` when the cell's peak memory exceeds its memory budget: the rest of
    the test does not run (a model that never trained records nothing), and the plugin reports the
    cell as ``oom-emulated`` with what was measured."""


class ForecastOutOfMemory(EmulatedOutOfMemory):
    """Raised by ``train``/``run`` of a ``tp.forecast`` cell whose forecast peak exceeds the device's
    memory; the plugin reports the cell as ``oom-forecast``."""


@dataclass
class Forecasting:
    """A ``tp.forecast`` cell: its device's memory and the session's forecasts so far."""

    memory: int | None
    """The device's memory in bytes (None: no device given, only the forecast)."""
    memory_axis: str | None
    """The grid axis of device sizes: cells differing only in it share one forecast."""
    memo: dict[tuple[object, ...], Any] = field(default_factory=dict)
    """The session's forecasts by :meth:`key`."""

    def key(self, cell: Cell, kind: str) -> tuple[object, ...]:
        """What a forecast depends on: the test and its cell's parameters but the device's memory."""
        return (cell.test_file, cell.test, kind, tuple(p for p in cell.params if p[0] != self.memory_axis))


def ranks_in_step(fn: Callable[[], Any], count: int, device: torch.device,
                  keep: Callable[[Any], object] | None = None, warmup: int = 0, settle: bool = True,
                  on_timed: Callable[[], None] | None = None) -> Timed:
    """The timer of a rank of a distributed cell: every timed step starts after a barrier of all ranks
    (outside its clock), so that step ``i`` of every rank is the same step of the job, and the time
    a rank's step takes is its own work since the ranks last met; no leading step is dropped as
    unsettled (the ranks would drop different ones)."""
    import torch.distributed as dist

    from pytest_trainperf.measure.timing import time_steps

    return time_steps(fn, count, device, keep, warmup, settle=False, on_timed=on_timed, between=dist.barrier)


def timing_metrics(samples: list[float], items: float | None) -> list[Metric]:
    """``step_time`` from per-step seconds, and ``throughput`` when the items per step are known."""
    metrics = [Metric("step_time", statistics.median(samples), "s", Direction.LOWER_IS_BETTER, tuple(samples))]
    if items is not None:
        rates = tuple(float(f"{items / s:.{RATE_DIGITS}g}") for s in samples)
        metrics.append(Metric("throughput", statistics.median(rates), "items/s", Direction.HIGHER_IS_BETTER, rates))
    return metrics
