"""Distributed cells (``tp.ranks``): what launching the ranks costs, and whether the exact communication
metrics ever raise a false alarm.

A temporary suite holds three cells of the same small MLP training step (20 timed steps): ``single``,
an ordinary cell in the session's process; ``ddp`` and ``fsdp``, the same step on 2 gloo ranks under
DistributedDataParallel and FSDP2 (``fully_shard``).

* **Launch overhead**: ``--runs`` sessions measure the three cells (``--trainperf``, no baseline); each
  cell's wall time comes from the session's JUnit report (pytest's own clock: setup, call and
  teardown of the test). The overhead of a distributed cell is its wall time minus the single cell's.
* **False alarms**: the baselines of ``ddp`` and ``fsdp`` are written once (one update, 1 round), then
  ``--sessions`` fresh pytest sessions compare both against them; every verdict on ``comm_calls`` and
  ``comm_bytes`` (tolerance 0) that is not ``unchanged`` is a false alarm (goal: 0), and so is one on
  ``flops``, ``ops`` or ``memory_traffic``.

* **Where a distributed cell's time goes** (``--phases``): each part of a rank's start timed on its own
  (the interpreter, ``import torch``, torch's distributed modules, pytest with the session's plugins
  collecting the test file), torch's launcher with 2 ranks that do nothing (its agent, the c10d
  rendezvous, two interpreters) and with 2 ranks that import torch, against the whole ``ddp`` and
  ``single`` cells (JUnit); medians of ``--runs``.

Writes a section of ``docs/performance.md`` (``--phases``: a section of its own).

    python benchmarks/distributed.py --runs 3 --sessions 10     # about 10 minutes on 2 cores
    python benchmarks/distributed.py --phases --runs 5          # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verdicts  # noqa: E402  (write_doc: one section of a document between markers)

BEGIN, END = "<!-- distributed:begin -->", "<!-- distributed:end -->"
PHASES_BEGIN, PHASES_END = "<!-- distributed-phases:begin -->", "<!-- distributed-phases:end -->"
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
EXACT = ("comm_calls", "comm_bytes", "flops", "ops", "memory_traffic")
"""The metrics whose every change is a false alarm here (the code does not change between sessions)."""
SUITE = '''
import torch
from torch import nn

import pytest_trainperf as tp


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))


def train(trainperf, model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(trainperf.rank))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=20, warmup=2)


@tp.tolerance(step_time=100)
def test_single(trainperf):
    train(trainperf, mlp())


@tp.ranks(world_size=2)
@tp.tolerance(step_time=100)
def test_ddp(trainperf):
    from torch.nn.parallel import DistributedDataParallel

    train(trainperf, DistributedDataParallel(mlp()))


@tp.ranks(world_size=2)
@tp.tolerance(step_time=100)
def test_fsdp(trainperf):
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    train(trainperf, model)
'''


def pytest(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_dist.py", *args],
                          cwd=where, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def cell_seconds(report: Path) -> dict[str, float]:
    """Each test's wall time from a JUnit report."""
    return {case.get("name", ""): float(case.get("time", "nan")) for case in ET.parse(report).iter("testcase")}


def verdicts_of(results: Path) -> list[tuple[str, str, str]]:
    """``(test, metric, status)`` of every metric verdict in a results file."""
    doc = json.loads(results.read_text())
    return [(c["test"], m["name"], m["status"]) for c in doc["cells"] for m in c["verdict"]["metrics"]]


def wall(where: Path, *args: str) -> float:
    """Seconds ``python <args>`` takes, start to exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=where, capture_output=True, check=True)
    return time.perf_counter() - started


def launched(where: Path, code: str) -> float:
    """Seconds torch's launcher takes (as a distributed cell calls it) for 2 ranks of ``python -c code``."""
    from pytest_trainperf.runners.ranks import launch

    workdir = Path(tempfile.mkdtemp(dir=where))
    done = launch(["-c", code], 2, workdir, 120.0)
    if done.timed_out or done.error or done.exitcodes:
        raise SystemExit(f"launch of {code!r} failed: {done}")
    return done.seconds


