"""Model FLOPs utilization: FLOPs per step / step time / the device's peak dense FLOP/s.

``mfu`` (percent, higher is better, reported and not gated unless a test gives a tolerance) is the
``flops`` metric (the matmul/conv/attention work of one step, see :mod:`.flops`) over the median step
time over the device's **dense** (non-sparse) peak for the precision in use, from :data:`PEAKS`.

The precision in use is not observable from outside the step (a model may be cast, or run under
autocast), so it is taken from ``torch.get_default_dtype()``; a float32 default on CUDA counts as
``tf32`` when ``torch.get_float32_matmul_precision()`` lets matmuls use TF32 (``high``/``medium``).
A step that really runs in bfloat16 would then get an MFU against the float32 peak (above 100% on a
tensor-core GPU): record the peak that applies instead, ``trainperf.record("peak_flops", 989.5e12,
unit="FLOP/s")``, and MFU uses it. An unknown GPU or precision without that record: no ``mfu`` and a one-line
note; on the CPU (no table) no ``mfu`` unless the peak is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_trainperf.records import Direction, Metric

if TYPE_CHECKING:
    import torch

PEAK_METRIC = "peak_flops"
"""The recorded metric (FLOP/s) that overrides the table's peak."""
T = 1e12
"""teraFLOP/s."""


@dataclass(frozen=True)
class Peak:
    """A device's dense peak FLOP/s per precision."""

    product: str
    """The product as its datasheet names it."""
    pattern: str
    """A case-insensitive regular expression matching ``torch.cuda.get_device_name()``."""
    flops: Mapping[str, float]
    """``float32``, ``tf32``, ``bfloat16``, ``float16`` -> dense peak FLOP/s (a precision the device
    has no fast path for is absent)."""


# Figures are the datasheets' Tensor Core peaks without sparsity: datasheets quote "with sparsity"
# figures (marked *) that are twice the dense ones, halved here. Order matters: first match wins.
PEAKS: tuple[Peak, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TF, TF32 989* TF, BF16/FP16 1,979* TF.
    # H100 PCIe: FP32 51, TF32 756*, BF16/FP16 1,513*. H100 NVL: FP32 60, TF32 835*, BF16/FP16 1,671*.
    Peak("H100 PCIe", r"\bH100\b.*\bPCIe\b", {"float32": 51 * T, "tf32": 378 * T, "bfloat16": 756.5 * T,
                                                "float16": 756.5 * T}),
    Peak("H100 NVL", r"\bH100\b.*\bNVL\b", {"float32": 60 * T, "tf32": 417.5 * T, "bfloat16": 835.5 * T,
                                              "float16": 835.5 * T}),
    Peak("H100 SXM", r"\bH100\b", {"float32": 67 * T, "tf32": 494.5 * T, "bfloat16": 989.5 * T,
                                    "float16": 989.5 * T}),  # torch names it "NVIDIA H100 80GB HBM3"
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: FP32 60, TF32 835*, BF16/FP16 1,671*;
    # H200 SXM: FP32 67, TF32 989*, BF16/FP16 1,979*. GH200 (Grace Hopper datasheet): the H100 SXM figures.
    Peak("H200 NVL", r"\bH200\b.*\bNVL\b", {"float32": 60 * T, "tf32": 417.5 * T, "bfloat16": 835.5 * T,
                                              "float16": 835.5 * T}),
    Peak("H200 SXM", r"\b(G?H200)\b", {"float32": 67 * T, "tf32": 494.5 * T, "bfloat16": 989.5 * T,
                                        "float16": 989.5 * T}),
    # NVIDIA A100 Tensor Core GPU datasheet (40 GB and 80 GB, PCIe and SXM): FP32 19.5, TF32 156 (312*),
    # BF16/FP16 312 (624*).
    Peak("A100", r"\bA100\b", {"float32": 19.5 * T, "tf32": 156 * T, "bfloat16": 312 * T, "float16": 312 * T}),
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5 (125*), BF16/FP16 125 (250*). (A10G is not an NVIDIA
    # datasheet product: not matched.)
    Peak("A10", r"\bA10\b", {"float32": 31.2 * T, "tf32": 62.5 * T, "bfloat16": 125 * T, "float16": 125 * T}),
    # NVIDIA L40S datasheet: FP32 91.6, TF32 366*, BF16/FP16 733*.
    Peak("L40S", r"\bL40S\b", {"float32": 91.6 * T, "tf32": 183 * T, "bfloat16": 366.5 * T, "float16": 366.5 * T}),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*.
    Peak("L4", r"\bL4\b", {"float32": 30.3 * T, "tf32": 60 * T, "bfloat16": 121 * T, "float16": 121 * T}),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP32 82.6, TF32 82.6 (165.2*), BF16/FP16
    # with FP32 accumulate 165.2 (330.4*).
    Peak("GeForce RTX 4090", r"\bRTX 4090\b", {"float32": 82.6 * T, "tf32": 82.6 * T, "bfloat16": 165.2 * T,
                                                "float16": 165.2 * T}),
    # NVIDIA Ampere GA102 GPU architecture whitepaper, GeForce RTX 3090: FP32 35.6, TF32 35.6 (71*),
    # BF16/FP16 with FP32 accumulate 71 (142*).
    Peak("GeForce RTX 3090", r"\bRTX 3090\b", {"float32": 35.6 * T, "tf32": 35.6 * T, "bfloat16": 71 * T,
                                                "float16": 71 * T}),
    # NVIDIA V100 Tensor Core GPU datasheet: V100 SXM2 FP32 15.7, Tensor (FP16) 125; V100 PCIe 14, 112;
    # V100S PCIe 16.4, 130. No TF32, no BF16 fast path.
    Peak("V100S PCIe", r"\bV100S\b", {"float32": 16.4 * T, "float16": 130 * T}),
    Peak("V100 PCIe", r"\bV100\b.*\bPCIe\b", {"float32": 14 * T, "float16": 112 * T}),
    Peak("V100 SXM2", r"\bV100\b", {"float32": 15.7 * T, "float16": 125 * T}),
    # NVIDIA T4 datasheet: FP32 8.1, mixed precision (FP16/FP32) 65.
    Peak("T4", r"\bT4\b", {"float32": 8.1 * T, "float16": 65 * T}),
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
    """``float32``, ``tf32``, ``bfloat16``, ``float16`` or ``float64``: the default dtype, as matmuls see it."""
    import torch

    dtype = torch.get_default_dtype()
    name = str(dtype).removeprefix("torch.")
    if name == "float32" and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return name


def mfu(flops: float, step_time: float, peak: float) -> Metric:
    """``mfu``: ``flops`` per step / ``step_time`` seconds / ``peak`` FLOP/s, in percent."""
    return Metric("mfu", 100.0 * flops / step_time / peak, "%", Direction.HIGHER_IS_BETTER)


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """The peak FLOP/s of ``device`` at the precision in use, or None and a note."""
    import torch

    if device.type != "cuda":  # no table for CPUs: silent, unless the test records the peak
        return None, ""
    return peak_flops(torch.cuda.get_device_name(device), precision_in_use(device))
