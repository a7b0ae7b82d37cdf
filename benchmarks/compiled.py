"""Is a compiled model timed compiled? Run by hand: ``python benchmarks/compiled.py [--backend inductor]``.

Each condition runs in a fresh process (dynamo's skip marks and caches are per process), one intra-op
thread, a small training step that Inductor speeds up on a CPU (6 blocks of a 64-wide linear layer,
LayerNorm, GELU, a sigmoid gate and a residual; batch 512; SGD):

- ``eager``: the model as is;
- ``compiled``: ``torch.compile(model)``, no instrumentation;
- ``compiled, instrumented (old)``: the FLOP step then the memory step, as ``_measure`` ran them before
  issue 14 (``FlopCounterMode``, ``measure_peak`` on the step), then the timed steps;
- ``compiled, instrumented (eager stance)``: the same two steps under ``measure.compiled.eager_instrumented``.

Printed per condition: the median of 30 timed steps after 5 warm-up steps (the timings are not
judged here; they show which code ran), dynamo's ``frames ok`` and ``unique_graphs`` after the steps,
and the FLOPs each instrumented step counted. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("eager", "compiled", "compiled, instrumented (old)", "compiled, instrumented (eager stance)")
WARMUP = 5
BATCH = 512
WIDTH = 64
LAYERS = 6
STEPS = 30


def child(condition: str, backend: str) -> dict[str, object]:
    import torch
    from torch import nn

    class Gated(nn.Module):
        """Small matmuls and long element-wise chains (norm, GELU, sigmoid gate, residual): what
        Inductor fuses, so the compiled step is measurably faster than the eager one on a CPU."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))
            self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(LAYERS))
            self.head = nn.Linear(WIDTH, 10)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for i in range(LAYERS):
                h = h + nn.functional.gelu(self.norms[i](self.layers[i](h))) * torch.sigmoid(h) * 0.5
            return self.head(h)
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT))
    from torch.utils.flop_counter import FlopCounterMode

    from pytest_trainperf.measure.compiled import eager_instrumented
    from pytest_trainperf.measure.flops import count_flops, flop_formulas, new_tally
    from pytest_trainperf.measure.memory import measure_peak

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Gated()
    run = torch.compile(model, backend=backend) if condition != "eager" else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(BATCH, WIDTH), torch.randint(0, 10, (BATCH,))

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        return loss

    flops = None
    if "instrumented" in condition:
        import contextlib
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with eager_instrumented() if "stance" in condition else contextlib.nullcontext():
                if "stance" in condition:
                    flops = count_flops(step)[1].total
                else:  # as before issue 14: torch's FLOP counter on the step itself (count_flops sets the stance now)
                    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas(new_tally()))
                    with counter:
                        step()
                    flops = counter.get_total_flops()
                measure_peak(step, torch.device("cpu"), None)
    for _ in range(WARMUP):
        step()
    samples = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(samples), "frames_ok": counters["frames"]["ok"],
            "unique_graphs": counters["stats"]["unique_graphs"], "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.backend)))
        return
    rows = []
    for condition in CONDITIONS:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--backend", args.backend, "--child", condition],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append((condition, result, time.perf_counter() - started))
    print(f"backend {args.backend}, 1 thread, torch {__import__('torch').__version__}, "
          f"{WARMUP} warm-up + {STEPS} timed steps, one process each\n")
    print("| condition | median step | dynamo frames ok | unique graphs | FLOPs counted | process wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for condition, r, wall in rows:
        flops = f"{r['flops']:,}" if r["flops"] is not None else "—"
        print(f"| {condition} | {r['median_ms']:.2f} ms | {r['frames_ok']} | {r['unique_graphs']} | {flops} | {wall:.0f} s |")


if __name__ == "__main__":
    main()
