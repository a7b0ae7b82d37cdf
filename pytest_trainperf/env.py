"""The environment fingerprint: what must match for two measurements to be comparable."""

from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_trainperf.records import Fingerprint

if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")
"""Where Linux names the CPU model."""


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The host CPU model, as the OS names it (``model name`` on Linux)."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def fingerprint(device: torch.device, threads: int, malloc: str = "", cudnn_benchmark: str = "") -> Fingerprint:
    """The fingerprint of measuring on ``device`` with ``threads`` intra-op threads; on CUDA also the
    compute capability, driver, cuDNN version and the ``cudnn.benchmark`` setting (``on``/``off``)
    the measurement ran with."""
    import torch

    capability = driver = cudnn = benchmark = ""
    if device.type == "cuda":
        from pytest_trainperf.measure.utilization import driver_version

        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability, driver, benchmark = f"{major}.{minor}", driver_version(), cudnn_benchmark
        version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None  # type: ignore[no-untyped-call]
        cudnn = "" if version is None else str(version)
    elif device.type == "cpu":
        name = cpu_model()
    else:
        name = device.type
    return Fingerprint(
        device=name,
        device_type=device.type,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        threads=threads,
        cpu=cpu_model(),
        malloc=malloc,
        python=platform.python_version(),
        platform=f"{sys.platform}-{platform.machine()}",
        compute_capability=capability,
        driver=driver,
        cudnn=cudnn,
        cudnn_benchmark=benchmark,
    )


FORECAST_DEVICE = "cuda (forecast)"
"""The device a ``tp.forecast`` cell's fingerprint names."""


def forecast_fingerprint() -> Fingerprint:
    """The fingerprint of a forecast on ``meta``: torch's version alone decides it (not the host, its
    threads or its allocator), so a baseline forecast on one runner is judged on any other."""
    import torch

    return Fingerprint(device=FORECAST_DEVICE, device_type="meta", torch=torch.__version__, cuda=None, threads=1,
                       cpu="", python=platform.python_version(), platform=f"{sys.platform}-{platform.machine()}")
