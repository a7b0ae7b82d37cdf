"""The GPU self-check: run it on the first CUDA machine at hand, ``python benchmarks/gpu_check.py --out docs/gpu.md``.

In under 8 minutes, each stage in its own process group with its own timeout (a hung stage is killed and
reported, the others still run), it:

1. ``environment``: device, count, compute capability, MIG, driver, torch, CUDA, cuDNN, NVML;
2. ``mfu``: the MFU of a bf16 matmul-heavy step against the table's bf16 peak (and that its FLOPs count as bf16);
3. ``memory``: ``peak_memory`` of a training step against ``torch.cuda.max_memory_allocated`` read directly;
4. ``overhead``: trainperf's timed loop against a bare loop timed with CUDA events, alternating blocks;
5. ``xdist``: two pytest-xdist workers on ``cuda:0`` (and ``cuda:1`` where there is one): each measures on
   its own device, with that device current;
6. ``cuda-tests``: the CUDA tests of ``tests/`` for real (a CUDA test that skips on a CUDA machine fails the stage);
7. ``examples``: ``examples/`` with ``--trainperf-device=cuda``: an update into a temporary baselines
   directory (never the committed one), then two compare runs against it;

and writes every figure into ``--out`` with the device, driver, torch and CUDA versions, also when a
stage fails or times out (saying which and why). Without CUDA it exits with code 2 and says so.

``--device cpu`` rehearses the same stages on the CPU (the CUDA tests then skip, the figures are the
CPU's) to prove the plumbing; ``--quick`` runs one example file with two update rounds. Needs the
project importable (``pip install --no-deps --no-build-isolation -e .``, or nothing: the stages put the
repository on ``PYTHONPATH`` and load the plugin with ``PYTEST_PLUGINS`` when it is not installed);
pytest-xdist and nvidia-ml-py are used when present. Nothing is fetched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450.0
"""The whole check's wall-clock budget (8 minutes, less a margin for starting up and writing)."""
NO_CUDA_EXIT = 2
"""Exit status when the machine has no CUDA device (and ``--device`` is ``cuda``)."""
TAIL_CHARS = 1500
"""How much of a failed stage's output the report keeps."""
STEP_SECONDS = 0.020
"""The GPU step the overhead is measured on."""
OVERHEAD_PAIRS = 10
"""Alternating block pairs (trainperf's loop, bare loop) of the overhead stage."""
OVERHEAD_STEPS = 10
"""Steps per block."""
CUDA_TEST_FILES = ("tests/test_device.py", "tests/test_timing.py", "tests/test_measure_memory.py",
                   "tests/test_utilization.py", "tests/test_oom.py", "tests/test_plugin.py")
"""The files holding the CUDA tests."""
CUDA_TEST_FILTER = "cuda and not without_cuda and not unavailable_backend"
"""``-k`` selecting the tests that need CUDA (the refusals for machines without it are left out)."""


@dataclass(frozen=True)
class Stage:
    """One stage of the check."""

    name: str
    """Its name, on the command line (``--stage``) and in the report."""
    title: str
    """What it checks, one line."""
    timeout: float
    """Its own wall-clock limit in seconds (cut to what is left of :data:`BUDGET_S`)."""


STAGES = (
    Stage("environment", "device, driver, torch, CUDA, cuDNN and NVML versions", 60),
    Stage("mfu", "MFU of a bf16 matmul-heavy step against the table's peak", 60),
    Stage("memory", "peak_memory against torch.cuda.max_memory_allocated read directly", 45),
    Stage("forecast", "tp.forecast's meta forecast against max_memory_allocated: MLP, example cells, 1B model", 90),
    Stage("overhead", "timing overhead against a bare loop timed with CUDA events", 60),
    Stage("xdist", "two pytest-xdist workers, each on its own device", 75),
    Stage("cuda-tests", "the CUDA tests of tests/, for real", 120),
    Stage("examples", "examples/ on the device: an update, then two compare runs", 300),
)


@dataclass
class Outcome:
    """What a stage gave (written by the stage's process as JSON, read back by the check)."""

    status: str = "ok"
    """``ok``, ``failed``, ``timed out``, ``skipped``."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Name -> value, in the order they were measured."""
    detail: str = ""
    """Why it failed, or what the reader should know."""
    seconds: float = 0.0
    """Wall time of the stage."""


# ------------------------------------------------------------------ helpers the stages share


def pytest_env() -> dict[str, str]:
    """The environment for a pytest child: the repository importable, the plugin loaded even when the
    package is not installed (and only then: loading it twice is an error)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    installed = any(ep.name == "trainperf" for ep in metadata.entry_points(group="pytest11"))
    if not installed:
        env["PYTEST_PLUGINS"] = ",".join(p for p in (env.get("PYTEST_PLUGINS", ""), "pytest_trainperf.plugin") if p)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_pytest(args: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` (no cache, no random order), its output captured."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    return subprocess.run(command, cwd=cwd, env=pytest_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def tail(text: str) -> str:
    return text[-TAIL_CHARS:].strip()


def summary_line(output: str) -> str:
    """pytest's last line (``3 passed, 1 skipped in 2.1s``)."""
    lines = [line.strip("= ") for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def device_of(name: str) -> Any:
    import torch

    return torch.device(name)


def matmul_step(device: Any, seconds: float, dtype_name: str = "bfloat16") -> tuple[Callable[[], Any], int, int]:
    """A step of back-to-back ``size x size`` matmuls lasting about ``seconds`` on ``device``
    (calibrated here); returns it, the matrix size and the matmuls per step."""
    import torch

    dtype = getattr(torch, dtype_name)
    size = 8192 if device.type == "cuda" else 128  # the CPU has no fast bf16 path: small, for the rehearsal
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run(n: int) -> Any:
        out = a
        for _ in range(n):
            out = a @ b
        return out

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    run(2)
    sync()
    start = time.perf_counter()
    run(10)
    sync()
    n = max(1, round(10 * seconds / max(time.perf_counter() - start, 1e-9)))
    return (lambda: run(n)), size, n


# ------------------------------------------------------------------ the stages (each in its own process)


def stage_environment(device_name: str, quick: bool) -> Outcome:
    import torch

    from pytest_trainperf.env import cpu_model

    figures: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "CUDA (torch build)": torch.version.cuda or "none", "host CPU": cpu_model()}
    device = device_of(device_name)
    if device.type == "cuda":
        from pytest_trainperf.measure.mfu import device_peaks
        from pytest_trainperf.measure.utilization import driver_version, mig_mode

        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        mig, why = mig_mode(device)
        peaks = device_peaks(device)
        figures.update({
            "device": torch.cuda.get_device_name(device), "CUDA devices": torch.cuda.device_count(),
            "compute capability": f"{major}.{minor}", "SMs": props.multi_processor_count,
            "memory": f"{props.total_memory / 2**30:.1f} GiB", "driver": driver_version() or "unknown (no NVML)",
            "cuDNN": str(torch.backends.cudnn.version()), "MIG": {True: "yes", False: "no", None: why}[mig],
            "peak table entry": peaks.product or "none", "peak note": peaks.note or "none",
        })
    else:
        figures["device"] = f"{device.type} (rehearsal: no GPU figures)"
    try:
        figures["nvidia-ml-py"] = metadata.version("nvidia-ml-py")
    except metadata.PackageNotFoundError:
        figures["nvidia-ml-py"] = "not installed"
    try:
        figures["pytest-xdist"] = metadata.version("pytest-xdist")
    except metadata.PackageNotFoundError:
        figures["pytest-xdist"] = "not installed"
    return Outcome(figures=figures)


def stage_mfu(device_name: str, quick: bool) -> Outcome:

    from pytest_trainperf.fixture import timing_metrics
    from pytest_trainperf.measure.flops import Precision, count_flops
    from pytest_trainperf.measure.mfu import NO_PEAKS, device_peaks, measured_mfu
    from pytest_trainperf.measure.timing import time_steps
    from pytest_trainperf.records import Measurement

    device = device_of(device_name)
    step, size, n = matmul_step(device, STEP_SECONDS)
    _, flops = count_flops(step)
    timed = time_steps(step, 20, device, warmup=3)
    metrics = tuple(timing_metrics(timed.samples, None) + flops.metrics())
    measured = Measurement(test="gpu_check", cell="mfu", params=(), metrics=metrics)
    peaks = device_peaks(device) if device.type == "cuda" else NO_PEAKS
    metric, note = measured_mfu(measured, peaks, "bfloat16")
    step_time = statistics.median(timed.samples)
    bf16 = dict(flops.by_precision).get(Precision.BF16, 0)
    bf16_peak = peaks.peak("bfloat16")
    figures = {
        "step": f"{n} x bf16 matmul {size}x{size}", "step time (median)": f"{step_time * 1e3:.3f} ms",
        "FLOPs per step": flops.total, "FLOPs counted as bf16": f"{bf16} ({100 * bf16 / max(flops.total, 1):.1f}%)",
        "achieved": f"{flops.total / step_time / 1e12:.1f} TFLOP/s",
        "bf16 dense peak (table)": f"{bf16_peak / 1e12:.1f} TFLOP/s" if bf16_peak else "none",
        "mfu": f"{metric.value:.1f}%" if metric is not None else f"none ({note or 'no peak table for this device'})",
    }
    ok = bf16 == flops.total > 0
    if device.type == "cuda":
        ok = ok and metric is not None and 0 < metric.value <= 100
    return Outcome(status="ok" if ok else "failed", figures=figures,
                   detail="" if ok else "expected every FLOP counted as bf16 and 0 < mfu <= 100%")


