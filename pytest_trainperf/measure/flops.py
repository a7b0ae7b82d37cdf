"""FLOPs of one step through ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees the aten ops that dominate training cost: matrix multiplies (``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``matmul`` through them), convolutions and their backward, and scaled-dot-product
attention (math, flash, efficient and cuDNN kernels; the CPU flash kernel, which torch's counter
lacks, with the CUDA flash kernel's formula). It does **not** count element-wise ops,
reductions, normalisations, activations, softmax outside SDPA, embedding look-ups or optimizer
updates: the figure is the matmul/conv work, which is what MFU is computed from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` once under the FLOP counter; return its result and the FLOPs counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention())
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())


def _cpu_attention() -> dict[object, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter lacks (it knows the
    CUDA flash, efficient and cuDNN kernels only): the same formulas as for CUDA flash attention."""
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
