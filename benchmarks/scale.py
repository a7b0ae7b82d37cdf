"""The plugin's cost per cell at scale: record-only grids of 300 and 10,000 cells, and a grid of cheap
training cells, run plain (``pytest``), as an update and as a compare, each in a fresh process.

The plugin's overhead per cell is the growth of the measured run's wall time from 300 to 10,000
record-only cells less the plain run's (pytest's own cost per item and the test's ``record`` calls):
start-up costs (torch and scipy imported once) do not count per cell. A cheap training cell (one tiny linear step, 3 timed steps)
also pays its instrumented steps and the memory snapshot of the tensors alive before it, which a
record-only cell no longer takes. Writes a section of ``docs/performance.md``.

    python benchmarks/scale.py                 # about 4 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verdicts  # noqa: E402  (write_doc: one section of a document between markers)

BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
RECORD = '''
import pytest_trainperf as tp


@tp.grid(i=list(range({cells})))
def test_record(trainperf, i):
    trainperf.record("accuracy", 0.5 + i * 1e-6)
'''
TRAIN = '''
import torch
from torch import nn
import pytest_trainperf as tp


@tp.grid(i=list(range({cells})))
@tp.tolerance(step_time=1.0)
def test_train(trainperf, i):
    torch.manual_seed(i)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(4, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=3, warmup=1)
'''
GRIDS = (("record-only", RECORD, 300), ("record-only", RECORD, 10_000), ("cheap training step", TRAIN, 100))
MODES = (("plain", []), ("update", ["--trainperf-update-baselines"]), ("compare", ["--trainperf"]))


def timed(args: list[str], where: Path) -> float:
    """Seconds one pytest process takes, start to exit; it must pass."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=where,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed in {where}:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    seconds: dict[tuple[str, int], dict[str, float]] = {}
    for kind, source, cells in GRIDS:
        where = Path(tempfile.mkdtemp(prefix="trainperf-bench-scale-"))
        try:
            (where / "test_grid.py").write_text(source.format(cells=cells))
            (where / "pytest.ini").write_text("[pytest]\ntrainperf_threads = 1\n")
            took = seconds[(kind, cells)] = {mode: timed(extra, where) for mode, extra in MODES}
        finally:
            shutil.rmtree(where, ignore_errors=True)
        rows.append(f"| {kind} | {cells:,} | {took['plain']:.1f} | {took['update']:.1f} | {took['compare']:.1f} |")
        print(rows[-1], flush=True)
    (_, _, small), (_, _, large) = GRIDS[0], GRIDS[1]
    a, b = seconds[("record-only", small)], seconds[("record-only", large)]
    marginal = {m: (b[m] - a[m]) / (large - small) * 1e3 for m, _ in MODES}
    fixed = {m: a[m] - marginal[m] * small / 1e3 for m, _ in MODES}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    section = "\n".join([
        BEGIN,
        "## Cost per cell at scale (`benchmarks/scale.py`)",
        "",
        f"Each figure is one fresh pytest process, start to exit, on this runner ({os.cpu_count()} cores; load "
        f"average {load:.1f} when it finished). A compare runs against the update's baselines. The update "
        "runs the default 3 rounds, for timed cells only.",
        "",
        "| grid | cells | plain (s) | update (s) | compare (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"From the two record-only grids, the cost of one more cell: plain {marginal['plain']:.1f} ms (pytest's "
        f"own), update {marginal['update']:.1f} ms, compare {marginal['compare']:.1f} ms; so the plugin's "
        f"overhead per record-only cell is {marginal['update'] - marginal['plain']:.1f} ms in an update and "
        f"{marginal['compare'] - marginal['plain']:.1f} ms in a compare (goal: at most 20 ms). What does not grow "
        f"with the cells (start-up: torch and scipy imported, the environment fingerprint) is "
        f"{fixed['update'] - fixed['plain']:.1f} s in an update and {fixed['compare'] - fixed['plain']:.1f} s in "
        "a compare.",
        "",
        "A record-only cell takes no memory snapshot (the test's bytecode shows it can only `record`), so it "
        "pays no scan of the process's objects, and it is not re-run in an update's noise rounds, which "
        "measure timings. A training cell pays both, and its instrumented and timed steps.",
        END,
    ])
    verdicts.write_doc(args.out, section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
