"""FLOPs of one step with ``torch.utils.flop_counter``'s formulas, by the precision they run in.

They are counted in the one counting pass of :mod:`.counting` (with the work counts), which counts
what ``FlopCounterMode`` counts with :func:`flop_formulas` as its custom mapping, to the FLOP.

The counter sees the aten ops that dominate training cost: matrix multiplies (``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``_scaled_mm``, ``matmul`` through them), convolutions and their backward, and
scaled-dot-product attention (math, flash, efficient and cuDNN kernels; the CPU flash kernel, which
torch's counter lacks, with the CUDA flash kernel's formula). It does **not** count element-wise ops,
reductions, normalisations, activations, softmax outside SDPA, embedding look-ups or optimizer
updates: the figure is the matmul/conv work, which is what MFU is computed from.

**By precision.** Every formula of the counter's registry is wrapped (:func:`flop_formulas`) so that
each op's FLOPs are also added to
the :class:`Precision` its inputs run in: the dtype of its first floating-point input (``bfloat16``
under a bf16 autocast, on the CPU as on CUDA), with ``float32`` on a CUDA device of compute
capability 8.0 or later counted as ``tf32`` when the flag that governs that op allows TF32: matmuls
and attention by ``torch.backends.cuda.matmul`` (``fp32_precision``, else ``allow_tf32`` /
``torch.get_float32_matmul_precision()``), convolutions by ``torch.backends.cudnn`` (``conv.fp32_precision``,
else ``allow_tf32``, on by default). Flags are read when the FLOP step starts.

**Causal attention** (``is_causal=True``, or the efficient kernel's causal ``custom_mask_type``)
counts half of torch's formula, which counts the full score and value products: a causal kernel
skips the masked half. An explicit mask (or the math kernel, which multiplies whole matrices and
then masks) is counted in full.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_trainperf.records import Metric

T = TypeVar("T")

TF32_CAPABILITY = (8, 0)
"""The first CUDA compute capability with TF32 tensor cores (Ampere): below it float32 runs as float32."""
CAUSAL_ARGUMENTS = ("is_causal", "custom_mask_type")
"""The attention ops' argument saying the attention is causal (a bool, or a non-zero mask type)."""
CAUSAL_SHARE = 2
"""A causal kernel does 1/CAUSAL_SHARE of the full attention's score and value products."""


class Precision(enum.Enum):
    """The precision an op's multiply-adds run in; the value is the key of :data:`.mfu.PEAKS`' tables."""

    FP64 = "float64"
    FP32 = "float32"
    TF32 = "tf32"
    BF16 = "bfloat16"
    FP16 = "float16"
    FP8 = "float8"
    OTHER = "other"

    @property
    def metric(self) -> str:
        """The metric of this precision's FLOPs: ``flops_bf16``, ``flops_tf32``..."""
        return "flops_" + SHORT[self]


SHORT: Mapping[Precision, str] = {Precision.FP64: "fp64", Precision.FP32: "fp32", Precision.TF32: "tf32",
                                  Precision.BF16: "bf16", Precision.FP16: "fp16", Precision.FP8: "fp8",
                                  Precision.OTHER: "other"}
"""The short names in the metrics' names."""
PRECISION_METRICS = tuple(p.metric for p in Precision)
"""Every per-precision FLOP metric: ``flops_fp64`` ... ``flops_other``."""


class OpKind(enum.Enum):
    """Which TF32 flag governs an op."""

    MATMUL = "matmul"
    CONV = "conv"
    ATTENTION = "attention"


@dataclass(frozen=True)
class Tf32:
    """Whether float32 may run as TF32, per the flags that govern each kind of op."""

    matmul: bool
    """Matmuls and attention (cuBLAS): ``torch.backends.cuda.matmul``."""
    conv: bool
    """Convolutions (cuDNN): ``torch.backends.cudnn``."""


@dataclass(frozen=True)
class FlopCount:
    """The FLOPs of one step: in total and by precision."""

    total: int
    """Every FLOP counted (the ``flops`` metric)."""
    by_precision: tuple[tuple[Precision, int], ...]
    """The FLOPs of each precision that has any, in :class:`Precision` order; empty where the split
    is not known (a torch whose counter hides dtypes from formulas)."""

    def metrics(self) -> list[Metric]:
        """``flops`` and one ``flops_<precision>`` per precision with FLOPs."""
        return [Metric("flops", float(self.total), "FLOP")] + [
            Metric(p.metric, float(n), "FLOP") for p, n in self.by_precision]


