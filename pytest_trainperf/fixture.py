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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from pytest_trainperf.records import Cell, Direction, Fingerprint, Measurement, Metric, Outcome, RankInfo, Scalar
from pytest_trainperf.settings import METRIC_RE, Settings
from pytest_trainperf.stats import BUILTIN_METRICS

if TYPE_CHECKING:
    import torch

    from pytest_trainperf.engine import Engine
    from pytest_trainperf.judge import Retimed
    from pytest_trainperf.measure.flops import FlopCount
    from pytest_trainperf.measure.memory import MemoryPeak, Preexisting
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


Items = float | Callable[[Any], object] | None
"""Items a step (or call) processes: a number, a function of its result (of a ``steps`` step: of its
batch) giving it, or None (no throughput)."""


@dataclass(frozen=True)
class Kept:
    """What is kept of one step: its loss and its items."""

    loss: object
    """The step's loss (a detached 0-d tensor or a float); None when it has none."""
    items: float | None
    """The step's items when they vary by step (a function gave them); None otherwise."""


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


def _check_items(cell: Cell, call: str, name: str, value: object) -> Items:
    if value is None or (callable(value) and not isinstance(value, type)):
        return value  # a function of the step's result, checked on each result
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        _usage(cell, f"{call}({name}={value!r}): expected a positive number, a function of the result giving "
                     "one, or None")
    return float(value)  # type: ignore[arg-type]


