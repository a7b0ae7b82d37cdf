"""Model FLOPs utilization: the step's FLOPs, each share judged against its own dense peak, over the step time.

``mfu`` (percent, higher is better, reported and not gated unless a test gives a tolerance) is the time
the step's matmul/conv/attention FLOPs would take at the device's **dense** (non-sparse) peaks, over the
median step time: ``100 * sum(flops_p / peak_p) / step_time``, summed over the precisions ``p`` the
FLOPs run in (``flops_bf16``, ``flops_tf32``..., counted per op by :mod:`.flops`), each against the
peak for that precision from :data:`PEAKS`. A bf16 autocast step is judged against the bf16 peak, its
float32 optimizer matmuls (if any) against the fp32 or tf32 one, by the flags that governed them.

A MIG slice (NVML reports MIG mode on the GPU, or the device name says ``MIG``) has the share of the
peak that its SMs are of the whole GPU's (:attr:`Peak.sms`), said in a note; where the table does not
know the GPU's SM count, no ``mfu``. An unknown GPU, or a precision the table has no peak for: no
``mfu`` and a one-line note; on the CPU (no table) no ``mfu``. Either way a test may record the peak
that applies, ``trainperf.record("peak_flops", 989.5e12, unit="FLOP/s")``, and MFU is then the total
FLOPs over it. On a torch whose counter gives no split (see :mod:`.flops`), every FLOP counts at the
precision of ``torch.get_default_dtype()`` (``tf32`` for float32 where the matmul flag allows it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_trainperf.records import Direction, Measurement, Metric

if TYPE_CHECKING:
    import torch

PEAK_METRIC = "peak_flops"
"""The recorded metric (FLOP/s) that overrides the table's peak."""
TERA = 1e12
"""One teraFLOP/s, the unit of the table below (named apart from the type variables called T elsewhere)."""


@dataclass(frozen=True)
class Peak:
    """A device's dense peak FLOP/s per precision."""

    product: str
    """The product as its datasheet names it."""
    pattern: str
    """A case-insensitive regular expression matching ``torch.cuda.get_device_name()``."""
    flops: Mapping[str, float]
    """``float32``, ``tf32``, ``bfloat16``, ``float16``, ``float8`` -> dense peak FLOP/s (a precision
    the device has no fast path for is absent)."""
    sms: int = 0
    """The whole GPU's streaming multiprocessors, which a MIG slice has a share of (0: unknown)."""