def precision_of(dtype: str, kind: OpKind, tf32: Tf32, device_type: str,
                 capability: tuple[int, int] | None) -> Precision:
    """The precision of an op on inputs of ``dtype`` (``float32``, ``bfloat16``...) on a device of
    ``device_type`` and compute ``capability`` (CUDA; None elsewhere)."""
    if dtype == "float32":
        allowed = tf32.conv if kind is OpKind.CONV else tf32.matmul
        has_tf32 = device_type == "cuda" and capability is not None and capability >= TF32_CAPABILITY
        return Precision.TF32 if allowed and has_tf32 else Precision.FP32
    if dtype.startswith("float8"):
        return Precision.FP8
    for precision in (Precision.FP64, Precision.BF16, Precision.FP16):
        if dtype == precision.value:
            return precision
    return Precision.OTHER


def _first_set(*values: object) -> str | None:
    """The first of the new TF32 API's values that says something (not None, not ``none``: inherit)."""
    for value in values:
        if isinstance(value, str) and value != "none":
            return value
    return None


def tf32_flags() -> Tf32:
    """The TF32 flags in effect: the ``fp32_precision`` API (torch 2.9) where it says something, else
    the legacy flags (reading them raises once the new API has been used: they are read second)."""
    import torch

    backends = torch.backends
    matmul = _first_set(getattr(backends.cuda.matmul, "fp32_precision", None),
                        getattr(backends, "fp32_precision", None))
    if matmul is not None:
        matmul_tf32 = matmul == "tf32"
    else:
        try:
            matmul_tf32 = bool(backends.cuda.matmul.allow_tf32)
        except RuntimeError:
            matmul_tf32 = False
        matmul_tf32 = matmul_tf32 or torch.get_float32_matmul_precision() != "highest"
    conv = _first_set(getattr(getattr(backends.cudnn, "conv", None), "fp32_precision", None),
                      getattr(backends.cudnn, "fp32_precision", None), getattr(backends, "fp32_precision", None))
    if conv is not None:
        conv_tf32 = conv == "tf32"
    else:
        try:
            conv_tf32 = bool(backends.cudnn.allow_tf32)
        except RuntimeError:
            conv_tf32 = True  # torch's default
    return Tf32(matmul=matmul_tf32, conv=conv_tf32)


def op_kind(op: object) -> OpKind:
    """Which kind of op a counter registry key is, by its name."""
    name = str(getattr(op, "__name__", op))
    if "conv" in name:
        return OpKind.CONV
    if "attention" in name or "attn" in name:
        return OpKind.ATTENTION
    return OpKind.MATMUL


def causal_position(op: object) -> tuple[int, str] | None:
    """Where the op's causal argument is (position in its default overload, name), if it has one."""
    overload = getattr(op, "default", None)
    schema = getattr(overload, "_schema", None)
    for i, argument in enumerate(getattr(schema, "arguments", ())):
        if argument.name in CAUSAL_ARGUMENTS:
            return i, str(argument.name)
    return None


def is_causal(position: tuple[int, str] | None, args: Sequence[object], kwargs: Mapping[str, object]) -> bool:
    """Whether the call's causal argument (``is_causal`` or a non-zero ``custom_mask_type``) is set."""
    if position is None:
        return False
    index, name = position
    value = kwargs.get(name, args[index] if index < len(args) else None)
    if isinstance(value, bool):
        return value
    return isinstance(value, int) and value != 0


class Tally:
    """FLOPs by precision while a step runs under the counter."""

    def __init__(self, tf32: Tf32) -> None:
        self.tf32 = tf32
        self.flops: dict[Precision, int] = {}
        self._capability: dict[object, tuple[int, int] | None] = {}
        self._precisions: dict[tuple[object, object, OpKind], Precision] = {}

    def precision(self, args: Sequence[object], kind: OpKind) -> Precision:
        import torch

        tensor = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if tensor is None:
            return Precision.OTHER
        key = (tensor.dtype, tensor.device, kind)
        known = self._precisions.get(key)
        if known is None:
            device = tensor.device
            if device not in self._capability:
                self._capability[device] = (torch.cuda.get_device_capability(device) if device.type == "cuda"
                                            else None)
            dtype = str(tensor.dtype).removeprefix("torch.")
            known = self._precisions[key] = precision_of(dtype, kind, self.tf32, device.type,
                                                         self._capability[device])
        return known

    def add(self, precision: Precision, flops: int) -> None:
        self.flops[precision] = self.flops.get(precision, 0) + flops


def _attributed(op: object, formula: Callable[..., Any], tally: Tally) -> Callable[..., int]:
    """``formula`` (taking the op's raw arguments), halved for causal attention, adding its FLOPs to
    the tally under the precision of the op's inputs."""
    kind = op_kind(op)
    causal = causal_position(op) if kind is OpKind.ATTENTION else None

    def count(*args: object, out_val: object = None, **kwargs: object) -> int:
        flops = int(formula(*args, out_val=out_val, **kwargs))
        if is_causal(causal, args, kwargs):
            flops //= CAUSAL_SHARE
        tally.add(tally.precision(args, kind), flops)
        return flops

    count._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes raw arguments, not shapes
    return count


