"""How much does measuring cost? Run by hand: ``python benchmarks/overhead.py`` (writes docs/performance.md).

1. Timing overhead: trainperf's timed loop (``measure.timing.time_steps``: a clock read, a device sync
   and a list append around every step, the garbage collector off) against a bare loop of the same
   steps, on a training step of about 40 ms. The two alternate block by block (ABAB...), so that
   the machine's slow and fast spells hit both alike; the figure is the median of the per-pair ratios.
2. Wall time of the instrumented steps: one FLOP-counted step and one memory-tracked step, against
   a plain step, i.e. what ``train`` adds to a cell besides the steps you asked for.
"""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_trainperf.env import cpu_model  # noqa: E402
from pytest_trainperf.measure.flops import count_flops  # noqa: E402
from pytest_trainperf.measure.memory import measure_peak  # noqa: E402
from pytest_trainperf.measure.timing import default_threads, fixed_threads, time_steps  # noqa: E402

PAIRS = 30
"""A/B block pairs for the timing overhead."""
STEPS_PER_BLOCK = 10
"""Steps per block."""
OUT = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def workload() -> tuple[nn.Module, object]:
    """A transformer-encoder training step of roughly 40 ms on one thread of this machine."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 128, 128)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    return model, step


def bare(step: object, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        step()  # type: ignore[operator]
    return (time.perf_counter_ns() - start) / 1e9


def measured(step: object, n: int, device: torch.device) -> tuple[float, float]:
    """Wall seconds of one timed block (its garbage collection and one warm-up step first, as in a cell),
    and the sum of its samples."""
    start = time.perf_counter_ns()
    samples = time_steps(step, n, device, keep=lambda out: out.detach(), warmup=1, settle=False).samples  # type: ignore[arg-type,union-attr]
    return (time.perf_counter_ns() - start) / 1e9, sum(samples)


def main() -> None:
    device = torch.device("cpu")
    threads = default_threads()
    _, step = workload()
    with fixed_threads(threads):
        for _ in range(5):
            step()  # type: ignore[operator]
        ratios, wall_ratios, bare_s = [], [], []
        for i in range(PAIRS):
            if i % 2:
                b = bare(step, STEPS_PER_BLOCK)
                wall, timed = measured(step, STEPS_PER_BLOCK, device)
            else:
                wall, timed = measured(step, STEPS_PER_BLOCK, device)
                b = bare(step, STEPS_PER_BLOCK)
            ratios.append(timed / b)
            wall_ratios.append(wall / b)
            bare_s.append(b / STEPS_PER_BLOCK)
        plain = []
        for _ in range(5):
            start = time.perf_counter()
            step()  # type: ignore[operator]
            plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        count_flops(step)  # type: ignore[arg-type]
        flops_s = time.perf_counter() - start
        start = time.perf_counter()
        measure_peak(step, device)  # type: ignore[arg-type]
        memory_s = time.perf_counter() - start
    ratio = statistics.median(ratios)
    wall = statistics.median(wall_ratios)
    q = statistics.quantiles(ratios, n=4)
    step_s = statistics.median(plain)
    command = "python benchmarks/overhead.py"
    text = f"""# Performance of pytest-trainperf itself

Measured with `{command}` on {cpu_model()} ({platform.machine()}), torch {torch.__version__},
{threads} intra-op thread(s), {time.strftime('%Y-%m-%d')}.

## Timing overhead

trainperf's timed loop against a bare loop of the same training steps (a 2-layer transformer encoder,
batch 8 × 128 tokens × 128 wide, AdamW), {PAIRS} alternating blocks of {STEPS_PER_BLOCK} steps each.

| figure | value |
| --- | --- |
| median step time (bare loop) | {statistics.median(bare_s) * 1e3:.1f} ms |
| reported step time (sum of the samples) / bare loop wall time, median of per-pair ratios | {ratio:.4f} ({(ratio - 1) * 100:+.2f}%) |
| interquartile range of those ratios | {q[0]:.4f} to {q[2]:.4f} |
| wall time of a timed block, including its `gc.collect()` and one warm-up step / bare loop | {wall:.4f} ({(wall - 1) * 100:+.2f}%) |

Goal: ≤ 1% on a ~40 ms step for what the samples report. The loop adds a clock read, a (CPU: no-op)
synchronisation, a list append and a detach of the loss per step; the spread of the ratios is the
machine's noise, not the loop's. The `gc.collect()` before the timed steps is outside every sample; it
costs wall time once per measurement (and once per confirmation), not per step.

## What instrumentation adds to a cell

Each measured `train` runs one step under the FLOP counter and one under the memory tracker, besides
the warm-up and timed steps. Wall time of each, once, against a plain step:

| step | wall time | × plain step |
| --- | --- | --- |
| plain step (median of 5) | {step_s * 1e3:.1f} ms | 1.0 |
| FLOP-counted step | {flops_s * 1e3:.1f} ms | {flops_s / step_s:.1f} |
| memory-tracked step (includes one garbage-collector scan of live tensors) | {memory_s * 1e3:.1f} ms | {memory_s / step_s:.1f} |
"""
    # keep the sections other scripts write into the same file (verdicts.py, against.py), in their order
    previous = OUT.read_text() if OUT.exists() else ""
    for section in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", previous, re.S):
        text += "\n" + section.group(0) + "\n"
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
