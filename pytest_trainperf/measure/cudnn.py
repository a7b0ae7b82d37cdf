"""The ``torch.backends.cudnn.benchmark`` policy of a measurement (``--trainperf-cudnn-benchmark``).

With ``benchmark`` on, cuDNN times its convolution algorithms on the first call of each shape and
keeps the fastest: step times then depend on that choice, so the policy is fixed for the whole
measurement of a cell and recorded in the environment fingerprint (``cudnn.benchmark on|off``).
``keep`` leaves the process's setting alone and records it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pytest_trainperf.settings import CUDNN_BENCHMARK as POLICIES

__all__ = ["POLICIES", "cudnn_benchmark"]


@contextmanager
def cudnn_benchmark(policy: str) -> Iterator[str]:
    """Run the body with ``torch.backends.cudnn.benchmark`` set by ``policy``; yield the setting in
    effect (``on`` or ``off``); restore the previous one after."""
    import torch

    if policy not in POLICIES:
        raise ValueError(f"cudnn benchmark policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    before = bool(torch.backends.cudnn.benchmark)
    if policy != "keep":
        torch.backends.cudnn.benchmark = policy == "on"
    try:
        yield "on" if torch.backends.cudnn.benchmark else "off"
    finally:
        torch.backends.cudnn.benchmark = before
