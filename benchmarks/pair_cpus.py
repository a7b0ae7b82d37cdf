"""Do two processes of the same code time the same when they take turns? Unpinned, and on shared CPUs.

``python benchmarks/pair_cpus.py [--pairs N]``: the offset that a side-by-side comparison
(``--trainperf-against``, the confirmation of a screened cell) must not mistake for a change. Each pair
is two fresh processes of the same code (a 20-layer MLP training step of a few milliseconds, one
intra-op thread) that take turns step by step as lockstep workers do, the order flipping every pair of
steps. Two figures per pair of processes, minus one: the median of the per-pair ratios B / A (what the
plugin judged until 2026-12-01), and the median balanced ratio (two consecutive pairs, one A-first and
one B-first, averaged: :func:`pytest_trainperf.paired.paired_change`, what it judges since), which
cancels the order effect of taking turns (the second step of a pair runs after a switch of process). *unpinned*: the
processes go where the scheduler puts them (as the plugin's lockstep workers did before); *shared CPUs*:
both on the session's last CPU (as the plugin's lockstep workers run since 2026-12-01:
``pytest_trainperf.runners.children.pair_cpus``). The two conditions take turns.
Writes its section of ``docs/performance.md`` (between ``<!-- pair-cpus:begin -->`` and
``<!-- pair-cpus:end -->``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from verdicts import write_doc  # noqa: E402  (one section of a document between markers)

from pytest_trainperf.env import cpu_model  # noqa: E402
from pytest_trainperf.paired import paired_change  # noqa: E402
from pytest_trainperf.runners.children import pair_cpus  # noqa: E402

OUT = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- pair-cpus:begin -->", "<!-- pair-cpus:end -->"
STEPS = 70
"""Steps each process times per pair (the first WARM pairs are dropped)."""
WARM = 10
WORKER = '''
import sys, time
import torch
from torch import nn
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(20)])
x = torch.randn(32, 128)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)

def step():
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()

for _ in range(5):
    step()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "stop":
        break
    t = time.perf_counter()
    step()
    print(time.perf_counter() - t, flush=True)
'''


def start(cpus: frozenset[int] | None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    assert proc.stdout is not None
    proc.stdout.readline()  # ready
    return proc


def step(proc: subprocess.Popen[str]) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def one_pair(cpus: frozenset[int] | None) -> tuple[float, float]:
    """Two fresh processes taking turns: the median per-pair ratio B / A and the median balanced ratio,
    each minus one."""
    a, b = start(cpus), start(cpus)
    times: dict[int, list[float]] = {id(a): [], id(b): []}
    try:
        for i in range(STEPS):
            for proc in (a, b) if i % 2 == 0 else (b, a):
                times[id(proc)].append(step(proc))
    finally:
        for proc in (a, b):
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.close()
            proc.wait()
    first, second = times[id(a)][WARM:], times[id(b)][WARM:]
    logs = [math.log(tb / ta) for ta, tb in zip(first, second, strict=True)]
    return math.expm1(statistics.median(logs)), paired_change(first, second).ratio - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=12, help="pairs of processes per condition (default %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="document to write the section to")
    args = parser.parse_args(argv)
    shared = pair_cpus(1)
    if shared is None:
        print("pair_cpus.py: needs a Linux machine with at least 2 CPUs", file=sys.stderr)
        return 2
    found: dict[str, list[float]] = {}
    for _ in range(args.pairs):
        for name, cpus in (("unpinned", None), ("shared CPUs", shared)):
            per_pair, balanced = one_pair(cpus)
            found.setdefault(f"{name}, median per-pair ratio", []).append(per_pair)
            found.setdefault(f"{name}, median balanced ratio", []).append(balanced)
    lines = [BEGIN, "", "## Two processes of the same code, side by side: unpinned and on shared CPUs", "",
             f"`python benchmarks/pair_cpus.py --pairs {args.pairs}` on {cpu_model()} ({len(os.sched_getaffinity(0))} "
             f"CPUs; shared: CPU {', '.join(map(str, sorted(shared)))}): pairs of fresh processes of the same "
             f"20-layer MLP step (one thread), taking turns step by step ({STEPS} pairs of steps, order flipping, "
             f"the first {WARM} dropped). Each figure is a pair of processes' median ratio B / A, minus one, per pair "
             "of steps or balanced (an A-first and a B-first pair of steps averaged): what a side-by-side "
             "comparison of unchanged code sees.", "",
             "| workers, figure | pairs of processes | median | smallest | largest | beyond ±2% |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, values in found.items():
        beyond = sum(abs(v) > 0.02 for v in values)
        lines.append(f"| {name} | {len(values)} | {statistics.median(values):+.1%} | {min(values):+.1%} | "
                     f"{max(values):+.1%} | {beyond} |")
    lines += ["", "Every pair: " + "; ".join(f"{name}: " + ", ".join(f"{v:+.1%}" for v in values)
                                           for name, values in found.items()) + ".", "", END]
    section = "\n".join(lines)
    write_doc(args.out, section, BEGIN, END)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