class TrainPerf:
    """The ``trainperf`` fixture of one cell: ``.device``, ``.params``, ``.train``, ``.run``, ``.record``,
    and for a loop the test already has ``.step``, ``.steps``, ``.hf_callback`` and ``.lightning_callback``
    (all measured by one :class:`~pytest_trainperf.engine.Engine`).

    Without ``--trainperf`` the test runs as a quick functional test: ``train`` and ``run`` call the
    step once, check what it returns, and measure nothing; ``steps`` yields one batch.
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
        self._retime: Callable[[], list[Metric] | None] | None = None
        self._loop: _Loop | None = None
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
              items_per_step: float | Callable[[Any], object] | None = None) -> Measurement | None:
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
            items_per_call: float | Callable[[Any], object] | None = None) -> Measurement | None:
        """Measure inference latency of ``fn()``: step time (per call), throughput, memory, FLOPs.

        ``items_per_call`` is a number, or a function of the call's result giving the items it processed
        (e.g. the tokens a ``generate`` call actually produced): throughput is then each call's items over
        its time."""
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

    def step(self, *, steps: int, warmup: int = DEFAULT_WARMUP, items: float | None = None) -> StepBlock:
        """Measure a step of the test's own training loop: ``with trainperf.step(steps=20) as step:`` around
        each step, ``step.loss = loss`` inside it to store the loss (without it, no loss is stored).

        The loop's steps map onto the phases of :meth:`train`: the 1st is counted (FLOPs, work), the 2nd
        memory-tracked, the next ``warmup`` warm up and the next ``steps`` are timed, so the loop must run
        ``2 + warmup + steps`` of them (``warmup + steps`` in a noise round); later ones run unmeasured.
        ``steps`` and ``warmup`` must be the same in every call of the loop; ``items`` (this step's
        items, for throughput) may differ. Its timings are not re-timed to confirm a regression: the
        loop belongs to the test (use :meth:`steps` or :meth:`train` for that). In a plain run the
        block measures nothing.
        """
        loop = self._loop_for("trainperf.step", steps, warmup)
        checked = _check_items(self._cell, "trainperf.step", "items", items)
        if callable(checked):
            _usage(self._cell, f"trainperf.step(items={items!r}): expected this step's items as a positive "
                               "number or None (a function of the batch is for trainperf.steps)")
        return StepBlock(self, loop, checked)  # type: ignore[arg-type]  # not callable: checked above

    def steps(self, loader: Iterable[Any], *, steps: int, warmup: int = DEFAULT_WARMUP,
              items: float | Callable[[Any], object] | None = None) -> Steps:
        """Measure the test's own training loop over ``loader``: ``for batch in trainperf.steps(loader,
        steps=20):`` yields the batches and times each step as the wait for its batch (``data_time``)
        plus the loop's body (``compute_time``); ``step_time`` is their sum.

        The phases are those of :meth:`step` (the counted and memory-tracked steps fetch their batch
        outside the instrumentation); the loader is iterated again from its start when it runs out (a
        list, a ``DataLoader``; a one-shot iterator must hold enough batches). A timing regression is
        confirmed before the loop ends, by re-timing further batches (``--trainperf-confirm`` rounds of
        ``1 + steps``). Set ``.loss`` on the returned object inside the loop to store the loss. ``items``
        is a number or a function of the batch. In a plain run it yields one batch and measures nothing.
        """
        call = "trainperf.steps"
        checked = _check_items(self._cell, call, "items", items)
        loop = self._loop_for(call, steps, warmup)
        return Steps(self, loader, loop, checked)

    def hf_callback(self, *, steps: int, warmup: int = DEFAULT_WARMUP, items: float | None = None) -> Any:
        """A ``transformers.TrainerCallback`` measuring the Hugging Face ``Trainer``'s own steps in the thread
        that runs them: ``Trainer(..., callbacks=[trainperf.hf_callback(steps=10)])``. A step is an optimizer
        step (gradient accumulation, clipping, optimizer and ``zero_grad`` included); ``max_steps`` must be
        at least ``2 + warmup + steps`` (:mod:`pytest_trainperf.integrations.huggingface`)."""
        error = ""
        try:
            from pytest_trainperf.integrations.huggingface import TrainPerfCallback
        except ImportError as exc:
            error = str(exc)
        if error:
            from pytest_trainperf.integrations import MISSING

            _usage(self._cell, MISSING.format(call="hf_callback", framework="Hugging Face", package="transformers",
                                              error=error))
        return TrainPerfCallback(self, steps=steps, warmup=warmup, items=items)

    def lightning_callback(self, *, steps: int, warmup: int = DEFAULT_WARMUP,
                           items: float | Callable[[Any], float] | None = None) -> Any:
        """A ``lightning.pytorch.Callback`` measuring Lightning's own training steps in the thread that runs
        them: ``Trainer(..., callbacks=[trainperf.lightning_callback(steps=10)])``. A step is an optimizer
        step (gradient accumulation, clipping, optimizer and ``zero_grad`` included); ``max_steps`` must be
        at least ``2 + warmup + steps``; ``items`` may be a function of a batch
        (:mod:`pytest_trainperf.integrations.lightning`)."""
        error = ""
        try:
            from pytest_trainperf.integrations.lightning import TrainPerfCallback
        except ImportError as exc:
            error = str(exc)
        if error:
            from pytest_trainperf.integrations import MISSING

            _usage(self._cell, MISSING.format(call="lightning_callback", framework="Lightning", package="lightning",
                                              error=error))
        return TrainPerfCallback(self, steps=steps, warmup=warmup, items=items)

    def _loop_for(self, call: str, steps: int, warmup: int) -> _Loop | None:
        """This cell's measured loop, begun at its first step; None in a plain run."""
        loop = self._loop
        if loop is not None and loop.call == call == "trainperf.step":
            if (steps, warmup) != (loop.engine.count, loop.engine.warmup):
                _usage(self._cell, f"{call}(steps={steps!r}, warmup={warmup!r}): expected the same steps and warmup "
                                   f"in every step of the loop; its first step gave steps={loop.engine.count}, "
                                   f"warmup={loop.engine.warmup}")
            return loop
        steps = _check_count(self._cell, call, "steps", steps, 1)
        warmup = _check_count(self._cell, call, "warmup", warmup, 0)
        if not (call == "trainperf.step" and self._used == call):  # step is called once per step of its loop
            self._claim(call)
        if self._forecast is not None:
            _usage(self._cell, f"{call}: a tp.forecast cell runs its step on the meta device; expected "
                               "trainperf.train or trainperf.run there")
        if not self._settings.enabled:
            return None
        if self._timer is not None:
            _usage(self._cell, f"{call}: a lockstep comparison (--trainperf-against) times steps the plugin "
                               "calls; expected trainperf.train or trainperf.run in a cell compared that way")
        from pytest_trainperf.measure.memory import allocator_pressure

        engine = self._engine(steps, warmup)
        self._loop = _Loop(call, engine, allocator_pressure(engine.device))
        return self._loop

    def _loop_begin(self, loop: _Loop) -> bool:
        """A step of ``loop`` begins; False when it is not measured (the measurement is over)."""
        if loop.complete or loop.failed:
            return False
        loop.engine.begin()
        return True

    def _loop_end(self, loop: _Loop, loss: object, items: Items, out: object) -> None:
        """A step of ``loop`` ended (its clock stopped first); keep its loss and items; complete the
        measurement after its last step."""
        from pytest_trainperf.engine import Phase

        loop.engine.end()
        kept = Kept(None if loss is None else self._loss(loss, f"{loop.call}: expected .loss to be"),
                    self._items_of(items, out))
        loop.kept.append(kept)
        if loop.engine.phase is Phase.DONE:
            self._loop_complete(loop)

    def _loop_abort(self, loop: _Loop) -> None:
        """The loop raised inside a measured step: leave everything, measure nothing."""
        loop.failed = True
        loop.engine.close()

    def _loop_complete(self, loop: _Loop) -> None:
        """The loop's last measured step ended: assemble its measurement, as ``train`` would."""
        engine = loop.engine
        loop.complete = True
        engine.close()
        if engine.clock is not None:
            engine.timed_result(list(loop.kept))
        self._assemble("train", engine, loop.kept, loop.pressure, _per_step, loop.call)
        self._retime = self._not_retimed(loop.call)
        if engine.over:
            assert self._measured is not None
            raise EmulatedOutOfMemory(self._measured.detail)
        if loop.call != "trainperf.steps" and not self._timing_only and self._confirm is not None:
            wanted, retimed = self._asks_retime()
            if wanted:
                self._not_retimed(loop.call)()
            self._confirmed = retimed

    def _not_retimed(self, call: str) -> Callable[[], list[Metric] | None]:
        """A re-timing that cannot run (the loop is the test's, and it is over): it notes why."""
        def retime() -> list[Metric] | None:
            self._notes.setdefault(f"{self._cell.nodeid}: its timings regressed and were not re-timed to confirm "
                                   f"it: {call} measured the test's own loop, which runs each step once; the "
                                   "stored verdict stands (trainperf.steps and trainperf.train re-time inside "
                                   "the test)")
            return None

        return retime

    def _asks_retime(self) -> tuple[bool, Retimed]:
        """Ask the plugin's confirmation (:meth:`confirm_with`) whether the measurement so far regressed
        in its timings and is due a re-timing (within ``--trainperf-max-time``); its answer."""
        assert self._confirm is not None
        wanted = False
        before = self._retime

        def probe() -> list[Metric] | None:
            nonlocal wanted
            wanted = True
            return None

        self._retime = probe
        try:
            retimed = self._confirm(self)
        finally:
            self._retime = before
        return wanted, retimed

    def _iterate(self, handle: Steps, loader: Iterable[Any], loop: _Loop | None, items: Items) -> Iterator[Any]:
        """The batches of :meth:`steps`, each step measured by the loop's engine (see there)."""
        from pytest_trainperf.engine import Phase

        source = _Batches(self._cell, loader, loop.needed if loop is not None else 1)
        if loop is None:  # a plain run: one step
            handle.loss = None
            yield source.next()
            if handle.loss is not None:
                self._check_losses([self._number(self._loss(handle.loss, "trainperf.steps: expected .loss to be"))],
                                   "trainperf.steps")
            return
        engine = loop.engine
        try:
            while not loop.complete:
                if engine.phase is Phase.TIMED:  # the clock runs from the wait for the batch
                    engine.begin()
                    batch = source.next()
                    engine.data_ready()
                else:  # instrumented steps: the batch is fetched outside the counters
                    batch = source.next()
                    engine.begin()
                handle.loss = None
                yield batch
                self._loop_end(loop, handle.loss, items, batch)
                del batch
            if self._confirm is not None and not self._timing_only and engine.timed is not None:
                yield from self._confirm_in_loop(handle, loop, source, items)
        finally:  # a loop that stopped early (break) fails the cell when the plugin reads it (result)
            if not loop.complete:
                engine.close()

    def _confirm_in_loop(self, handle: Steps, loop: _Loop, source: _Batches, items: Items) -> Iterator[Any]:
        """Re-time the loop's timed steps with further batches while the plugin's confirmation asks for
        it (:meth:`_asks_retime`), at most ``--trainperf-confirm`` rounds, before the loop ends."""
        from pytest_trainperf.judge import Retimed
        from pytest_trainperf.measure.compiled import Snapshot, snapshot, timed_failure
        from pytest_trainperf.measure.cudnn import cudnn_benchmark
        from pytest_trainperf.measure.timing import StepClock, fixed_threads

        engine = loop.engine
        rounds, skipped = 0, None
        while rounds < self._settings.confirm:
            wanted, retimed = self._asks_retime()
            if not wanted:
                skipped = retimed.skipped_for
                break
            marks: list[Snapshot] = []  # dynamo's counters when the re-timed steps start
            kept: list[object] = []
            with fixed_threads(engine.threads), cudnn_benchmark(self._settings.cudnn_benchmark), \
                    StepClock(engine.device, engine.count, CONFIRM_WARMUP, self._rank is None,
                              on_timed=functools.partial(_mark, marks)) as clock:
                while not clock.finished:
                    clock.start()
                    batch = source.next()
                    clock.data_ready()
                    handle.loss = None
                    yield batch
                    clock.stop()
                    kept.append(Kept(None, self._items_of(items, batch)))
                    del batch
            invalid = timed_failure(marks[0], snapshot()) if marks else ""
            if invalid:  # timings mixing compiled and compiling steps confirm nothing, and clear nothing
                _usage(self._cell, f"{RETIMED}: {invalid}")
            self._replace_timings(self._timing(clock.timed(kept), _per_step))
            rounds += 1
        self._confirmed = Retimed(rounds, skipped_for=skipped)

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
        """Everything measured and recorded in this cell; None if nothing was. Fails the test when its
        measured loop (``step``/``steps``) ended before the measurement had all its steps."""
        loop = self._loop
        if loop is not None and not loop.complete and not loop.failed:
            loop.failed = True
            self.close()
            _usage(self._cell, f"{loop.call}: the loop ended after {loop.engine.steps_run} measured step(s); the "
                               f"measurement needs {loop.needed} ({loop.phases}): run more steps (a longer loop "
                               "or a larger max_steps), or ask for fewer (steps=, warmup=)")
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
        if self._loop is not None and not self._loop.complete:  # the loop's error was the out-of-memory one
            self._loop.failed = True
            self._loop.engine.close()
        self._measured = Measurement(test=self._cell.test, cell=self._cell.cell, params=self._cell.params,
                                     metrics=(), kind=kind, outcome=outcome, detail=detail)
        self._retime = None
        return self.result()  # type: ignore[return-value]

    def close(self) -> None:
        """Leave a measured loop's pinned threads, paused garbage collector, cuDNN policy and probe if it
        is still open (a test that raised inside it, or stopped early); the plugin calls this when the
        test is over. Idempotent."""
        if self._loop is not None:
            self._loop.engine.close()

    def release(self) -> None:
        """Close (:meth:`close`), then drop what this fixture keeps of the test's objects (the step, and
        through it the model, in its re-timing and its loop) once the cell's measurement is taken. A rank
        of a distributed cell calls it before it destroys its process group, so that a DDP model the step
        holds is freed while the group is still alive: freed later, its reducer frees the gloo group with
        the GIL held while a gloo thread waits for the GIL, and the rank hangs (pytorch/pytorch#56297).
        Re-timing after it is refused (:meth:`retime` returns None)."""
        self.close()
        self._retime = None
        self._loop = None

    def retime(self) -> Measurement | None:
        """Time the measured step again (same count, threads, device); None if nothing was timed.

        Returns the cell's measurement with fresh ``step_time``/``throughput`` samples and every other
        metric as first measured. Used to confirm a timing regression before it fails the cell.
        """
        if self._retime is None or self._measured is None:
            return None
        again = self._retime()
        if again is None:  # the steps cannot be run again here (a loop the test owns, now over)
            return None
        self._replace_timings(again)
        return self.result()

    def _replace_timings(self, again: list[Metric]) -> None:
        """The measurement with the fresh timing metrics ``again`` in place of the first ones."""
        assert self._measured is not None
        fresh = {m.name: m for m in again}
        self._measured = replace(self._measured, metrics=tuple(fresh.get(m.name, m)
                                                                for m in self._measured.metrics))

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

    def _usage(self, message: str) -> None:
        """Fail the test with ``message`` naming this cell."""
        _usage(self._cell, message)

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

    def _loss(self, out: object, what: str = "the step passed to trainperf.train must return") -> object:
        """Check one step's return value (or handed-in loss); keep it cheaply (a detached tensor or a float)."""
        import torch

        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                _usage(self._cell, f"{what} the loss as a 0-d tensor or a float; got a Tensor of shape "
                                   f"{tuple(out.shape)}")
            return out.detach().reshape(())
        number = None if out is None else self._number(out)
        if number is None:
            _usage(self._cell, f"{what} the loss as a 0-d tensor or a float; got {type(out).__name__} {out!r:.80}")
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

    def _engine(self, count: int, warmup: int) -> Engine:
        """The measurement of this cell's step (:class:`~pytest_trainperf.engine.Engine`)."""
        from pytest_trainperf.engine import Engine
        from pytest_trainperf.measure.timing import default_threads

        device = self.device
        threads = self._threads = self._settings.threads or default_threads()
        between: Callable[[], None] | None = None
        if self._rank is not None:  # every timed step of a rank starts after a barrier of all ranks
            import torch.distributed as dist

            between = dist.barrier
        return Engine(device, count=count, warmup=warmup, timing_only=self._timing_only, threads=threads,
                      policy=self._settings.cudnn_benchmark, preexisting=self._snapshot, budget=self._budget,
                      settle=self._rank is None, between=between)

    def _snapshot(self) -> Preexisting:
        """The tensors alive before the test began (taken now if not taken at its start: no ``--trainperf``)."""
        if self._preexisting is None:
            from pytest_trainperf.measure.memory import Preexisting

            self._preexisting = Preexisting(self.device)
        return self._preexisting

    def _measure(self, kind: str, fn: Callable[[], object], count: int, warmup: int,
                 items: Items) -> Measurement:
        """Measure ``fn`` as the step of a ``train`` (``kind``) or ``run``: the engine's phases, each a call."""
        from pytest_trainperf.engine import Phase
        from pytest_trainperf.measure.memory import allocator_pressure
        from pytest_trainperf.measure.timing import time_steps

        engine = self._engine(count, warmup)
        pressure = allocator_pressure(engine.device)
        keep = self._keeper(kind, items)
        kept: list[object] = []
        try:
            while engine.phase in (Phase.COUNT, Phase.MEMORY):  # instrumented steps first, then the warm-up
                engine.begin()
                out = fn()
                engine.end()
                if keep is not None:
                    kept.append(keep(out))
                del out
            if engine.phase is Phase.TIMED:
                timer = self._timer or (ranks_in_step if self._rank is not None else time_steps)
                engine.time_with(timer, fn, keep)
        finally:
            engine.close()
        assert engine.timed is not None or engine.over
        measured = self._assemble(kind, engine, kept + (engine.timed.kept if engine.timed is not None else []),
                                  pressure, items, f"trainperf.{kind}")
        threads, policy = engine.threads, self._settings.cudnn_benchmark

        def retime() -> list[Metric]:
            from pytest_trainperf.measure.compiled import Snapshot, snapshot, timed_failure
            from pytest_trainperf.measure.cudnn import cudnn_benchmark
            from pytest_trainperf.measure.timing import fixed_threads

            marks: list[Snapshot] = []  # dynamo's counters when the re-timed steps start
            with fixed_threads(threads), cudnn_benchmark(policy):
                again = time_steps(fn, count, engine.device, keep, warmup=CONFIRM_WARMUP,
                                   on_timed=lambda: marks.append(snapshot()))
            invalid = timed_failure(marks[0], snapshot()) if marks else ""
            if invalid:  # timings mixing compiled and compiling steps confirm nothing, and clear nothing
                _usage(self._cell, f"{RETIMED}: {invalid}")
            return self._timing(again, items)

        self._retime = retime if engine.timed is not None else None
        if engine.over:  # as on a device of the budget's size: the test stops here, as a real OOM would stop it
            raise EmulatedOutOfMemory(measured.detail)
        if self._confirm is not None and self._retime is not None and not self._timing_only:
            self._confirmed = self._confirm(self)  # before the test goes on and tears down what the step uses
        return self.result()  # type: ignore[return-value]

    def _keeper(self, kind: str, items: Items) -> Callable[[object], object] | None:
        """What is kept of each call's result: its loss (a training step's) and its items (when
        ``items`` is a function of it), as a :class:`Kept`; None when nothing is."""
        loss = kind == "train"
        if not loss and not callable(items):
            return None

        def keep(out: object) -> Kept:
            return Kept(self._loss(out) if loss else None, self._items_of(items, out))

        return keep

    def _items_of(self, items: Items, out: object) -> float | None:
        """The items of one step: ``items`` itself, or ``items(out)`` checked."""
        if not callable(items):
            return items
        value = items(out)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
            numel = getattr(value, "numel", None)
            number = self._number(value) if callable(numel) and numel() == 1 else None
            if number is None or not number > 0:
                _usage(self._cell, f"items: the function {getattr(items, '__name__', items)!r} returned "
                                   f"{value!r:.80}; expected a positive number of items")
            return number
        return float(value)

    def _timing(self, timed: Timed, items: Items) -> list[Metric]:
        """The timing metrics of ``timed``, its items per sample from the kept results where they vary."""
        per: list[float | None] = [items if not callable(items) else None] * len(timed.samples)
        if callable(items):
            tail = timed.kept[len(timed.kept) - len(timed.samples):]
            per = [k.items if isinstance(k, Kept) else None for k in tail]
        known = [i for i in per if i is not None]
        return timing_metrics(timed.samples, known if len(known) == len(per) and known else None, timed.data)

    def _assemble(self, kind: str, engine: Engine, kept: list[object], pressure: tuple[int, int],
                  items: Items, call: str) -> Measurement:
        """The measurement of a completed engine (every call's or step's ``kept`` in order), kept as
        this cell's: what ``train``, ``run``, ``step``, ``steps`` and the callbacks measured alike."""
        from pytest_trainperf.measure.comm import distributed_now
        from pytest_trainperf.measure.compiled import EAGER_NOTE
        from pytest_trainperf.measure.memory import allocator_pressure
        from pytest_trainperf.measure.mfu import device_peaks, precision_in_use

        device, watch, probe = engine.device, engine.watch, engine.probe
        timed, peak, flops, work = engine.timed, engine.peak, engine.flops, engine.work
        self._cudnn_benchmark = engine.cudnn_setting
        if watch is not None and watch.timed_failure:
            _usage(self._cell, watch.timed_failure)
        if probe is not None:
            self._notes.update(dict.fromkeys(probe.notes))
        if not self._timing_only:
            self._peaks = device_peaks(device)
            self._peak_precision = precision_in_use(device)
        losses = [k.loss for k in kept if isinstance(k, Kept) and k.loss is not None]
        if losses and len(losses) != len(kept):
            _usage(self._cell, f"{call}: the loss was handed in for {len(losses)} of {len(kept)} steps; expected "
                               "it for every step (.loss = loss) or for none")
        curve = self._check_losses(losses, call)
        metrics = self._timing(timed, items) if timed is not None else []
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
        if probe is not None:
            metrics += probe.metrics
        compiled = watch.metrics if watch is not None and not self._timing_only else []  # compiled cells only
        if compiled:
            metrics += compiled
            self._notes.setdefault(EAGER_NOTE)
        if curve and not self._timing_only and timed is not None:
            metrics.append(Metric("loss", curve[-1], "", Direction.EXACT))
        if kind == "train" and not self._timing_only:
            self._warn_unseen(flops, peak, call)
        retries, ooms = (after - before for after, before in zip(allocator_pressure(device), pressure, strict=True))
        notes = (f"the CUDA caching allocator flushed its cache {retries} time(s) and recovered from {ooms} "
                 "out-of-memory error(s) during the measurement: the step runs near the memory limit, and "
                 "its timings include that thrashing",) if retries or ooms else ()
        outcome, detail = Outcome.MEASURED, ""
        if engine.over:
            from pytest_trainperf.units import format_value

            assert peak is not None and self._budget is not None
            outcome = Outcome.OOM_EMULATED
            detail = (f"peak memory {format_value(float(peak.peak_bytes), 'B')} exceeds the memory budget of "
                      f"{format_value(float(self._budget), 'B')} (emulated out of memory; not timed)")
        per_step = [k.items for k in kept if isinstance(k, Kept) and k.items is not None]
        average = (sum(per_step) / len(per_step) if callable(items) and per_step
                   else items if not callable(items) else None)
        self._measured = Measurement(
            test=self._cell.test, cell=self._cell.cell, params=self._cell.params,
            metrics=tuple(metrics), loss_curve=tuple(curve), kind=kind, steps=engine.count, warmup=engine.warmup,
            outcome=outcome, detail=detail, notes=notes, items_per_step=average,
            breakdowns=(work.breakdowns() + (work.comm.breakdowns() if distributed_now() else ())
                        if work is not None else ()))
        return self._measured

    def _warn_unseen(self, flops: FlopCount | None, peak: MemoryPeak | None, call: str) -> None:
        """A note when a training step measured no FLOPs or allocated nothing: its work ran where the
        counters cannot see it."""
        causes = ("its work ran on another thread (a framework's background trainer, a data-parallel "
                  "thread; the counters follow only the thread the step runs in) or in a custom kernel "
                  "the counters cannot see (a C++/Triton extension)")
        if flops is not None and flops.total == 0:
            self._notes.setdefault(f"{self._cell.nodeid}: {call} measured 0 FLOPs in a training step: {causes}")
        if peak is not None and peak.peak_bytes <= peak.start_bytes:
            self._notes.setdefault(f"{self._cell.nodeid}: {call} saw no allocation in a training step (peak "
                                   f"memory = what was alive before it): {causes}")


def _mark(marks: list[Any]) -> None:
    """Keep dynamo's counters now in ``marks``."""
    from pytest_trainperf.measure.compiled import snapshot

    marks.append(snapshot())


def _per_step(out: object) -> object:
    """The items of a loop's steps: each step's own, as kept (never called)."""
    raise AssertionError("the items of a loop's step are read from what was kept")


@dataclass
class _Loop:
    """A step loop the test (or a framework) runs, measured one step at a time by its engine."""

    call: str
    """``trainperf.step`` or ``trainperf.steps`` (the callbacks use ``trainperf.step``)."""
    engine: Engine
    """Its measurement."""
    pressure: tuple[int, int]
    """The CUDA allocator's retries and out-of-memory errors when it began."""
    kept: list[object] = field(default_factory=list)
    """Every measured step's :class:`Kept`, in order."""
    complete: bool = False
    """Whether its measurement is complete (later steps run unmeasured)."""
    failed: bool = False
    """Whether it stopped for good with its measurement incomplete (raised, or already failed the test)."""

    @property
    def needed(self) -> int:
        """The steps its measurement takes."""
        return (0 if self.engine.timing_only else 2) + self.engine.warmup + self.engine.count

    @property
    def phases(self) -> str:
        """How :attr:`needed` adds up, for a message."""
        timed = f"{self.engine.warmup} warm-up + {self.engine.count} timed"
        return timed if self.engine.timing_only else f"1 counted + 1 memory-tracked + {timed}"