def mlp_step(device: Any, width: int) -> Callable[[], Any]:
    """An AdamW training step of a two-layer MLP of ``width``, built on ``device`` (the memory stages')."""
    import torch
    from torch import nn

    with torch.device(device):
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        x = torch.randn(64, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def stage_memory(device_name: str, quick: bool) -> Outcome:
    import torch

    from pytest_trainperf.measure.memory import Preexisting, measure_peak

    device = device_of(device_name)
    torch.manual_seed(0)
    step = mlp_step(device, 4096 if device.type == "cuda" else 256)
    step()  # optimizer state exists before the measured step, as after a cell's warm-up
    outside = Preexisting(device)
    _, peak = measure_peak(step, device, outside)
    figures: dict[str, Any] = {"method": peak.method, "peak_memory": peak.peak_bytes,
                               "reserved_memory": peak.reserved_bytes, "start bytes": peak.start_bytes,
                               "baseline bytes": peak.baseline_bytes}
    if device.type != "cuda":
        return Outcome(figures=figures, detail="rehearsal: the CPU has no allocator counters to compare with")
    direct = torch.cuda.max_memory_allocated(device)  # the peak of the measured step (measure_peak reset it)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    again = torch.cuda.max_memory_allocated(device) - before
    figures.update({"max_memory_allocated (direct)": direct, "peak_memory + baseline": peak.peak_bytes +
                    peak.baseline_bytes, "rise of an unmeasured step (direct)": again,
                    "rise of the measured step": peak.peak_bytes - peak.start_bytes})
    ok = (peak.peak_bytes + peak.baseline_bytes == direct and peak.reserved_bytes is not None
          and peak.reserved_bytes >= peak.peak_bytes)
    return Outcome(status="ok" if ok else "failed", figures=figures,
                   detail="" if ok else "peak_memory + baseline differs from max_memory_allocated, or reserved < peak")


FORECAST_WITHIN = 0.10
"""The forecast's goal against the real peak: within 10% per cell..."""
FORECAST_UNDER = 0.05
"""...and never under it by more than 5% (a forecast that says "fits" must fit)."""


def forecast_cases(quick: bool) -> dict[str, Callable[[Any], Callable[[], Any]]]:
    """Builders of the steps the forecast stage compares: each takes a device, builds its model and data
    there, and returns the step."""
    import torch
    from torch import nn

    sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
    from _llama import KVCache, Llama, LlamaConfig
    from _models import TinyLM, lm_train_step

    def mlp(device: Any) -> Callable[[], Any]:
        return mlp_step(device, 4096)

    def tiny(spec: dict[str, int]) -> Callable[[Any], Callable[[], Any]]:
        def build(device: Any) -> Callable[[], Any]:
            torch.manual_seed(0)
            model = TinyLM(d_model=spec["d_model"], heads=spec.get("heads", 4), layers=spec["layers"],
                           checkpointed=range(spec["layers"]) if spec.get("checkpointed") else ()).to(device)
            return lm_train_step(model, spec["batch_size"], spec["seq_len"], device)
        return build

    small = LlamaConfig(width=2048, layers=4 if quick else 22, heads=32, ffn=5632)  # TinyLlama's 1.1B shape

    def llama_train(device: Any) -> Callable[[], Any]:
        with torch.device(device):
            model = Llama(small, max_len=1024).to(torch.bfloat16)
            tokens = torch.zeros(4, 512, dtype=torch.long)
            targets = torch.zeros(4, dtype=torch.long)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(tokens)[:, -1].float(), targets)
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    def llama_prefill(device: Any) -> Callable[[], Any]:
        with torch.device(device):
            model = Llama(small, max_len=2048).to(torch.bfloat16).eval()

        @torch.inference_mode()
        def prefill() -> Any:
            cache = KVCache(small, 16, 1024 + 128, torch.bfloat16, torch.device(device))
            tokens = torch.zeros(16, 1024, dtype=torch.long, device=device)
            return model(tokens, cache)
        return prefill

    cases: dict[str, Callable[[Any], Callable[[], Any]]] = {"MLP 4096 (AdamW)": mlp}
    cases["TinyLM d64 x4, batch 16 x 256, checkpointed"] = tiny({"d_model": 64, "layers": 4, "batch_size": 16,
                                                                 "seq_len": 256, "checkpointed": 1})
    cases["TinyLM d384 x2, batch 8 x 64"] = tiny({"d_model": 384, "heads": 4, "layers": 2, "batch_size": 8,
                                                  "seq_len": 64})
    cases[f"Llama {small.layers} x 2048 bf16, AdamW, 4 x 512"] = llama_train
    cases[f"Llama {small.layers} x 2048 bf16, prefill 16 x 1024"] = llama_prefill
    return cases


def stage_forecast(device_name: str, quick: bool) -> Outcome:
    import gc

    import torch

    from pytest_trainperf.measure.forecast import forecast_peak

    device = device_of(device_name)
    figures: dict[str, Any] = {}
    failures = []
    for name, build in forecast_cases(quick).items():
        calls = 1 if "prefill" in name else 2
        _, forecast = forecast_peak(build(torch.device("meta")), calls=calls)
        if device.type != "cuda":
            figures[name] = f"forecast {forecast.peak_bytes} B (rehearsal: no allocator counters on the CPU)"
            continue
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step = build(device)
        for _ in range(calls):
            out = step()
        torch.cuda.synchronize(device)
        real = torch.cuda.max_memory_allocated(device) - before
        del step, out
        gc.collect()
        error = forecast.peak_bytes / real - 1 if real else float("nan")
        figures[name] = (f"forecast {forecast.peak_bytes / 2**20:.1f} MiB, max_memory_allocated "
                         f"{real / 2**20:.1f} MiB, {error * 100:+.1f}% ({dict(forecast.attention)})")
        if not (abs(error) <= FORECAST_WITHIN and error >= -FORECAST_UNDER):
            failures.append(f"{name}: {error * 100:+.1f}%")
    if device.type != "cuda":
        return Outcome(figures=figures, detail="rehearsal: the CPU has no allocator counters to compare with")
    return Outcome(status="failed" if failures else "ok", figures=figures,
                   detail="outside +-10% or under by more than 5%: " + "; ".join(failures) if failures else
                   "goal: within 10% of max_memory_allocated per case, never under it by more than 5%")


