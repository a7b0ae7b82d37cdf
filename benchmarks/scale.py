"""The plugin's cost per cell at scale: record-only grids of 300 and 10,000 cells, and a grid of cheap
training cells, run plain (``pytest``), as an update and as a compare, each in a fresh process.

The plugin's overhead per cell is (the measured run's wall time - the plain run's) / cells: for the
record-only grids the plain run already pays pytest's own cost per item and the test's ``record``
calls, so what is left is the plugin's. A cheap training cell (one tiny linear step, 3 timed steps)
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
    for kind, source, cells in GRIDS:
        where = Path(tempfile.mkdtemp(prefix="trainperf-bench-scale-"))
        try:
            (where / "test_grid.py").write_text(source.format(cells=cells))
            (where / "pytest.ini").write_text("[pytest]\ntrainperf_threads = 1\n")
            seconds = {mode: timed(extra, where) for mode, extra in MODES}
        finally:
            shutil.rmtree(where, ignore_errors=True)
        per_cell = {m: (seconds[m] - seconds["plain"]) / cells * 1e3 for m in ("update", "compare")}
        rows.append(f"| {kind} | {cells:,} | {seconds['plain']:.1f} | {seconds['update']:.1f} | "
                    f"{seconds['compare']:.1f} | {per_cell['update']:.1f} | {per_cell['compare']:.1f} |")
        print(rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    section = "\n".join([
        BEGIN,
        "## Cost per cell at scale (`benchmarks/scale.py`)",
        "",
        f"Each figure is one fresh pytest process, start to exit, on this runner ({os.cpu_count()} cores; load "
        f"average {load:.1f} when it finished). Overhead per cell = (the run - the plain run) / cells. A compare "
        "runs against the update's baselines, with the default side-by-side confirmation (nothing to confirm "
        "here: record-only metrics are exact). The update runs the default 3 rounds for timed cells only.",
        "",
        "| grid | cells | plain (s) | update (s) | compare (s) | update overhead (ms/cell) | "
        "compare overhead (ms/cell) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "A record-only cell takes no memory snapshot (the test's bytecode shows it can only `record`), so it "
        "pays no scan of the process's objects; it is not re-run in an update's noise rounds, which measure "
        "timings. A training cell pays both, and its instrumented and timed steps.",
        END,
    ])
    verdicts.write_doc(args.out, section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