class StepBlock:
    """One step of a loop the test runs (``with trainperf.step(steps=20) as step:``)."""

    def __init__(self, fixture: TrainPerf, loop: _Loop | None, items: float | None) -> None:
        self.loss: object = None
        """The step's loss (a 0-d tensor or a float), handed in inside the block; None: no loss stored."""
        self.items = items
        """The step's items (for throughput); may be set inside the block too."""
        self._fixture = fixture
        self._loop = loop
        self._measured = False

    def __enter__(self) -> StepBlock:
        self._measured = self._loop is not None and self._fixture._loop_begin(self._loop)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not self._measured or self._loop is None:
            return
        if exc is not None:
            self._fixture._loop_abort(self._loop)
            return
        self._fixture._loop_end(self._loop, self.loss, self.items, None)


class Steps:
    """The batches of a measured loop (``for batch in trainperf.steps(loader, steps=20)``)."""

    def __init__(self, fixture: TrainPerf, loader: Iterable[Any], loop: _Loop | None, items: Items) -> None:
        self.loss: object = None
        """The current step's loss (a 0-d tensor or a float), set inside the loop's body; None: no loss stored."""
        self._fixture = fixture
        self._loader = loader
        self._loop = loop
        self._items = items
        self._iterated = False

    def __iter__(self) -> Iterator[Any]:
        if self._iterated:
            self._fixture._usage("trainperf.steps(...): iterated twice; expected one loop over it per cell")
        self._iterated = True
        return self._fixture._iterate(self, self._loader, self._loop, self._items)