def stage_overhead(device_name: str, quick: bool) -> Outcome:
    import torch

    from pytest_trainperf.measure.timing import time_steps

    device = device_of(device_name)
    step, size, n = matmul_step(device, STEP_SECONDS)
    cuda = device.type == "cuda"

    def bare() -> float:
        """Seconds per step of a bare loop: CUDA events around the block, one synchronization at its end."""
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            begin.record()
            for _ in range(OVERHEAD_STEPS):
                step()
            end.record()
            torch.cuda.synchronize(device)
            return float(begin.elapsed_time(end)) / 1e3 / OVERHEAD_STEPS
        start = time.perf_counter()
        for _ in range(OVERHEAD_STEPS):
            step()
        return (time.perf_counter() - start) / OVERHEAD_STEPS

    def ours() -> float:
        return statistics.mean(time_steps(step, OVERHEAD_STEPS, device, warmup=1, settle=False).samples)

    for _ in range(3):
        step()
    ratios, bare_s = [], []
    for i in range(OVERHEAD_PAIRS):
        if i % 2:
            b, t = bare(), ours()
        else:
            t, b = ours(), bare()
        ratios.append(t / b)
        bare_s.append(b)
    ratio = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    figures = {"step": f"{n} x bf16 matmul {size}x{size}", "bare step (median)": f"{statistics.median(bare_s) * 1e3:.3f} ms",
               "trainperf step time / bare, median of pair ratios": f"{ratio:.4f} ({(ratio - 1) * 100:+.2f}%)",
               "interquartile range of the ratios": f"{quartiles[0]:.4f} to {quartiles[2]:.4f}",
               "blocks": f"{OVERHEAD_PAIRS} pairs of {OVERHEAD_STEPS} steps, alternating"}
    ok = not cuda or abs(ratio - 1) < 0.05
    return Outcome(status="ok" if ok else "failed", figures=figures,
                   detail="" if ok else "trainperf's step time is more than 5% off the bare loop's")


XDIST_TEST = '''
import json
import os

import torch


def test_where(trainperf):
    x = torch.randn(256, 256, device=trainperf.device)
    trainperf.train(lambda: (x @ x).square().mean(), steps=5, warmup=1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    seen = {"device": str(trainperf.device), "tensor": str(x.device), "pid": os.getpid()}
    if trainperf.device.type == "cuda":
        seen["current"] = torch.cuda.current_device()
    (OUT / f"{worker}.json").write_text(json.dumps(seen))
'''


