"""``torch.compile``: compiled models measured as compiled, and what dynamo did in a cell.

**The instrumented steps run eager.** The counting step runs under the counting ``TorchDispatchMode``
(:mod:`.counting`: FLOPs and work) and the CPU memory step under a storage-following one. Dynamo
refuses to trace a frame while a non-infra dispatch mode is on the stack, and its refusal (``ConvertFrameReturn`` with
``apply_to_code``) marks the frame's code object as *skipped* for the rest of the process: the warm-up
and timed steps, and every later cell running that code, would then run eager. ``config.disable``
returns the same skip and marks the code alike. :func:`eager_instrumented` instead sets the documented
stance ``torch.compiler.set_stance("force_eager")`` around each instrumented step (:func:`eager_step`): dynamo's frame
callback is then ``None``, so it is never called, sees no mode and marks nothing; the step runs the
model's eager code, and the counters count eager work. After the block the stance is restored, and
the first warm-up step compiles.

**What dynamo did, per cell.** :class:`CompileWatch` resets dynamo's in-process caches when the cell's
measurement starts (``torch.compiler.reset()``: every cell compiles from a clean state, so its figures
do not depend on which cells ran before it in the process) and snapshots dynamo's own counters there,
when the timed steps start (``on_timed``, before the first step's clock) and after the last timed step:

- ``graph_breaks``: graph breaks dynamo hit while compiling (``counters["graph_break"]``, summed;
  a break is counted again each time its frame is recompiled);
- ``recompiles``: frames compiled again because a guard failed (the compilation events of
  ``torch._dynamo.utils.get_compilation_metrics()`` that carry a ``recompile_reason``);
- ``unique_graphs``: FX graphs captured (``counters["stats"]["unique_graphs"]``);
- ``compile_time``: seconds dynamo spent compiling, its own timing of each compilation event (frame
  compiles, and the backward graphs AOTAutograd compiles on the first backward), summed.

They are reported only for a cell whose steps compiled something; an eager cell has none of them.
A compilation event during the timed steps (a recompile, or a first compile without warm-up) makes
the cell's timing invalid: :meth:`CompileWatch.timed_failure` says why, naming the failed guard.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_trainperf.records import Metric

T = TypeVar("T")

EAGER_STANCE = "force_eager"
"""The ``torch.compiler.set_stance`` of the instrumented steps: every ``torch.compile`` directive ignored."""
GLOBAL_HOOKS_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
"""Start of the warning an ``OptimizedModule`` gives when called under global module hooks (a user's,
or ``FlopCounterMode``'s module tracker where a step counts its own FLOPs): under the eager stance the
hooks fire an extra time for the wrapper, and count nothing twice, so the warning is silenced there."""
EAGER_NOTE = ("the flops and peak_memory of compiled cells are those of their step run eager (torch.compile off "
              "for the FLOP and memory steps, so that they leave the compiled code compiled): the FLOPs are the "
              "same math, the compiled step's own peak memory differs (docs/user-guide.md, Compiled models)")
"""The session's note for a cell whose steps compiled."""
COMPILE_METRICS = ("graph_breaks", "recompiles", "unique_graphs", "compile_time")
"""The metrics of a compiled cell."""
REASON_CHARS = 300
"""At most this much of a recompile reason goes into a failure message."""


@contextlib.contextmanager
def eager_instrumented() -> Iterator[None]:
    """Run the body with ``torch.compile`` directives ignored (``set_stance("force_eager")``), so that
    dynamo never sees the counting modes and never marks the model's code as skipped. On a torch
    without ``set_stance`` (before 2.6) the body runs as it is."""
    import torch

    set_stance: Callable[..., Any] | None = getattr(torch.compiler, "set_stance", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GLOBAL_HOOKS_WARNING, category=UserWarning)
        with set_stance(EAGER_STANCE) if set_stance is not None else contextlib.nullcontext():
            yield


def eager_step(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` called under :func:`eager_instrumented`: what the FLOP and memory steps run."""

    def step() -> T:
        with eager_instrumented():
            return fn()

    return step


@dataclass(frozen=True)
class Snapshot:
    """Dynamo's counters at one moment."""

    graph_breaks: int
    """Graph breaks counted so far."""
    unique_graphs: int
    """FX graphs captured so far."""
    frames: int
    """Frames dynamo converted so far (``counters["frames"]["total"]``)."""
    events: tuple[object, ...]
    """The compilation events dynamo keeps (its last 64), as objects: the ones after a snapshot are
    those not in it."""


@dataclass(frozen=True)
class CompileEvent:
    """One compilation dynamo recorded: a frame, or a backward graph."""

    name: str
    """The compiled code's name (``forward``, ``torch_dynamo_resume_in_forward_at_12``), or ``backward``."""
    compile_id: str
    """Dynamo's id, ``frame/compile`` (``0/1``: frame 0's second compile)."""
    seconds: float
    """How long it took, by dynamo's clock."""
    recompile_reason: str
    """The guard that failed, for a recompile; empty for a first compile."""


def _dynamo() -> Any:
    """``torch._dynamo`` if it is loaded (nothing was compiled otherwise), else None."""
    return sys.modules.get("torch._dynamo")


def snapshot() -> Snapshot:
    """Read dynamo's counters now; all zeros when dynamo is not loaded."""
    dynamo = _dynamo()
    if dynamo is None:
        return Snapshot(0, 0, 0, ())
    utils = dynamo.utils
    counters = utils.counters
    breaks = sum(counters["graph_break"].values()) if "graph_break" in counters else 0
    graphs = counters["stats"]["unique_graphs"] if "stats" in counters else 0
    frames = counters["frames"]["total"] if "frames" in counters else 0
    events = tuple(utils.get_compilation_metrics()) if hasattr(utils, "get_compilation_metrics") else ()
    return Snapshot(int(breaks), int(graphs), int(frames), events)


def _event(raw: object) -> CompileEvent:
    start, end = getattr(raw, "start_time_us", None), getattr(raw, "end_time_us", None)
    seconds = (end - start) / 1e6 if isinstance(start, int) and isinstance(end, int) else 0.0
    forward = getattr(raw, "is_forward", True) is not False
    return CompileEvent(name=str(getattr(raw, "co_name", None) or ("forward" if forward else "backward")),
                        compile_id=str(getattr(raw, "compile_id", "") or ""), seconds=seconds,
                        recompile_reason=str(getattr(raw, "recompile_reason", None) or ""))


def events_between(before: Snapshot, after: Snapshot) -> list[CompileEvent]:
    """The compilation events recorded after ``before`` up to ``after``."""
    seen = {id(e) for e in before.events}
    return [_event(e) for e in after.events if id(e) not in seen]


def compiled_metrics(before: Snapshot, after: Snapshot) -> list[Metric]:
    """``graph_breaks``, ``recompiles``, ``unique_graphs`` and ``compile_time`` between two snapshots;
    none when nothing was compiled between them."""
    events = events_between(before, after)
    graphs = after.unique_graphs - before.unique_graphs
    if not events and graphs == 0 and after.frames == before.frames:
        return []
    return [
        Metric("graph_breaks", float(after.graph_breaks - before.graph_breaks), ""),
        Metric("recompiles", float(sum(1 for e in events if e.recompile_reason)), ""),
        Metric("unique_graphs", float(graphs), ""),
        Metric("compile_time", sum(e.seconds for e in events), "s"),
    ]


def timed_failure(at_timed: Snapshot, after: Snapshot) -> str:
    """Why the timed steps between two snapshots do not time the compiled step (empty when they do):
    dynamo compiled during them, a recompile (naming the guard that failed) or a first compile."""
    events = events_between(at_timed, after)
    if not events:
        return ""
    recompiled = [e for e in events if e.recompile_reason]
    if recompiled:
        first = recompiled[0]
        return (f"recompiled during timed steps (reason: {first.recompile_reason[:REASON_CHARS]}; "
                f"frame {first.name}, compile {first.compile_id}; {len(recompiled)} recompile(s) in the timed "
                "steps): the timings include compilation; make the step's inputs and Python state the same "
                "every step, mark the changing dimension dynamic (torch._dynamo.mark_dynamic), or give it "
                "warm-up steps that meet every variant")
    first = events[0]
    return (f"compiled during timed steps ({first.name}, compile {first.compile_id}, "
            f"{first.seconds:.3g} s): the timings include compilation; give the step warm-up (warmup >= 1)")


class CompileWatch:
    """Dynamo's counters around one cell's measurement (see the module docstring).

    Created when the measurement starts (it resets dynamo's in-process caches there); :meth:`mark_timed`
    runs before the first timed step's clock starts and :meth:`finish` after the last timed step, so
    nothing is read inside the timed region.
    """

    def __init__(self) -> None:
        dynamo = _dynamo()
        if dynamo is not None:
            dynamo.reset()
        self._start = snapshot()
        self._timed: Snapshot | None = None
        self._end: Snapshot | None = None

    def mark_timed(self) -> None:
        """The timed steps start now (after the warm-up)."""
        self._timed = snapshot()

    def finish(self) -> None:
        """The timed steps are over."""
        self._end = snapshot()

    @property
    def metrics(self) -> list[Metric]:
        """The cell's compile metrics (none for an eager cell)."""
        return compiled_metrics(self._start, self._end or snapshot())

    @property
    def timed_failure(self) -> str:
        """Why the timed steps are not the compiled step's (empty when they are, or were not marked)."""
        if self._timed is None:
            return ""
        return timed_failure(self._timed, self._end or snapshot())