# Figures are the datasheets' Tensor Core peaks without sparsity: datasheets quote "with sparsity"
# figures (marked *) that are twice the dense ones, halved here. Order matters: first match wins.
PEAKS: tuple[Peak, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TF, TF32 989* TF, BF16/FP16 1,979* TF.
    # H100 PCIe: FP32 51, TF32 756*, BF16/FP16 1,513*. H100 NVL: FP32 60, TF32 835*, BF16/FP16 1,671*.
    # FP8 is twice BF16 (SXM 3,958*, PCIe 3,026*, NVL 3,341*). SMs (whole GPU, for MIG shares): SXM and NVL
    # 132, PCIe 114. torch names the SXM "NVIDIA H100 80GB HBM3".
    Peak("H100 PCIe", r"\bH100\b.*\bPCIe\b", {"float32": 51 * TERA, "tf32": 378 * TERA, "bfloat16": 756.5 * TERA,
                                                "float16": 756.5 * TERA, "float8": 1513 * TERA}, sms=114),
    Peak("H100 NVL", r"\bH100\b.*\bNVL\b", {"float32": 60 * TERA, "tf32": 417.5 * TERA, "bfloat16": 835.5 * TERA,
                                              "float16": 835.5 * TERA, "float8": 1670.5 * TERA}, sms=132),
    Peak("H100 SXM", r"\bH100\b", {"float32": 67 * TERA, "tf32": 494.5 * TERA, "bfloat16": 989.5 * TERA,
                                    "float16": 989.5 * TERA, "float8": 1979 * TERA}, sms=132),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: FP32 60, TF32 835*, BF16/FP16 1,671*;
    # H200 SXM: FP32 67, TF32 989*, BF16/FP16 1,979*, FP8 3,958*. GH200 (Grace Hopper datasheet): the H100 SXM
    # figures. 132 SMs.
    Peak("H200 NVL", r"\bH200\b.*\bNVL\b", {"float32": 60 * TERA, "tf32": 417.5 * TERA, "bfloat16": 835.5 * TERA,
                                              "float16": 835.5 * TERA, "float8": 1670.5 * TERA}, sms=132),
    Peak("H200 SXM", r"\b(G?H200)\b", {"float32": 67 * TERA, "tf32": 494.5 * TERA, "bfloat16": 989.5 * TERA,
                                        "float16": 989.5 * TERA, "float8": 1979 * TERA}, sms=132),
    # NVIDIA A100 Tensor Core GPU datasheet (40 GB and 80 GB, PCIe and SXM): FP32 19.5, TF32 156 (312*),
    # BF16/FP16 312 (624*). 108 SMs.
    Peak("A100", r"\bA100\b", {"float32": 19.5 * TERA, "tf32": 156 * TERA, "bfloat16": 312 * TERA,
                               "float16": 312 * TERA},
         sms=108),
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5 (125*), BF16/FP16 125 (250*). (A10G is not an NVIDIA
    # datasheet product: not matched.)
    Peak("A10", r"\bA10\b", {"float32": 31.2 * TERA, "tf32": 62.5 * TERA, "bfloat16": 125 * TERA,
                             "float16": 125 * TERA}),
    # NVIDIA L40S datasheet: FP32 91.6, TF32 366*, BF16/FP16 733*.
    Peak("L40S", r"\bL40S\b", {"float32": 91.6 * TERA, "tf32": 183 * TERA, "bfloat16": 366.5 * TERA,
                               "float16": 366.5 * TERA}),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*.
    Peak("L4", r"\bL4\b", {"float32": 30.3 * TERA, "tf32": 60 * TERA, "bfloat16": 121 * TERA, "float16": 121 * TERA}),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP32 82.6, TF32 82.6 (165.2*), BF16/FP16
    # with FP32 accumulate 165.2 (330.4*).
    Peak("GeForce RTX 4090", r"\bRTX 4090\b", {"float32": 82.6 * TERA, "tf32": 82.6 * TERA, "bfloat16": 165.2 * TERA,
                                                "float16": 165.2 * TERA}),
    # NVIDIA Ampere GA102 GPU architecture whitepaper, GeForce RTX 3090: FP32 35.6, TF32 35.6 (71*),
    # BF16/FP16 with FP32 accumulate 71 (142*).
    Peak("GeForce RTX 3090", r"\bRTX 3090\b", {"float32": 35.6 * TERA, "tf32": 35.6 * TERA, "bfloat16": 71 * TERA,
                                                "float16": 71 * TERA}),
    # NVIDIA V100 Tensor Core GPU datasheet: V100 SXM2 FP32 15.7, Tensor (FP16) 125; V100 PCIe 14, 112;
    # V100S PCIe 16.4, 130. No TF32, no BF16 fast path.
    Peak("V100S PCIe", r"\bV100S\b", {"float32": 16.4 * TERA, "float16": 130 * TERA}),
    Peak("V100 PCIe", r"\bV100\b.*\bPCIe\b", {"float32": 14 * TERA, "float16": 112 * TERA}),
    Peak("V100 SXM2", r"\bV100\b", {"float32": 15.7 * TERA, "float16": 125 * TERA}),
    # NVIDIA T4 datasheet: FP32 8.1, mixed precision (FP16/FP32) 65.
    Peak("T4", r"\bT4\b", {"float32": 8.1 * TERA, "float16": 65 * TERA}),
)
"""Dense peak FLOP/s of the devices MFU knows, matched against the device name in order."""


def find_peak(device_name: str) -> Peak | None:
    """The table entry of the device named ``device_name`` (first match), or None."""
    for peak in PEAKS:
        if re.search(peak.pattern, device_name, re.IGNORECASE):
            return peak
    return None


def peak_flops(device_name: str, precision: str) -> tuple[float | None, str]:
    """The dense peak FLOP/s of ``device_name`` at ``precision``, or None and a note saying why not."""
    peak = find_peak(device_name)
    if peak is None:
        return None, (f"no mfu for {device_name!r}: not in the peak FLOP/s table (pytest_trainperf/measure/"
                      f"mfu.py); record the peak: trainperf.record({PEAK_METRIC!r}, <FLOP/s>, unit='FLOP/s')")
    if precision not in peak.flops:
        return None, (f"no mfu for {device_name!r}: no {precision} peak in the table ({peak.product}: "
                      f"{', '.join(peak.flops)}); record the peak: trainperf.record({PEAK_METRIC!r}, <FLOP/s>)")
    return peak.flops[precision], ""


def precision_in_use(device: torch.device) -> str:
    """``float32``, ``tf32``, ``bfloat16``, ``float16`` or ``float64``: the default dtype, as matmuls see
    it (the fallback where the FLOP counter gives no split by precision)."""
    import torch

    from pytest_trainperf.measure.flops import tf32_flags

    name = str(torch.get_default_dtype()).removeprefix("torch.")
    if name == "float32" and device.type == "cuda" and tf32_flags().matmul:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return "tf32"
    return name


def mfu(flops: float, step_time: float, peak: float) -> Metric:
    """``mfu``: ``flops`` per step / ``step_time`` seconds / ``peak`` FLOP/s, in percent."""
    return Metric("mfu", 100.0 * flops / step_time / peak, "%", Direction.HIGHER_IS_BETTER)


@dataclass(frozen=True)
class DevicePeaks:
    """The dense peaks that apply to the measured device (a MIG slice's share of its GPU's)."""

    device: str
    """The device's name (``torch.cuda.get_device_name``), or its type off CUDA."""
    product: str
    """The table's product ("" when the device is not in the table)."""
    flops: tuple[tuple[str, float], ...]
    """Precision (``bfloat16``...) -> dense peak FLOP/s, already scaled for a MIG slice; empty: none."""
    note: str = ""
    """Why there is no peak (unknown GPU, MIG slice of an unknown SM count), or how it was scaled."""

    def peak(self, precision: str) -> float | None:
        """The peak at ``precision``, None if the table has none."""
        return dict(self.flops).get(precision)


NO_PEAKS = DevicePeaks(device="cpu", product="", flops=())
"""No table (the CPU and other non-CUDA devices): no mfu, silently, unless the test records the peak."""


def mig_scale(peak: Peak, slice_sms: int, whole: str) -> tuple[float | None, str]:
    """The share of ``peak`` a MIG slice with ``slice_sms`` SMs has, and a note; None (and why) when
    the table does not know the whole GPU's SM count."""
    if peak.sms <= 0 or slice_sms <= 0:
        return None, (f"no mfu for the MIG slice {whole!r}: the table has no SM count for {peak.product}, so "
                      f"its share of the GPU's peak is unknown; record the peak: trainperf.record({PEAK_METRIC!r}, "
                      "<FLOP/s>)")
    share = min(1.0, slice_sms / peak.sms)
    return share, (f"mfu of the MIG slice {whole!r} is against {slice_sms}/{peak.sms} of the {peak.product} "
                   f"peaks (its share of the GPU's SMs)")


def peaks_for(name: str, mig: bool, slice_sms: int) -> DevicePeaks:
    """The peaks of a CUDA device named ``name``; a MIG slice (``mig``) of ``slice_sms`` SMs gets its share."""
    peak = find_peak(name)
    if peak is None:
        return DevicePeaks(device=name, product="", flops=(), note=peak_flops(name, "float32")[1])
    scale, note = mig_scale(peak, slice_sms, name) if mig else (1.0, "")
    if scale is None:
        return DevicePeaks(device=name, product=peak.product, flops=(), note=note)
    return DevicePeaks(device=name, product=peak.product,
                       flops=tuple((p, v * scale) for p, v in peak.flops.items()), note=note)


def device_peaks(device: torch.device, nvml: Any = None) -> DevicePeaks:
    """The peaks of ``device`` (:data:`NO_PEAKS` off CUDA); MIG from NVML, else from the device name."""
    import torch

    if device.type != "cuda":
        return NO_PEAKS
    from pytest_trainperf.measure.utilization import mig_mode

    name = torch.cuda.get_device_name(device)
    mig, _ = mig_mode(device, nvml)
    if mig is None:  # NVML cannot say: a MIG device's name says so (``... MIG 1g.10gb``)
        mig = re.search(r"\bMIG\b", name) is not None
    sms = int(torch.cuda.get_device_properties(device).multi_processor_count)
    return peaks_for(name, mig, sms)


def measured_mfu(measured: Measurement, peaks: DevicePeaks, fallback: str) -> tuple[Metric | None, str]:
    """``mfu`` of a measurement from its ``flops_<precision>`` split (or all its ``flops`` at
    ``fallback`` precision where there is no split), each share against its own peak; or None and a
    note saying why not ("" on a device without a table)."""
    from pytest_trainperf.measure.flops import Precision

    total, step = measured.metric("flops"), measured.metric("step_time")
    if total is None or step is None or not step.value > 0:
        return None, ""
    split = [(p.value, m.value) for p in Precision if (m := measured.metric(p.metric)) is not None and m.value > 0]
    if not split:
        split = [(fallback, total.value)] if total.value > 0 else []
    if not peaks.flops:
        return None, peaks.note
    missing = [p for p, _ in split if not (peaks.peak(p) or 0) > 0]
    if missing:
        have = ", ".join(p for p, _ in peaks.flops)
        return None, (f"no mfu for {peaks.device!r}: FLOPs run in {', '.join(missing)}, which has no peak in the "
                      f"table ({peaks.product}: {have}); record the peak: trainperf.record({PEAK_METRIC!r}, <FLOP/s>)")
    seconds = sum(flops / (peaks.peak(p) or 1.0) for p, flops in split)
    return Metric("mfu", 100.0 * seconds / step.value, "%", Direction.HIGHER_IS_BETTER), peaks.note
