"""The exact work counts (measure/work.py): false alarms, injected defects, cost. Run by hand:
``python benchmarks/work.py [--runs N]`` (writes its section of docs/performance.md).

1. False alarms: N separate processes each count the instrumented step of seven example cells (the
   models of examples/, built as the examples build them) and of a bf16 language model; every run is
   judged against the first with the plugin's judge (stats.judge, default tolerances): any work metric
   or FLOP count that moves is a false alarm. Goal: 0 of N.
2. Injected defects: in each process the bf16 model's step is counted again with one defect each: a
   ``.item()`` on the loss, a boolean-mask index of the logits, an upcast of the logits to fp32, an
   extra ``.clone()``; each judged against the first run's unchanged step. Caught: the cell regresses
   and the failure names the defect (the sync's op at the right source line, ``aten._to_copy`` among the
   ops now in float32, ``aten.clone`` among the ops that grew). Goal: N of N each.
3. Compiled: in each process a compiled model (aot_eager) is measured as the fixture measures it
   (dynamo reset, the counting step under the eager stance, warm-up, timed steps) unchanged, with
   ``torch._dynamo.graph_break()`` in its forward, and with a shape-dependent recompile (its batch
   goes from 8 to 12 rows in the warm-up); ``graph_breaks``, ``recompiles`` and ``unique_graphs`` are
   judged against the first run's unchanged cell. False alarms (or a compile in the timed steps) on
   the unchanged cell: goal 0 of N-1; each defect caught, naming its metric: goal N of N.
4. Cost: the one counting pass (as the fixture runs it) against a plain step, against the counting
   step as it was before (``FlopCounterMode`` with the work mode stacked under it) and against a
   dispatch mode that counts nothing (the floor), per cell, medians of alternating rounds in this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from _models import VOCAB, TinyLM, batches, lm_train_step  # noqa: E402

from pytest_trainperf import stats  # noqa: E402
from pytest_trainperf.env import cpu_model  # noqa: E402
from pytest_trainperf.measure.compiled import CompileWatch, eager_step  # noqa: E402
from pytest_trainperf.measure.counting import count_step  # noqa: E402
from pytest_trainperf.measure.flops import flop_formulas, new_tally  # noqa: E402
from pytest_trainperf.measure.timing import default_threads, fixed_threads  # noqa: E402
from pytest_trainperf.measure.work import Counting  # noqa: E402
from pytest_trainperf.records import Breakdown, Measurement, Metric, Status  # noqa: E402

OUT = ROOT / "docs" / "performance.md"
ROUNDS = 5
"""Alternating rounds (plain, FLOP-counted, FLOP + work) per cell for the cost."""
CELLS: dict[str, tuple[str, dict[str, int]]] = {
    "test_batch_scan[batch_size=2]": ("lm", {"d_model": 64, "layers": 2, "batch_size": 2, "seq_len": 64}),
    "test_batch_scan[batch_size=32]": ("lm", {"d_model": 64, "layers": 2, "batch_size": 32, "seq_len": 64}),
    "test_recompute_cost[1-16-plain]": ("lm", {"d_model": 64, "layers": 4, "batch_size": 1, "seq_len": 16}),
    "test_recompute_cost[16-256-checkpointed]": ("lm", {"d_model": 64, "layers": 4, "batch_size": 16,
                                                        "seq_len": 256, "checkpointed": 1}),
    "test_scaling_with_parameters[width=384]": ("lm", {"d_model": 384, "heads": 4, "layers": 2, "batch_size": 8,
                                                       "seq_len": 64}),
    "test_scaling_with_sequence_length[seq_len=512]": ("lm", {"d_model": 32, "heads": 4, "layers": 2,
                                                              "batch_size": 8, "seq_len": 512}),
    "test_memory_strategies[medium-early]": ("lm", {"d_model": 64, "layers": 4, "batch_size": 8, "seq_len": 128,
                                                    "checkpointed": 1}),
}
"""Example cells (examples/), built as the example builds them."""
DEFECTS = {"item": "aten._local_scalar_dense", "mask": "aten.index", "upcast": "aten._to_copy",
           "clone": "aten.clone"}
"""Each injected defect and the op its failure must name."""
WORK_METRICS = ("host_syncs", "ops", "memory_traffic", "low_precision_share", "flops")
COMPILE_METRICS = ("graph_breaks", "recompiles", "unique_graphs")
"""The exact compile metrics (compile_time is a timing: judged statistically, not counted here)."""
COMPILE_DEFECTS = {"graph_break": "graph_breaks", "recompile": "recompiles"}
"""Each defect injected into the compiled model and the metric that must regress."""
COMPILED_STEPS = (2, 4)
"""Warm-up and timed steps of the compiled cell, after its counting step (as the fixture runs them)."""


class Net(nn.Module):
    """A small MLP, compiled with aot_eager; ``graph_break`` puts ``torch._dynamo.graph_break()`` in it."""

    def __init__(self, graph_break: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 1)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).relu()
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.b(h)


def example_step(spec: dict[str, int]) -> Callable[[], torch.Tensor]:
    torch.manual_seed(0)
    layers = spec["layers"]
    model = TinyLM(d_model=spec["d_model"], heads=spec.get("heads", 4), layers=layers,
                   checkpointed=range(layers) if spec.get("checkpointed") else ())
    return lm_train_step(model, spec["batch_size"], spec["seq_len"], torch.device("cpu"))


def bf16_step(defect: str = "") -> Callable[[], torch.Tensor]:
    """A bf16 language model's step, with one injected defect (or none)."""
    torch.manual_seed(0)
    model = TinyLM(d_model=32, layers=2).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tokens, targets = batches(4, 32, torch.device("cpu"))[0]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = model(tokens)
        if defect == "clone":
            logits = logits.clone()
        if defect == "mask":
            logits = logits[logits > -1e9].view_as(logits)
        if defect == "upcast":
            logits = logits.float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        if defect == "item" and loss.item() > 1e9:
            print("diverged")
        loss.backward()
        opt.step()
        return loss

    return step