def stage_xdist(device_name: str, quick: bool) -> Outcome:
    import torch

    device = device_of(device_name)
    if device.type == "cuda":
        devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]
    else:
        devices = [device.type, device.type]
    try:
        metadata.version("pytest-xdist")
    except metadata.PackageNotFoundError:
        return Outcome(status="failed", detail="pytest-xdist is not installed")
    with tempfile.TemporaryDirectory(prefix="trainperf-xdist-") as tmp:
        root = Path(tmp)
        (root / "test_where.py").write_text(f"from pathlib import Path\nOUT = Path({str(root)!r})\n" + XDIST_TEST)
        result = run_pytest(["-p", "xdist", "-n", "2", "--dist", "each", "--trainperf", "-q",
                             f"--trainperf-devices={','.join(devices)}", f"--trainperf-baselines={root / 'b'}",
                             "--trainperf-threads=1", "test_where.py"], timeout=70, cwd=root)
        seen = {w: json.loads((root / f"{w}.json").read_text()) for w in ("gw0", "gw1") if (root / f"{w}.json").exists()}
    figures: dict[str, Any] = {"--trainperf-devices": ",".join(devices), "pytest": summary_line(result.stdout)}
    problems = []
    for i, worker in enumerate(("gw0", "gw1")):
        got = seen.get(worker)
        if got is None:
            problems.append(f"{worker} reported nothing")
            continue
        figures[worker] = ", ".join(f"{k} {v}" for k, v in got.items())
        want = torch.device(devices[i])
        if got["device"] != str(want) or torch.device(got["tensor"]).type != want.type:
            problems.append(f"{worker} measured on {got['device']} (tensor on {got['tensor']}), expected {want}")
        if want.type == "cuda" and got.get("current") != want.index:
            problems.append(f"{worker}'s current device is cuda:{got.get('current')}, expected {want}")
    if result.returncode != 0:
        problems.append(f"pytest exited {result.returncode}: {tail(result.stdout + result.stderr)}")
    return Outcome(status="failed" if problems else "ok", figures=figures, detail="; ".join(problems))


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """Outcome counts of a JUnit XML file, and the skipped tests with their reasons."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    skipped = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("skipped") is not None:
            counts["skipped"] += 1
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}")  # type: ignore[union-attr]
        elif case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("error") is not None:
            counts["errors"] += 1
        else:
            counts["passed"] += 1
    return counts, skipped


def stage_cuda_tests(device_name: str, quick: bool, timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="trainperf-tests-") as tmp:
        xml = Path(tmp) / "junit.xml"
        result = run_pytest([*CUDA_TEST_FILES, "-k", CUDA_TEST_FILTER, "-q", "-rs", f"--junitxml={xml}"],
                            timeout=timeout)
        counts, skipped = junit_counts(xml) if xml.exists() else ({}, [])
    figures: dict[str, Any] = {"selected": f"-k '{CUDA_TEST_FILTER}' in {len(CUDA_TEST_FILES)} files",
                               **counts, "pytest": summary_line(result.stdout)}
    if skipped:
        figures["skipped tests"] = skipped
    cuda = device_of(device_name).type == "cuda"
    problems = []
    if not counts:
        problems.append(f"no JUnit result (pytest exited {result.returncode})")
    if counts.get("failed") or counts.get("errors"):
        problems.append(f"{counts['failed']} failed, {counts['errors']} errors")
    if cuda and skipped:
        problems.append(f"{len(skipped)} CUDA test(s) skipped on a CUDA machine")
    detail = "; ".join(problems)
    if problems:
        detail += "\n" + tail(result.stdout)
    elif not cuda:
        detail = "rehearsal: without CUDA every CUDA test skips (their reasons are listed)"
    return Outcome(status="failed" if problems else "ok", figures=figures, detail=detail)


def cells_of(path: Path) -> tuple[int, dict[str, int]]:
    """Cells of a results file and their statuses."""
    doc = json.loads(path.read_text())
    statuses: dict[str, int] = {}
    for cell in doc["cells"]:
        status = str(cell.get("verdict", {}).get("status", cell.get("status", "?")))
        statuses[status] = statuses.get(status, 0) + 1
    return len(doc["cells"]), statuses


def stage_examples(device_name: str, quick: bool, timeout: float) -> Outcome:
    deadline = time.monotonic() + timeout
    targets = ["examples/test_batch_scan.py"] if quick else ["examples"]
    common = [*targets, f"--trainperf-device={device_name}", "-q"]
    if device_of(device_name).type == "cpu":
        common.append("--trainperf-threads=1")
    figures: dict[str, Any] = {"examples": " ".join(targets)}
    problems = []
    with tempfile.TemporaryDirectory(prefix="trainperf-baselines-") as tmp:
        baselines = Path(tmp) / "baselines"
        runs = [("update", ["--trainperf-update-baselines", *(["--trainperf-rounds=2"] if quick else [])]),
                ("compare 1", ["--trainperf"]), ("compare 2", ["--trainperf"])]
        for i, (name, extra) in enumerate(runs):
            left = deadline - time.monotonic()
            share = left * (0.55 if i == 0 else 1.0 / (len(runs) - i))  # the update (noise rounds) takes the most
            out = Path(tmp) / f"{i}.json"
            started = time.monotonic()
            try:
                result = run_pytest([*common, *extra, f"--trainperf-baselines={baselines}",
                                     f"--trainperf-json={out}"], timeout=max(share, 1.0))
            except subprocess.TimeoutExpired:
                problems.append(f"{name} timed out after {share:.0f} s")
                break
            seconds = time.monotonic() - started
            if out.exists():
                count, statuses = cells_of(out)
                figures[name] = f"{count} cells in {seconds:.0f} s: " + ", ".join(f"{n} {s}" for s, n in
                                                                               sorted(statuses.items()))
            else:
                figures[name] = f"no results ({seconds:.0f} s)"
            figures[f"{name}: pytest"] = summary_line(result.stdout)
            if result.returncode not in (0, 1) or not out.exists():
                problems.append(f"{name}: pytest exited {result.returncode}: {tail(result.stdout + result.stderr)}")
                break
            if result.returncode == 1:  # cells regressed against a baseline taken minutes earlier: false alarms
                problems.append(f"{name}: cells failed against the fresh baseline (false alarms on unchanged code)")
    if quick:
        figures["note"] = "--quick: one example file, two update rounds"
    return Outcome(status="failed" if problems else "ok", figures=figures, detail="; ".join(problems))


RUNNERS: dict[str, Callable[..., Outcome]] = {
    "environment": stage_environment, "mfu": stage_mfu, "memory": stage_memory, "forecast": stage_forecast,
    "overhead": stage_overhead,
    "xdist": stage_xdist, "cuda-tests": stage_cuda_tests, "examples": stage_examples,
}
TIMED_INSIDE = ("cuda-tests", "examples")
"""Stages that pass their time limit on to the pytest runs they start."""


def run_stage_here(name: str, device: str, quick: bool, timeout: float, result: Path) -> None:
    """The child's side: run one stage and write its outcome as JSON."""
    sys.path.insert(0, str(ROOT))
    try:
        runner = RUNNERS[name]
        inner = max(timeout - 5.0, 1.0)  # leave the child time to write its result
        outcome = runner(device, quick, inner) if name in TIMED_INSIDE else runner(device, quick)
    except subprocess.TimeoutExpired as exc:
        outcome = Outcome(status="timed out", detail=f"a command ran past its limit: {exc}")
    except Exception as exc:  # reported, never raised: the check goes on to the next stage
        import traceback

        outcome = Outcome(status="failed", detail=f"{type(exc).__name__}: {exc}\n{tail(traceback.format_exc())}")
    result.write_text(json.dumps({"status": outcome.status, "figures": outcome.figures, "detail": outcome.detail},
                                 default=str))


