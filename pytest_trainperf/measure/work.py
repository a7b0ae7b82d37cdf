"""Exact work counts of one step: host synchronisations, aten ops, memory traffic, by dtype.

Counted in the same ``TorchDispatchMode`` as the FLOPs (:mod:`.counting`), on the same instrumented
step: no extra step runs, and nothing is counted on a timed step. Every figure is a
count of what the step's code dispatches, so it is the same in every run of unchanged code on any
machine, however busy: these are the gate to trust on a shared runner, where timings drift.

* ``host_syncs``: ops that make the host wait for the device on an accelerator, counted on every
  device (the CPU included, where they cost nothing yet): ``aten._local_scalar_dense`` (``.item()``,
  ``bool(t)``, ``float(t)``, ``int(t)``, ``if t:``), ``aten.equal``, ``aten.nonzero`` (also
  ``torch.where(mask)``), ``aten.masked_select``, the unique ops, ``aten.repeat_interleave`` without
  ``output_size``, and indexing with a boolean (or uint8) mask (``x[mask]``, ``x[mask] = v``: the
  kernel runs nonzero). On an accelerator, an op on a CPU tensor is no sync and is not counted;
  on the CPU every one is, so a CPU count includes what an accelerator run would not: an optimizer
  that reads its CPU step counters back (AdamW, neither fused nor capturable: one ``.item()`` per
  parameter in ``opt.step()``). The gate is the change, not the level. Each is attributed to the
  user's source line that issued it: the innermost frame of the Python stack at dispatch outside
  torch and outside pytest_trainperf.
  **Not seen:** what dispatches nothing on the CPU: ``.cpu()``, ``.tolist()``, ``.numpy()`` of a CPU
  tensor (on CUDA, ``.cpu()`` is an ``aten._to_copy`` the mode sees but does not count: a copy the
  code asks for), ``torch.cuda.synchronize()``, stream and event waits, and syncs inside a kernel
  (a CUDA kernel that reads a size back) or in a compiled graph.
* ``ops``: aten ops dispatched, with the count of each op name (``aten.mm``) in the breakdown.
* ``memory_traffic``: bytes the step's ops read and write, as eager execution moves them: each op's
  tensor inputs and outputs, ``numel x element size`` each (logical sizes: a broadcast input counts
  at its expanded size). View ops (``view``, ``t``, ``expand``, ``detach``, ...) move nothing and count
  0; an in-place op counts the tensor it updates once read and once written; an ``out=`` tensor once
  written. Caches, fusion inside a kernel and the allocator's own traffic are not seen.
* ``memory_traffic_<dtype>`` (``fp32``, ``bf16``, ...; report-only) splits it by the dtype of each
  tensor, and ``low_precision_share`` (exact, higher is better) is the share of the floating-point
  traffic in bf16, fp16 or fp8: an upcast (``.float()``) inside a low-precision step lowers it, and
  the failure names the ops whose float32 traffic appeared or grew.
* ``arithmetic_intensity`` (report-only): FLOPs per byte of memory traffic.

The counts are of the instrumented step, the first step the fixture runs in the cell: an optimizer's
lazily created state (Adam's moments) is in it, as in every run of the cell.

**Not counted: tensors received from another process.** A ``DataLoader`` with ``num_workers > 0`` (any
``torch.multiprocessing`` queue) rebuilds each tensor it receives with two ops, ``aten.empty`` of no
element and ``aten.set_`` onto a shared-memory storage (``torch._utils._rebuild_tensor``). How many
batches arrive during the step is up to the worker processes' scheduling, so that pair of ops is left
out of every count; what the step then does with its batch is counted.
"""

from __future__ import annotations

import linecache
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from types import FrameType
from typing import Any

from pytest_trainperf.measure.comm import CommCount
from pytest_trainperf.measure.flops import SHORT, OpKind, Precision, Tf32, precision_of
from pytest_trainperf.records import Breakdown, Direction, Metric

ALWAYS_SYNC = ("_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive")
"""Ops (by name, any overload) that always wait for the device: their result's size or value is needed
on the host."""
MASK_INDEX = ("index", "index_put", "index_put_", "_index_put_impl_")
"""Indexing ops that run nonzero inside the kernel when an index is a boolean (or uint8) mask."""
MAY_SYNC = frozenset((*ALWAYS_SYNC, *MASK_INDEX, "repeat_interleave"))
"""Every op name :func:`_syncs` looks at further."""
LOW_PRECISION = (Precision.BF16, Precision.FP16, Precision.FP8)
"""The precisions whose share of the floating-point traffic is ``low_precision_share``."""
NO_TF32 = Tf32(matmul=False, conv=False)
"""Traffic is by dtype: float32 is float32, whatever TF32 flags the matmuls run under."""
SOURCE_CHARS = 80
"""The longest source text kept for a sync site."""
TRAFFIC_METRICS = tuple(f"memory_traffic_{SHORT[p]}" for p in Precision if p is not Precision.TF32)
"""Every per-dtype traffic metric: ``memory_traffic_fp64`` ... ``memory_traffic_other``."""

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
"""pytest_trainperf/: its frames are never a sync's site."""