def counted(step: Callable[[], torch.Tensor]) -> dict[str, object]:
    """The work metrics and breakdowns of the step's first call, as the fixture counts it."""
    _, flops, work = count_step(step)
    metrics = [m for m in flops.metrics() + work.metrics(float(flops.total)) if m.name in WORK_METRICS]
    return {"metrics": {m.name: [m.value, m.unit, m.direction.value] for m in metrics},
            "breakdowns": [[b.metric, b.parts, b.unit, b.label] for b in work.breakdowns()]}


def before(step: Callable[[], torch.Tensor]) -> None:
    """The counting step as the fixture ran it before the one pass: ``FlopCounterMode`` (with the same
    formulas) and the work mode stacked under it (for the cost only)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    work = Counting("cpu")

    class WorkMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            work.op(func, args, kwargs, out)
            return out

    with WorkMode(), FlopCounterMode(display=False, custom_mapping=flop_formulas(new_tally())):
        step()


def compiled_cell(defect: str = "") -> dict[str, object]:
    """A compiled model's cell as the fixture measures it (dynamo reset, the counting step under the
    eager stance, warm-up, timed steps) and its exact compile metrics; ``defect``: a graph break in
    the model, or a recompile (the batch goes from 8 to 12 rows in the warm-up)."""
    torch.manual_seed(0)
    model = Net(graph_break=defect == "graph_break")
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    shapes = (8, 12) if defect == "recompile" else (8,)
    inputs = [torch.randn(n, 16) for n in shapes]
    calls = [0]

    def step() -> torch.Tensor:
        x = inputs[calls[0] % len(inputs)]
        calls[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = compiled(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    watch = CompileWatch()
    count_step(eager_step(step))
    warmup, timed = COMPILED_STEPS
    for _ in range(warmup):
        step()
    watch.mark_timed()
    for _ in range(timed):
        step()
    watch.finish()
    metrics = [m for m in watch.metrics if m.name in COMPILE_METRICS]
    return {"metrics": {m.name: [m.value, m.unit, m.direction.value] for m in metrics}, "breakdowns": [],
            "timed_failure": watch.timed_failure}


def child() -> None:
    with fixed_threads(1):
        out = {name: counted(example_step(spec)) for name, (_, spec) in CELLS.items()}
        out["bf16"] = counted(bf16_step())
        out.update({f"bf16+{d}": counted(bf16_step(d)) for d in DEFECTS})
        out["compiled"] = compiled_cell()
        out.update({f"compiled+{d}": compiled_cell(d) for d in COMPILE_DEFECTS})
    print(json.dumps(out))


def measurement(raw: dict[str, object]) -> Measurement:
    from pytest_trainperf.records import Direction

    metrics = tuple(Metric(n, v, u, Direction(d)) for n, (v, u, d) in raw["metrics"].items())  # type: ignore[attr-defined]
    breakdowns = tuple(Breakdown(m, tuple((k, float(v)) for k, v in parts), u, label)
                       for m, parts, u, label in raw["breakdowns"])  # type: ignore[attr-defined]
    return Measurement(test="t", cell="c", params=(), metrics=metrics, breakdowns=breakdowns)


def compile_caught(defect: str, now: Measurement, before: Measurement) -> bool:
    """The compiled cell regressed, naming the defect's metric."""
    verdict = stats.judge(now, before)
    return verdict.status is Status.REGRESSED and COMPILE_DEFECTS[defect] in {m.name for m in verdict.regressions}