def phases(where: Path, runs: int, out: Path) -> None:
    """Time the parts of a distributed cell's start, each on its own; write the table."""
    collect = ["-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "test_dist.py",
               "-k", "ddp"]
    parts: dict[str, list[float]] = {}
    steps = [
        ("`python -c pass`: the interpreter", lambda: wall(where, "-c", "pass")),
        ("`import torch`", lambda: wall(where, "-c", "import torch")),
        ("`import torch` + `torch.distributed`, DDP, FSDP2",
         lambda: wall(where, "-c", "import torch, torch.distributed, torch.nn.parallel, torch.distributed.fsdp")),
        ("pytest with the session's plugins (less hypothesis's) collecting the test file",
         lambda: wall(where, *collect)),
        ("the same without pytest-xdist's and anyio's plugins",
         lambda: wall(where, *collect, "-p", "no:xdist", "-p", "no:anyio")),
        ("torch's launcher, 2 ranks of `pass` (agent, c10d rendezvous, 2 interpreters)",
         lambda: launched(where, "pass")),
        ("torch's launcher, 2 ranks of `import torch`", lambda: launched(where, "import torch")),
    ]
    for run in range(runs):
        for name, measure in steps:
            parts.setdefault(name, []).append(measure())
        done = pytest(where, "--trainperf", f"--trainperf-baselines={where / 'none'}", f"--junitxml={where / 'j.xml'}",
                      "-k", "single or ddp")
        if done.returncode != 0:
            raise SystemExit(f"timing run {run} failed:\n{done.stdout[-3000:]}")
        cells = cell_seconds(where / "j.xml")
        parts.setdefault("the `single` cell (in the session's process)", []).append(cells["test_single"])
        parts.setdefault("the `ddp` cell (2 ranks, JUnit wall time)", []).append(cells["test_ddp"])
        print(f"run {run}: " + ", ".join(f"{v[-1]:.2f}" for v in parts.values()), flush=True)
    load = os.getloadavg()[0]
    rows = [f"| {name} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} |" for name, v in parts.items()]
    section = "\n".join([
        PHASES_BEGIN,
        "### Where a distributed cell's time goes (`benchmarks/distributed.py --phases`)",
        "",
        f"Each part of a rank's start timed on its own, {runs} times (2 cores shared with other work, load "
        f"average {load:.1f} at the end); a rank runs all of them, both ranks at once.",
        "",
        "| part | seconds, median | range |",
        "| --- | ---: | ---: |",
        *rows,
        PHASES_END,
    ])
    print(section)
    verdicts.write_doc(out, section, PHASES_BEGIN, PHASES_END)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="sessions timing the three cells (default %(default)s)")
    parser.add_argument("--sessions", type=int, default=10,
                        help="sessions comparing ddp and fsdp against their baselines (default %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="document to write the section to")
    parser.add_argument("--phases", action="store_true", help="time the parts of a distributed cell's start instead")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        where = Path(tmp)
        (where / "test_dist.py").write_text(SUITE)
        (where / "pytest.ini").write_text("[pytest]\ntrainperf_rounds = 1\n")
        if args.phases:
            phases(where, args.runs, args.out)
            return
        seconds: dict[str, list[float]] = {"test_single": [], "test_ddp": [], "test_fsdp": []}
        for run in range(args.runs):
            done = pytest(where, "--trainperf", f"--trainperf-baselines={where / 'none'}", f"--junitxml={where / 'j.xml'}")
            if done.returncode != 0:
                raise SystemExit(f"timing run {run} failed:\n{done.stdout[-3000:]}")
            for name, value in cell_seconds(where / "j.xml").items():
                seconds[name].append(value)
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()), flush=True)
        done = pytest(where, "--trainperf-update-baselines", "-k", "ddp or fsdp")
        if done.returncode != 0:
            raise SystemExit(f"update failed:\n{done.stdout[-3000:]}")
        alarms: dict[str, int] = {}
        others: dict[str, int] = {}
        failed = judged = 0
        started = time.perf_counter()
        for session in range(args.sessions):
            done = pytest(where, "--trainperf", "-k", "ddp or fsdp", f"--trainperf-json={where / 'r.json'}")
            found = verdicts_of(where / "r.json")
            judged += len({test for test, _, _ in found})
            for test, metric, status in found:
                if metric in EXACT and status != "unchanged":
                    alarms[f"{test} {metric} {status}"] = alarms.get(f"{test} {metric} {status}", 0) + 1
                elif status == "regressed":
                    others[f"{test} {metric}"] = others.get(f"{test} {metric}", 0) + 1
            failed += done.returncode != 0
            print(f"session {session}: exit {done.returncode}, alarms so far {sum(alarms.values())}, "
                  f"other regressions so far {others}", flush=True)
        spent = time.perf_counter() - started
    load = os.getloadavg()[0]
    single = statistics.median(seconds["test_single"])
    rows = [f"| `{name.removeprefix('test_')}` | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} | "
            f"{statistics.median(v) - single:+.1f} |" for name, v in seconds.items()]
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(alarms.items())) or "none"
    section = "\n".join([
        BEGIN,
        "## Distributed cells (`benchmarks/distributed.py`)",
        "",
        f"The same MLP step (256-512-256, batch 32, 20 timed steps) as an ordinary cell (`single`) and on 2 gloo "
        f"ranks under DDP and FSDP2 (`tp.ranks(world_size=2)`), {args.runs} sessions; wall time per cell from "
        f"pytest's JUnit report (2 cores shared with other work, load average {load:.1f} at the end). The overhead "
        "is the distributed cell's wall time minus the single cell's: 2 processes started by torch's elastic "
        "launcher, each importing torch and collecting the test file, the rendezvous, the process group, and "
        "the barrier before each timed step.",
        "",
        "| cell | wall time (s), median | range (s) | over `single` (s) |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"**False alarms of the exact metrics**: {args.sessions} fresh sessions compared `ddp` and `fsdp` with "
        f"baselines written by one update ({judged} distributed cells judged, {2 * judged} rank processes, "
        f"{spent / 60:.0f} min): verdicts other than `unchanged` on {', '.join(f'`{m}`' for m in EXACT)}: "
        f"**{sum(alarms.values())}** ({shown}). Sessions that failed: {failed} of {args.sessions}; regressions "
        f"of other metrics: {', '.join(f'{k}: {v}' for k, v in sorted(others.items())) or 'none'}.",
        END,
    ])
    print(section)
    verdicts.write_doc(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