@dataclass
class WorkCount:
    """What the work mode counted in one step (filled while the step runs)."""

    syncs: Counter[str] = field(default_factory=Counter)
    """Sync sites, ``file.py:42 `source` (aten.op)`` -> count."""
    ops: Counter[str] = field(default_factory=Counter)
    """Op name (``aten.mm``) -> calls."""
    traffic: Counter[str] = field(default_factory=Counter)
    """Op name -> bytes read and written."""
    by_precision: Counter[Precision] = field(default_factory=Counter)
    """Precision of the tensors -> bytes read and written."""
    fp32_by_op: Counter[str] = field(default_factory=Counter)
    """Op name -> float32 bytes read and written."""
    comm: CommCount = field(default_factory=CommCount)
    """The collectives issued (:mod:`.comm`): reported in a distributed cell."""

    def metrics(self, flops: float | None = None) -> list[Metric]:
        """``host_syncs``, ``ops``, ``memory_traffic`` and its split by dtype, ``low_precision_share``
        (when the step moves floating-point data) and ``arithmetic_intensity`` (given the step's FLOPs)."""
        total = sum(self.traffic.values())
        out = [Metric("host_syncs", float(sum(self.syncs.values())), ""),
               Metric("ops", float(sum(self.ops.values())), ""),
               Metric("memory_traffic", float(total), "B")]
        out += [Metric(f"memory_traffic_{SHORT[p]}", float(self.by_precision[p]), "B")
                for p in Precision if self.by_precision.get(p)]
        floating = sum(n for p, n in self.by_precision.items() if p is not Precision.OTHER)
        if floating:
            low = sum(self.by_precision.get(p, 0) for p in LOW_PRECISION)
            out.append(Metric("low_precision_share", 100.0 * low / floating, "%", Direction.HIGHER_IS_BETTER))
        if flops is not None and total:
            out.append(Metric("arithmetic_intensity", flops / total, "FLOP/B", Direction.HIGHER_IS_BETTER))
        return out

    def breakdowns(self) -> tuple[Breakdown, ...]:
        """The sync sites, op counts, traffic by op and float32 traffic by op, as stored with a baseline."""
        def parts(counter: Counter[str]) -> tuple[tuple[str, float], ...]:
            return tuple((k, float(v)) for k, v in counter.items() if v)

        floating = any(n for p, n in self.by_precision.items() if p is not Precision.OTHER)
        return (Breakdown("host_syncs", parts(self.syncs), "", "new sync sites"),
                Breakdown("ops", parts(self.ops), "", "ops that appeared or grew"),
                Breakdown("memory_traffic", parts(self.traffic), "B", "ops whose traffic appeared or grew"),
                *((Breakdown("low_precision_share", parts(self.fp32_by_op), "B",
                             "ops whose float32 traffic appeared or grew"),) if floating else ()))  # its metric's only


def _user_site(frame: FrameType | None) -> str:
    """``file.py:42 `source``` of the innermost frame outside torch, pytest_trainperf and the
    standard library's contextlib (a ``with`` around the step); ``<unknown>`` when there is none."""
    import torch

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith((torch_dir, _PACKAGE_DIR)) and not filename.endswith("contextlib.py"):
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            text = f" `{source[:SOURCE_CHARS]}`" if source else ""
            return f"{os.path.basename(filename)}:{frame.f_lineno}{text}"
        frame = frame.f_back
    return "<unknown>"


def _is_mask(value: object) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8)