def caught(defect: str, now: Measurement, before: Measurement) -> bool:
    verdict = stats.judge(now, before)
    if verdict.status is not Status.REGRESSED:
        return False
    named = " ".join(g for m in verdict.regressions for g in m.grown)
    if defect == "item":  # the sync at the line that issued it
        return f"`if defect == \"item\" and loss.item() > 1e9:` ({DEFECTS[defect]})" in named
    if defect == "mask":
        return f"`logits = logits[logits > -1e9].view_as(logits)` ({DEFECTS[defect]})" in named
    if defect == "upcast":
        share = verdict.metric("low_precision_share")
        return share is not None and share.status is Status.REGRESSED and any(DEFECTS[defect] in g for g in share.grown)
    return any(DEFECTS[defect] in g for g in named.split(", ")) or DEFECTS[defect] in named


def empty(step: Callable[[], torch.Tensor]) -> None:
    """The step under a dispatch mode that only runs each op, set up as the counting pass is (under the
    eager stance, no per-op dynamo wrapper): the floor of any counting in a ``TorchDispatchMode``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pytest_trainperf.measure.compiled import eager_instrumented

    class Empty(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    with eager_instrumented(), Empty():
        step()


def cost() -> dict[str, tuple[float, float, float, float]]:
    """Per cell: median seconds of a plain step, of the counting step as it was before (FlopCounterMode
    and the work mode stacked under it), of the one counting pass (as the fixture runs it now) and of
    the step under a mode that counts nothing."""
    out = {}
    with fixed_threads(default_threads()):
        for name, (_, spec) in {**CELLS, "bf16 language model": ("lm", {})}.items():
            step = bf16_step() if not spec else example_step(spec)
            step()
            step()
            times: list[list[float]] = [[], [], [], []]
            for _ in range(ROUNDS):
                runs = (step, lambda s=step: before(s), lambda s=step: count_step(eager_step(s)),
                        lambda s=step: empty(s))
                for i, run in enumerate(runs):
                    start = time.perf_counter()
                    run()
                    times[i].append(time.perf_counter() - start)
            out[name] = tuple(statistics.median(t) for t in times)  # type: ignore[assignment]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    started = time.perf_counter()
    runs = []
    for i in range(args.runs):
        done = subprocess.run([sys.executable, __file__, "--child"], check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}/{args.runs}", file=sys.stderr)
    first = {name: measurement(raw) for name, raw in runs[0].items()}
    cells = [*CELLS, "bf16"]
    alarms = sum(any(stats.judge(measurement(run[c]), first[c]).status is not Status.UNCHANGED for c in cells)
                 for run in runs[1:])
    moved = sorted({c for run in runs[1:] for c in cells
                    if stats.judge(measurement(run[c]), first[c]).status is not Status.UNCHANGED})
    catches = {d: sum(caught(d, measurement(run[f"bf16+{d}"]), first["bf16"]) for run in runs) for d in DEFECTS}
    compile_alarms = sum(stats.judge(measurement(run["compiled"]), first["compiled"]).status is not Status.UNCHANGED
                         or bool(run["compiled"]["timed_failure"]) for run in runs[1:])
    compile_catches = {d: sum(compile_caught(d, measurement(run[f"compiled+{d}"]), first["compiled"]) for run in runs)
                       for d in COMPILE_DEFECTS}
    compiled_counts = {n: v for n, (v, _, _) in runs[0]["compiled"]["metrics"].items()}
    defect_counts = {d: {n: v for n, (v, _, _) in runs[0][f"compiled+{d}"]["metrics"].items()} for d in COMPILE_DEFECTS}
    wall = time.perf_counter() - started
    figures = cost()
    rows = "\n".join(f"| `{name}` | {p * 1e3:.1f} ms | {f / p:.2f} | {w / p:.2f} | {'yes' if w / p <= 1.5 else 'no'} "
                     f"| {e / p:.2f} |" for name, (p, f, w, e) in figures.items())
    ratios = [w / p for p, _, w, _ in figures.values()]
    example = json.dumps({c: first[c].metric("ops").value for c in cells})  # type: ignore[union-attr]
    section = f"""<!-- work:begin -->
## Exact work counts: false alarms, injected defects, cost

Measured with `python benchmarks/work.py --runs {args.runs}` on {cpu_model()} ({platform.machine()}),
torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, on a machine shared with other work; {wall:.0f} s
for the {args.runs} processes. Cells: seven example cells (their models and steps built as `examples/`
builds them) and a bf16 language model (`TinyLM`, d_model 32, 2 blocks, in bf16, SGD).

| figure | result | goal |
| --- | --- | --- |
| unchanged code, {args.runs} separate processes, each judged against the first (`host_syncs`, `ops`, `memory_traffic`, `low_precision_share`, `flops`; {len(cells)} cells each): runs with any metric moved | {alarms} of {args.runs - 1}{' (' + ', '.join(moved) + ')' if moved else ''} | 0 |
| `.item()` on the loss: caught, naming `aten._local_scalar_dense` at its source line | {catches['item']} of {args.runs} | all |
| boolean-mask index of the logits: caught, naming `aten.index` at its source line | {catches['mask']} of {args.runs} | all |
| upcast of the logits to fp32: `low_precision_share` regressed, naming `aten._to_copy` | {catches['upcast']} of {args.runs} | all |
| an extra `.clone()`: caught, naming `aten.clone` | {catches['clone']} of {args.runs} | all |
| unchanged compiled model (`torch.compile`, aot_eager), {args.runs} separate processes, each judged against the first (`graph_breaks`, `recompiles`, `unique_graphs`), or a compile in its timed steps: runs with an alarm | {compile_alarms} of {args.runs - 1} | 0 |
| `torch._dynamo.graph_break()` in its forward: caught, naming `graph_breaks` | {compile_catches['graph_break']} of {args.runs} | all |
| a shape-dependent recompile (the batch goes from 8 to 12 rows in the warm-up): caught, naming `recompiles` | {compile_catches['recompile']} of {args.runs} | all |

Ops per step counted in the first run: `{example}`. The compiled cell (a 16-32-1 MLP, SGD, as the fixture
runs it: dynamo reset, the counting step under the eager stance, {COMPILED_STEPS[0]} warm-up and
{COMPILED_STEPS[1]} timed steps, dynamo's counters read around them) counted `{json.dumps(compiled_counts)}`
unchanged, `{json.dumps(defect_counts['graph_break'])}` with the graph break and
`{json.dumps(defect_counts['recompile'])}` with the recompile.

Cost of the counting step against a plain step, medians of {ROUNDS} alternating rounds per cell, warm,
{default_threads()} thread(s): before, `FlopCounterMode` (with the plugin's formulas) with the work mode
stacked under it; now, the one counting pass of `measure/counting.py` (one `TorchDispatchMode` for
FLOPs and work, under the eager stance, as the fixture runs it). Both count the same FLOPs, ops and
bytes (`tests/test_counting.py`).

| cell | plain step | before / plain | one pass / plain | one pass ≤ 1.5x | empty mode / plain (the floor) |
| --- | --- | --- | --- | --- | --- |
{rows}

Median over the cells of the counting step against a plain step: {statistics.median(ratios):.2f}x
(before: {statistics.median(f / p for p, f, _, _ in figures.values()):.2f}x; goal ≤ 1.5x; met by
{sum(r <= 1.5 for r in ratios)} of {len(ratios)} cells). Where the goal is missed, the step is small and
dispatch-bound (tens of microseconds an op): every aten op then costs a Python call into the mode, and
the last column, a mode that runs each op and counts nothing, shows that floor of any
`TorchDispatchMode` ({min(e / p for p, _, _, e in figures.values()):.2f}-{max(e / p for p, _, _, e in figures.values()):.2f}x
a plain step); the counting adds {min(w / e for _, _, w, e in figures.values()):.2f}-{max(w / e for _, _, w, e in figures.values()):.2f}x
on top of it. The counting step runs once per cell, never during an update's noise rounds, and never
on a timed step.
<!-- work:end -->"""
    previous = OUT.read_text() if OUT.exists() else ""
    if "<!-- work:begin -->" in previous:
        text = re.sub(r"<!-- work:begin -->.*?<!-- work:end -->", lambda _: section, previous, flags=re.S)
    else:
        text = previous.rstrip("\n") + "\n\n" + section + "\n"
    OUT.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