class _Batches:
    """The batches of a loader, from its start again when it runs out (a one-shot iterator cannot)."""

    def __init__(self, cell: Cell, loader: Iterable[Any], needed: int) -> None:
        self._cell = cell
        self._loader = loader
        self._needed = needed
        try:
            self._it = iter(loader)
        except TypeError:
            self._it = None  # type: ignore[assignment]
        if self._it is None:
            _usage(cell, f"trainperf.steps(loader={loader!r:.80}): expected an iterable of batches")
        self._drawn = 0
        self._in_pass = 0

    def next(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            batch = self._again()
        self._drawn += 1
        self._in_pass += 1
        return batch

    def _again(self) -> Any:
        again = iter(self._loader)
        problem = ""
        if again is self._it or self._in_pass == 0:
            problem = (f"the loader ran out after {self._drawn} batch(es); the measurement needs {self._needed} "
                       "or more: pass a re-iterable (a list, a DataLoader), which is iterated again from its "
                       "start, or more batches" if self._in_pass else "the loader yields no batch")
        else:
            self._it, self._in_pass = again, 0
            try:
                return next(again)
            except StopIteration:
                problem = "the loader yields no batch"
        _usage(self._cell, f"trainperf.steps: {problem}")


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


def timing_metrics(samples: list[float], items: float | list[float] | None,
                   data: list[float] | None = None) -> list[Metric]:
    """``step_time`` from per-step seconds; ``data_time`` and ``compute_time`` when the steps' ``data``
    waits were timed (``trainperf.steps``: step time is their sum); ``throughput`` when the items per step
    are known (one number, or one per sample)."""
    metrics = [Metric("step_time", statistics.median(samples), "s", Direction.LOWER_IS_BETTER, tuple(samples))]
    if data:
        compute = tuple(max(0.0, s - d) for s, d in zip(samples, data, strict=True))
        metrics.append(Metric("data_time", statistics.median(data), "s", Direction.LOWER_IS_BETTER, tuple(data)))
        metrics.append(Metric("compute_time", statistics.median(compute), "s", Direction.LOWER_IS_BETTER, compute))
    if items is not None:
        per = items if isinstance(items, list) else [items] * len(samples)
        rates = tuple(float(f"{n / s:.{RATE_DIGITS}g}") for n, s in zip(per, samples, strict=True))
        metrics.append(Metric("throughput", statistics.median(rates), "items/s", Direction.HIGHER_IS_BETTER, rates))
    return metrics