def new_tally() -> Tally:
    """An empty tally of FLOPs by precision, under the TF32 flags in effect now."""
    return Tally(tf32_flags())


def flop_formulas(tally: Tally) -> dict[object, Callable[..., int]]:
    """The FLOP formula of each op the counter knows (by op packet, ``aten.mm``), each taking the op's
    raw arguments and ``out_val``: torch's ``flop_registry`` and the CPU attention kernels, halved for
    causal attention, each adding its FLOPs to ``tally`` under the precision of the op's inputs. As a
    ``custom_mapping`` of ``FlopCounterMode`` they give what :func:`count_flops` counts.

    A formula torch wraps to take shapes (``shape_wrapper``: a pytree map of every argument) is
    re-wrapped by :func:`_on_shapes`, which hands it the same shapes without the pytree machinery."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    formulas: dict[object, Callable[..., Any]] = dict(flop_registry)  # each takes raw arguments
    formulas.update({op: shape_wrapper(f) for op, f in _cpu_attention().items()})  # type: ignore[no-untyped-call]
    wrapped = shape_wrapper(lambda: 0).__code__  # type: ignore[no-untyped-call]
    return {op: _attributed(op, _on_shapes(f) if _wraps(f, wrapped) else f, tally) for op, f in formulas.items()}


def _wraps(formula: object, code: object) -> bool:
    """Whether ``formula`` is torch's ``shape_wrapper`` (its code is ``code``) around a function on shapes."""
    return getattr(formula, "__code__", None) is code and callable(getattr(formula, "__wrapped__", None))


def _shapes(value: object) -> object:
    """What torch's ``shape_wrapper`` hands a formula for an argument: a tensor's shape, lists, tuples
    and dicts of them mapped alike, anything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.shape
    kind = type(value)
    if kind is list or kind is tuple:
        return kind(_shapes(v) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return {k: _shapes(v) for k, v in value.items()}  # type: ignore[attr-defined]
    return value


def _signature(value: object) -> object:
    """A hashable key of what :func:`_shapes` makes of ``value`` (lists and dicts as tuples)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.shape
    kind = type(value)
    if kind is list or kind is tuple:
        return tuple(_signature(v) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return tuple((k, _signature(v)) for k, v in value.items())  # type: ignore[attr-defined]
    return value


def _on_shapes(formula: Callable[..., Any]) -> Callable[..., Any]:
    """The function on shapes inside torch's ``shape_wrapper(formula)``, called with the arguments'
    shapes as ``shape_wrapper`` calls it (``out_shape``: the output's shape), once per distinct
    signature of shapes and other arguments: a formula on shapes is a function of them, and a step
    repeats its layers' shapes (torch's formulas call each other through ``shape_wrapper``, whose
    pytree map costs tens of microseconds a call)."""
    inner: Callable[..., Any] = formula.__wrapped__  # type: ignore[attr-defined]
    known: dict[object, Any] = {}

    def on_shapes(*args: object, out_val: object = None, **kwargs: object) -> Any:
        key: object = (_signature(args), _signature(out_val), _signature(kwargs))
        try:
            return known[key]
        except KeyError:
            pass
        except TypeError:  # an argument that does not hash: counted, not kept
            key = None
        flops = inner(*[_shapes(a) for a in args], out_shape=_shapes(out_val),
                      **{k: _shapes(v) for k, v in kwargs.items()})
        if key is not None:
            known[key] = flops
        return flops

    return on_shapes


def count_flops(fn: Callable[[], T]) -> tuple[T, FlopCount]:
    """Run ``fn()`` once under the counting mode (:mod:`.counting`, FLOPs only); return its result and
    the FLOPs counted: what ``FlopCounterMode`` counts with :func:`flop_formulas`, to the FLOP."""
    from pytest_trainperf.measure.counting import counting

    with counting(work=False) as counts:
        result = fn()
    return result, counts.flops


def _cpu_attention() -> dict[object, Callable[..., int]]:
    """FLOP formulas (on shapes) for the CPU flash-attention kernels, which torch's counter lacks (it
    knows the CUDA flash, efficient and cuDNN kernels only): the same formulas as for CUDA flash attention."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query: object, key: object, value: object, *args: object, **kwargs: object) -> int:
        return int(sdpa_flop_count(query, key, value))  # type: ignore[no-untyped-call]

    def backward(grad_out: object, query: object, key: object, value: object, *args: object,
                 **kwargs: object) -> int:
        return int(sdpa_backward_flop_count(grad_out, query, key, value))  # type: ignore[no-untyped-call]

    mapping: dict[object, Callable[..., int]] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping
