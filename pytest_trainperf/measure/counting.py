"""The counting step: one ``TorchDispatchMode`` that counts a step's FLOPs (:mod:`.flops`) and its exact
work (:mod:`.work`) in the same dispatch of each op.

It counts what ``torch.utils.flop_counter.FlopCounterMode`` counts, with the same formulas (torch's
``flop_registry``, plus :mod:`.flops`' CPU attention kernels and causal halving) on the same ops, so
``flops`` is the same integer, and it does so without the parts of that counter a total does not need:

- no module tracker: ``FlopCounterMode`` installs global module forward hooks and a multi-grad hook per
  module call to attribute FLOPs to modules; only the total (and its split by precision) is stored,
  so no hook is installed and no module call leaves its fast path;
- the decomposition attempt cached per op: ``FlopCounterMode`` re-enters its mode and calls
  ``OpOverload.decompose`` for every op it sees (ops with a ``CompositeImplicitAutograd`` kernel
  run decomposed, and their parts are counted); here whether an op has that kernel is asked once per
  op, and only those ops re-enter the mode, so the ops run (and counted) are the same;
- no shape tree-map for the ops without a formula (torch's ``shape_wrapper`` runs only for the ops
  that have one, as before).

The work counts (:class:`.work.WorkCount`) are taken on the same op calls the FLOP formulas see: the
ops that run after any decomposition, which is what a work mode stacked under ``FlopCounterMode``
counted. A ``torch.cond`` runs both branches, their FLOPs merged as ``FlopCounterMode`` merges them;
other higher-order ops are handed back to torch (``NotImplemented``), as that counter hands back every
one but ``cond`` and user Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pytest_trainperf.measure.flops import FlopCount, Precision, flop_formulas, new_tally
from pytest_trainperf.measure.work import Counting, WorkCount

T = TypeVar("T")

METADATA_OPS = ("sym_is_contiguous.default", "is_contiguous.default", "is_contiguous.memory_format",
                "is_strides_like_format.default", "is_non_overlapping_and_dense.default", "size.default",
                "sym_size.default", "stride.default", "sym_stride.default", "storage_offset.default",
                "sym_storage_offset.default", "numel.default", "sym_numel.default", "dim.default")
"""Aten metadata queries (``aten.<op>.<overload>``) a mode sees only for tensors with a Python size
policy (nested tensors): handed back uncounted, as ``FlopCounterMode`` does (with ``prim.layout``)."""


_PASS, _DECOMPOSE, _RUN, _COND = 0, 1, 2, 3
"""What the mode does with an op: hand it back, run its decomposition (counting its parts), run it, or
run the branches of a ``torch.cond``."""


class _Sums:
    """The step's FLOPs by op packet, kept as ``FlopCounterMode`` keeps its ``Global`` counts, so that
    a ``torch.cond`` adds up as it does there."""

    def __init__(self) -> None:
        self.by_op: dict[object, int] | None = None
        """Op packet -> FLOPs; None until the first FLOP (the counter's ``Global`` entry, made on first use)."""

    def add(self, op: object, flops: int) -> None:
        if self.by_op is None:
            self.by_op = {}
        self.by_op[op] = self.by_op.get(op, 0) + flops

    @property
    def total(self) -> int:
        return sum(self.by_op.values()) if self.by_op is not None else 0

    def cond(self, mode: Any, pred: object, true_fn: Callable[..., Any], false_fn: Callable[..., Any],
             operands: Any) -> Any:
        """Run both branches of a ``torch.cond`` under ``mode`` (their ops counted) and merge their FLOPs
        as ``FlopCounterMode`` does: the larger of the two branches' count of each op, written over the
        count kept. The counter's checkpoint copies its counts shallowly, so where FLOPs were counted
        before the cond, both branches add to the same counts and the merge keeps their sum; where none
        were, it keeps the larger branch. Kept the same, to the FLOP."""
        before = self.by_op
        with mode:
            out = true_fn(*operands)
        if out is NotImplemented:
            return out
        true_counts = self.by_op
        self.by_op = before
        with mode:
            other = false_fn(*operands)
        if other is NotImplemented:
            return other
        false_counts = self.by_op
        if true_counts is not None or false_counts is not None:
            first, second = true_counts or {}, false_counts or {}
            merged = {op: max(first.get(op, 0), second.get(op, 0)) for op in {**first, **second}}
            if self.by_op is None:
                self.by_op = {}
            self.by_op.update(merged)
        return out


def _metadata_ops() -> frozenset[object]:
    import torch

    ops: list[object] = [torch.ops.prim.layout.default]
    for name in METADATA_OPS:
        packet, _, overload = name.partition(".")
        found = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if found is not None:
            ops.append(found)
    return frozenset(ops)


@dataclass
class StepCounts:
    """What :func:`counting` counted in the step run inside it (complete when the block exits)."""

    flops: FlopCount = field(default_factory=lambda: FlopCount(total=0, by_precision=()))
    """The step's FLOPs, in total and by precision."""
    work: WorkCount = field(default_factory=WorkCount)
    """The step's work counts (empty when the work is not counted)."""


@contextmanager
def counting(device_type: str = "cpu", work: bool = True) -> Iterator[StepCounts]:
    """Count the FLOPs and (``work``) the work counts of what runs inside, on a device of ``device_type``.

    The body runs under the eager stance (:func:`.compiled.eager_instrumented`): a ``torch.compile``d
    model in it runs its eager code, and dynamo, whose frame callback is then unset, neither sees the
    mode nor steps into its ``__torch_dispatch__`` frames. That is why the mode opts out of torch's
    per-call ``torch._disable_dynamo`` wrapper around ``__torch_dispatch__`` (``_should_skip_dynamo``),
    a cost on every op that buys nothing here.
    """
    import torch
    from torch._C import DispatchKey
    from torch.utils._python_dispatch import TorchDispatchMode

    from pytest_trainperf.measure.compiled import eager_instrumented

    tally = new_tally()
    formulas = flop_formulas(tally)
    ops = Counting(device_type) if work else None
    metadata = _metadata_ops()
    higher_order = torch._ops.HigherOrderOperator
    device_op = torch.ops.prim.device.default
    composite_key = DispatchKey.CompositeImplicitAutograd
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    known: dict[Any, tuple[int, Callable[..., int] | None]] = {}
    cond = getattr(getattr(torch.ops, "higher_order", None), "cond", None)
    sums = _Sums()

    def describe(func: Any) -> tuple[int, Callable[..., int] | None]:
        """What to do with ``func`` (:data:`_PASS`, :data:`_DECOMPOSE` or :data:`_RUN`) and its FLOP formula."""
        if func is cond and cond is not None:
            return _COND, None
        if func in metadata or isinstance(func, higher_order):
            return _PASS, None
        decomposes = func is not device_op and (composite_key in func.py_kernels
                                                or bool(has_kernel(func.name(), composite_key)))
        return (_DECOMPOSE if decomposes else _RUN), formulas.get(func._overloadpacket)

    class CountingMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped __init_subclass__
        supports_higher_order_operators = True  # torch.cond: see _Sums.cond

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # the body runs under the eager stance: dynamo never steps in (see above)

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            kwargs = kwargs or {}
            action, formula = known.get(func) or known.setdefault(func, describe(func))
            if action != _RUN:
                if action == _PASS:
                    return NotImplemented
                if action == _COND:
                    return sums.cond(self, *args)
                with self:
                    parts = func.decompose(*args, **kwargs)
                if parts is not NotImplemented:
                    return parts
            out = func(*args, **kwargs)
            if formula is not None:
                sums.add(func._overloadpacket, formula(*args, **kwargs, out_val=out))
            if ops is not None:
                ops.op(func, args, kwargs, out)
            return out

    counts = StepCounts(work=ops.count if ops is not None else WorkCount())
    try:
        with eager_instrumented(), CountingMode():  # type: ignore[no-untyped-call]
            yield counts
    finally:
        if ops is not None:
            ops.finish()
        counts.flops = FlopCount(total=int(sums.total), by_precision=tuple(
            (p, tally.flops[p]) for p in Precision if tally.flops.get(p)))


def count_step(fn: Callable[[], T], device_type: str = "cpu") -> tuple[T, FlopCount, WorkCount]:
    """Run ``fn()`` once under :func:`counting`: its result, its FLOPs and its work counts."""
    with counting(device_type) as counts:
        result = fn()
    return result, counts.flops, counts.work