def _syncs(name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of ``func`` (named ``name``, without ``aten.``) waits for the device."""
    if name in ALWAYS_SYNC:
        return True
    if name == "repeat_interleave":
        overload = str(getattr(func, "_overloadname", ""))
        return overload == "Tensor" and kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    if name in MASK_INDEX and len(args) > 1:
        indices = args[1]
        return isinstance(indices, (list, tuple)) and any(_is_mask(i) for i in indices)
    return False


def _shared_storage(value: object) -> bool:
    """Whether ``value`` is a storage in shared memory (one received from another process)."""
    import torch

    return isinstance(value, torch.UntypedStorage) and value.is_shared()


class Counting:
    """The per-op bookkeeping of the counting mode (:mod:`.counting`), kept out of the mode so that it
    is typed. Bytes are summed by dtype while the step runs (a ``torch.dtype`` hashes in C, a
    :class:`Precision` in Python) and split by precision in :meth:`finish`."""

    def __init__(self, device_type: str) -> None:
        import torch

        self.count = WorkCount()
        self.device_type = device_type
        self._known: dict[Any, tuple[str, str | None, bool]] = {}
        self._by_dtype: dict[Any, int] = {}
        self._tensor = torch.Tensor
        self._fp32 = torch.float32
        self._empty = 0
        """The ``id()`` of the previous op's output when it was an ``aten.empty`` of no element (a received
        tensor's start; not the tensor itself: holding it makes torch detach the op's output)."""

    def _describe(self, func: Any) -> tuple[str, str | None, bool]:
        """The op's name (``aten.mm``), its bare name (``mm``) if it may sync, and whether it is a view."""
        known = self._known.get(func)
        if known is None:
            name = str(func.overloadpacket)  # aten.mm
            bare = name.rsplit(".", 1)[-1]
            known = self._known[func] = (name, bare if bare in MAY_SYNC else None,
                                         bool(getattr(func, "is_view", False)))
        return known

    def _on_device(self, args: tuple[Any, ...]) -> bool:
        """Whether a sync op runs on the step's device: on the CPU every one counts; on an accelerator
        not one on a CPU tensor (an optimizer's step counter read back with ``.item()``), which waits
        for nothing."""
        if self.device_type == "cpu":
            return True
        first = args[0] if args else None
        return getattr(getattr(first, "device", None), "type", self.device_type) != "cpu"

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: object) -> None:
        """Count one op call: ``func(*args, **kwargs)`` returned ``out``."""
        name, may_sync, view = self._describe(func)
        count = self.count
        ops = count.ops
        empty, self._empty = self._empty, 0
        if name == "aten.set_" and len(args) > 1 and _shared_storage(args[1]):
            if empty and id(args[0]) == empty:  # the pair of a received tensor: neither counts
                ops["aten.empty"] -= 1
                if not ops["aten.empty"]:
                    del ops["aten.empty"]
                    if not count.traffic.get("aten.empty", 1):
                        del count.traffic["aten.empty"]
                return
        if name == "aten.empty" and isinstance(out, self._tensor) and out.numel() == 0:
            self._empty = id(out)
        ops[name] = ops.get(name, 0) + 1
        if not name.startswith("aten."):
            count.comm.add(name.split(".", 1)[0], name.rsplit(".", 1)[-1], args, kwargs)
        if may_sync is not None and _syncs(may_sync, func, args, kwargs) and self._on_device(args):
            count.syncs[f"{_user_site(sys._getframe(1))} ({name})"] += 1
        if view:
            return
        # read: every tensor argument but an out= tensor (an in-place op's self is read, then written);
        # written: every tensor returned. Aten arguments nest one level at most (a list of tensors).
        total = fp32 = 0
        by_dtype = self._by_dtype
        tensor, float32 = self._tensor, self._fp32
        rest = kwargs.values() if "out" not in kwargs else [v for k, v in kwargs.items() if k != "out"]
        for value in chain(args, rest, (out,)):
            if isinstance(value, tensor):
                group: Any = (value,)
            elif isinstance(value, (list, tuple)):
                group = value
            else:
                continue
            for item in group:
                if isinstance(item, tensor):
                    try:
                        size = item.nbytes  # numel x element size, in one call
                    except RuntimeError:  # a sparse tensor has no nbytes
                        size = item.numel() * item.element_size()
                    dtype = item.dtype
                    total += size
                    by_dtype[dtype] = by_dtype.get(dtype, 0) + size
                    if dtype is float32:
                        fp32 += size
        if fp32:
            fp32_by_op = count.fp32_by_op
            fp32_by_op[name] = fp32_by_op.get(name, 0) + fp32
        traffic = count.traffic
        traffic[name] = traffic.get(name, 0) + total

    def finish(self) -> None:
        """The bytes by dtype added to :attr:`WorkCount.by_precision` (once the step is over)."""
        for dtype, size in self._by_dtype.items():
            name = str(dtype).removeprefix("torch.")
            precision = (precision_of(name, OpKind.MATMUL, NO_TF32, "cpu", None) if dtype.is_floating_point
                         else Precision.OTHER)
            self.count.by_precision[precision] += size
        self._by_dtype.clear()


@contextmanager
def count_work(device_type: str = "cpu") -> Iterator[WorkCount]:
    """Count the work of what runs inside (one step) on a device of ``device_type``, with its FLOPs, in
    the one counting mode of :mod:`.counting`; the count is complete when the block exits."""
    from pytest_trainperf.measure.counting import counting

    with counting(device_type) as counts:
        yield counts.work