def run_stage(stage: Stage, device: str, quick: bool, timeout: float) -> Outcome:
    """The check's side: the stage in its own process group, killed (the whole group) past ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="trainperf-stage-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--device", device,
                   "--timeout", f"{timeout:.1f}", "--result", str(result), *(["--quick"] if quick else [])]
        started = time.monotonic()
        child = subprocess.Popen(command, cwd=ROOT, env=pytest_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            return Outcome(status="timed out", seconds=time.monotonic() - started,
                           detail=f"killed after its {timeout:.0f} s limit\n{tail(output or '')}")
        seconds = time.monotonic() - started
        if not result.exists():
            return Outcome(status="failed", seconds=seconds,
                           detail=f"the stage's process exited {child.returncode} without a result\n{tail(output or '')}")
        data = json.loads(result.read_text())
    return Outcome(status=data["status"], figures=data["figures"], detail=data["detail"], seconds=seconds)


# ------------------------------------------------------------------ the report


def render(outcomes: dict[str, Outcome], device: str, quick: bool, total: float) -> str:
    env = outcomes.get("environment", Outcome()).figures
    rehearsal = not device.startswith("cuda")
    head = "REHEARSAL on the CPU: the plumbing of the check, no GPU figures. " if rehearsal else ""
    lines = [
        "# pytest-trainperf on a GPU",
        "",
        f"{head}Written by `python benchmarks/gpu_check.py --device {device}{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} in {total:.0f} s.",
        "",
        f"**{env.get('device', device)}**, driver {env.get('driver', 'n/a')}, torch {env.get('torch', '?')}, "
        f"CUDA {env.get('CUDA (torch build)', '?')}, cuDNN {env.get('cuDNN', 'n/a')}, Python {env.get('python', '?')}.",
        "",
        "| stage | checks | status | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for stage in STAGES:
        o = outcomes.get(stage.name, Outcome(status="skipped", detail="not run"))
        lines.append(f"| {stage.name} | {stage.title} | {o.status} | {o.seconds:.1f} |")
    failed = [n for n, o in outcomes.items() if o.status != "ok"]
    lines += ["", f"Stages not ok: {', '.join(failed)}." if failed else "Every stage ok."]
    for stage in STAGES:
        o = outcomes.get(stage.name)
        if o is None:
            continue
        lines += ["", f"## {stage.name}: {o.status}", "", stage.title + ".", ""]
        if o.figures:
            lines += ["| figure | value |", "| --- | --- |"]
            for key, value in o.figures.items():
                if isinstance(value, list):
                    value = "<br>".join(str(v).replace("|", "\\|") for v in value) or "none"
                lines.append(f"| {key} | {str(value).replace('|', '/')} |")
        if o.detail:
            lines += ["", "```", o.detail.strip(), "```"]
    return "\n".join(lines) + "\n"


def cuda_available(timeout: float) -> tuple[bool, str]:
    """Whether torch sees a CUDA device (asked in a child: a broken driver may hang)."""
    probe = "import torch; print(torch.cuda.is_available(), torch.__version__, torch.version.cuda)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout,
                              env=pytest_env(), check=False)
    except subprocess.TimeoutExpired:
        return False, f"asking torch for CUDA took over {timeout:.0f} s"
    if done.returncode != 0:
        return False, f"importing torch failed: {tail(done.stderr)}"
    available, version, cuda = done.stdout.split()
    return available == "True", f"torch {version}, CUDA build {cuda}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu.md", help="the Markdown report to write")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: a rehearsal of the stages")
    parser.add_argument("--quick", action="store_true", help="one example file, two update rounds")
    parser.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage_here(args.stage, args.device, args.quick, args.timeout, args.result)
        return 0
    started = time.monotonic()
    if args.device.startswith("cuda"):
        available, what = cuda_available(60)
        if not available:
            print(f"gpu_check: no CUDA device ({what}): this check needs a GPU. Run it on a CUDA machine, or "
                  "rehearse it on this one with --device cpu.", file=sys.stderr)
            return NO_CUDA_EXIT
    wanted = [s for s in args.only.split(",") if s]
    unknown = set(wanted) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"--only: expected stages among {', '.join(s.name for s in STAGES)}, got {', '.join(sorted(unknown))}")
    outcomes: dict[str, Outcome] = {}
    for stage in STAGES:
        if wanted and stage.name not in wanted and stage.name != "environment":
            continue
        left = BUDGET_S - (time.monotonic() - started)
        if left < 10:
            outcomes[stage.name] = Outcome(status="skipped", detail=f"out of the check's {BUDGET_S:.0f} s budget")
            continue
        timeout = min(stage.timeout, left)
        print(f"gpu_check: {stage.name} (limit {timeout:.0f} s) ...", flush=True)
        outcomes[stage.name] = outcome = run_stage(stage, args.device, args.quick, timeout)
        print(f"gpu_check: {stage.name}: {outcome.status} in {outcome.seconds:.1f} s"
              + (f": {outcome.detail.splitlines()[0]}" if outcome.detail and outcome.status != "ok" else ""),
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # written after every stage: a kill loses nothing
        args.out.write_text(render(outcomes, args.device, args.quick, time.monotonic() - started))
    text = render(outcomes, args.device, args.quick, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    return 0 if all(o.status == "ok" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
