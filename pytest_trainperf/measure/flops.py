"""FLOPs of one step through ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees the aten ops that dominate training cost: matrix multiplies (``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``matmul`` through them), convolutions and their backward, and scaled-dot-product
attention (math, flash, efficient and cuDNN kernels). It does **not** count element-wise ops,
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

    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())
