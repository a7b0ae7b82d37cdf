"""Lockstep A/B against a git revision (``--trainperf-against``, issue 7): catch rates and false alarms.

Run by hand: ``python benchmarks/against.py [--runs N] [--sizes 5,10,20] [--pairs N] [--quick]``.
Writes its section of ``docs/performance.md``.

The training workload of ``benchmarks/verdicts.py`` (a 1.35M-parameter transformer language model,
AdamW; here its cell of batch size 4 and sequence length 96, a ~40 ms step) is committed into a temporary git
repository. Then, on this machine, in one run:

1. **Sizing.** Slowdowns are extra 128×128 matmuls after the backward pass of every step, a count per
   cell, sized in this process by step-alternating A/B measurement (``verdicts.calibrate``: ≥ 30 pairs,
   median of the per-pair ratios); the *measured* size is what the report states. Each size becomes a
   commit on its own branch, one commit ahead of the base commit (only ``extra.json`` changes).
2. **Runs.** ``--runs`` separate ``pytest --trainperf --trainperf-against=base`` processes per
   condition, the conditions interleaved round by round: the base commit against itself (false
   alarms), and each slowdown branch against its parent (catch rate). A cell counts as caught when its
   test fails on ``step_time`` or ``throughput`` (the extra matmuls also raise the cell's FLOP count,
   which the exact ``flops`` gate fails every time; that is not counted).
3. **Wall time per cell**: the whole pytest process (both children per cell, start-up included) over the cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import verdicts  # noqa: E402

from pytest_trainperf.env import cpu_model  # noqa: E402
from pytest_trainperf.measure.host import fix_malloc  # noqa: E402
from pytest_trainperf.measure.timing import default_threads  # noqa: E402
from pytest_trainperf.paired import PAIRED_TOLERANCE  # noqa: E402
from pytest_trainperf.settings import DEFAULT_PAIRS  # noqa: E402

OUT = ROOT / "docs" / "performance.md"
"""The document whose section this script writes."""
BEGIN, END = "<!-- against:begin -->", "<!-- against:end -->"
"""Markers around this script's section of :data:`OUT`."""
DEFAULT_RUNS = 20
"""Separate pytest processes per condition."""
QUICK_RUNS = 2
"""Runs under ``--quick`` (a smoke test, not a result)."""
DEFAULT_SIZES = (5.0, 10.0, 20.0)
"""Target slowdowns, in percent."""
BATCH_SIZE, SEQ_LEN = 4, 96
"""The one cell measured (of the verdicts workload's four): a ~40 ms step, as in the overhead figures."""
BASE = "base"
"""The branch of the unchanged commit."""
TIMING = ("step_time", "throughput")
"""Metrics whose regression counts as a caught slowdown."""
GOALS = {5.0: 0.90, 10.0: 0.95}
"""Catch rate goals per target slowdown."""
FALSE_ALARM_GOAL = 0.01
"""At most this share of cells may fail on timing when the tree is compared with itself."""

TEST = '''\
"""The workload under trainperf (steps/warmup are the stored-baseline mode's; --trainperf-pairs rules here)."""

import pytest_trainperf as tp
from bench_workload import BATCH_SIZES, SEQ_LENS, build, extra_for


@tp.grid(batch_size=list(BATCH_SIZES), seq_len=list(SEQ_LENS))
def test_train(trainperf, batch_size, seq_len):
    step = build(batch_size, seq_len, trainperf.device)
    extra = extra_for(batch_size, seq_len)
    trainperf.train(lambda: step(extra), steps=20, warmup=3, items_per_step=batch_size * seq_len)
'''
EXTRA_FILE = "extra.json"
"""The committed file with the extra matmuls per cell (``{cell id: count}``)."""
ENV_READ = 'raw = os.environ.get(EXTRA_ENV, "").strip()'
"""The line of the verdicts workload that reads the extra work; here it reads :data:`EXTRA_FILE`."""
FILE_READ = ('raw = (open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "extra.json")).read() '
             'if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "extra.json")) '
             'else "").strip()')


@dataclass(frozen=True)
class CellRun:
    """One cell of one run."""

    cell: str
    """The cell id."""
    status: str
    """The cell's verdict (``regressed``, ``unchanged``, ...)."""
    timing: bool
    """Whether it regressed on step time or throughput."""
    change: float | None
    """The median per-pair step-time ratio minus one."""
    interval: tuple[float, float] | None
    """Its 95% sign-test interval."""
    detectable: float | None
    """The smallest detectable slowdown the plugin printed."""
    pairs: int = 0
    """The timed pairs of the comparison."""


@dataclass(frozen=True)
class Run:
    """One ``pytest --trainperf --trainperf-against=base`` process."""

    condition: str
    """``unchanged`` or ``+N%``."""
    wall_s: float
    """Wall time of the process."""
    cells: tuple[CellRun, ...]
    """Its cells; fewer than expected when some errored."""
    returncode: int
    """Its exit status."""
    load: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    """The 1, 5 and 15 minute load averages as it ended."""


def log(message: str) -> None:
    """Progress, on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def git(where: Path, *args: str) -> str:
    """Run git in ``where``; its output."""
    return subprocess.run(["git", *args], cwd=where, check=True, capture_output=True, text=True).stdout.strip()


def write_repo(where: Path) -> verdicts.ModuleType:
    """The base commit: the workload (reading ``extra.json``), the test, an ini file; returns the workload."""
    text = verdicts.WORKLOAD.replace("SEQ_LENS = (64, 96)", f"SEQ_LENS = ({SEQ_LEN},)")
    text = text.replace("BATCH_SIZES = (4, 8)", f"BATCH_SIZES = ({BATCH_SIZE},)")
    if ENV_READ not in text or f"SEQ_LENS = ({SEQ_LEN},)" not in text or f"BATCH_SIZES = ({BATCH_SIZE},)" not in text:
        raise RuntimeError("benchmarks/verdicts.py's workload changed: update benchmarks/against.py")
    (where / "bench_workload.py").write_text(text.replace(ENV_READ, FILE_READ))
    (where / "test_train.py").write_text(TEST)
    (where / "pytest.ini").write_text("[pytest]\n")
    (where / EXTRA_FILE).write_text("{}\n")
    (where / ".gitignore").write_text("__pycache__/\n*.json.tmp\nresults*.json\n")
    git(where, "init", "-q", "-b", BASE)
    git(where, "config", "user.email", "bench@example.com")
    git(where, "config", "user.name", "bench")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "base")
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_workload", where / "bench_workload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commit_condition(where: Path, cond: verdicts.Condition) -> str:
    """A branch one commit ahead of :data:`BASE` with ``cond``'s extra work; its name."""
    branch = f"slow{cond.target:g}"
    git(where, "checkout", "-q", "-b", branch, BASE)
    (where / EXTRA_FILE).write_text(json.dumps(cond.extra, sort_keys=True) + "\n")
    git(where, "commit", "-qam", f"{cond.name} slower")
    git(where, "checkout", "-q", BASE)
    return branch


def run_once(where: Path, branch: str, condition: str, pairs: int, index: int) -> Run:
    """Check ``branch`` out and compare it with :data:`BASE` in one pytest process."""
    git(where, "checkout", "-q", branch)
    results = where / f"results-{index}.json"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:benchmark", "-q",
               "--rootdir", str(where), "--trainperf", f"--trainperf-against={BASE}", f"--trainperf-pairs={pairs}",
               f"--trainperf-json={results}", "test_train.py"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=where, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    cells = []
    if results.exists():
        for c in json.loads(results.read_text())["cells"]:
            metrics = {m["name"]: m for m in c["verdict"]["metrics"]}
            step = metrics.get("step_time", {})
            timing = any(metrics.get(n, {}).get("status") == "regressed" for n in TIMING)
            interval = step.get("interval")
            cells.append(CellRun(cell=c["cell"], status=c["status"], timing=timing, change=step.get("change"),
                                 interval=tuple(interval) if interval else None,  # type: ignore[arg-type]
                                 detectable=step.get("detectable"),
                                 pairs=next((len(m["samples"]) for m in c["verdict"]["measurement"]["metrics"]
                                             if m["name"] == "step_time"), 0)))
        results.unlink()
    else:
        log(f"run {index} ({condition}) left no results:\n{done.stdout[-2000:]}")
    left = git(where, "worktree", "list").splitlines()
    if len(left) != 1:
        raise RuntimeError(f"run {index} left a worktree behind: {left}")
    return Run(condition=condition, wall_s=wall, cells=tuple(cells), returncode=done.returncode,
               load=os.getloadavg())


def share(n: int, total: int) -> str:
    """``12.5% (1/8)``."""
    return f"{100 * n / total:.1f}% ({n}/{total})" if total else "n/a (0/0)"


def pct(x: float) -> str:
    """``+1.2%``."""
    return f"{100 * x:+.1f}%"


def render(conditions: Sequence[verdicts.Condition], runs: Sequence[Run], pairs: int, command: str,
           quick: bool, threads: int, cells: Sequence[str], total_s: float) -> str:
    """The section of the document."""
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.condition, []).append(r)
    cores = os.cpu_count()
    lines = [BEGIN, "## Lockstep A/B against a git revision (issue 7 benchmark)", ""]
    if quick:
        lines += ["**Smoke test (`--quick`): too few runs for the figures to mean anything.**", ""]
    loads = [r.load[0] for r in runs]
    lines += [
        f"Measured with `{command}` on {cpu_model()} ({platform.machine()}, {cores} cores), "
        f"torch {_torch()}, "
        f"{threads} intra-op thread(s), {time.strftime('%Y-%m-%d')}; {total_s / 60:.0f} minutes in all. "
        f"Machine load (1-minute load average at the end of each run): median {statistics.median(loads):.2f}, "
        f"range {min(loads):.2f} to {max(loads):.2f} (other work shared the machine).",
        "",
        f"The workload of the stored-baseline benchmark above, its cell of batch size {BATCH_SIZE} and sequence "
        f"length {SEQ_LEN}, committed into a temporary git repository. Each slowdown is a commit one ahead "
        "of the base commit that adds extra 128×128 matmuls after the backward pass of every step, sized "
        "beforehand by step-alternating A/B in one process (30 pairs, median of per-pair ratios); the table "
        "gives the **measured** size, the mean over the cells. Every run is a separate "
        f"`pytest --trainperf --trainperf-against=base --trainperf-pairs={pairs}` process (default settings "
        f"otherwise: step-time tolerance {PAIRED_TOLERANCE:.0%}, 95% sign-test interval), with the slowdown's "
        "branch checked out, or the base commit itself (unchanged code against itself). A cell counts as "
        "caught when it fails on `step_time` or `throughput` (the extra matmuls also change the cell's FLOP "
        "count, which fails every time; not counted). The conditions' runs are interleaved round by round.",
        "",
        "| condition | cells failed on timing | runs with every cell failed | median change (range) | "
        "median interval width | smallest detectable change printed (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cond in conditions:
        rs = by.get(cond.name, [])
        cs = [c for r in rs for c in r.cells]
        caught = sum(c.timing for c in cs)
        every = sum(1 for r in rs if r.cells and len(r.cells) == len(cells) and all(c.timing for c in r.cells))
        changes = [c.change for c in cs if c.change is not None]
        widths = [c.interval[1] - c.interval[0] for c in cs if c.interval is not None]
        detect = [c.detectable for c in cs if c.detectable is not None]
        name = ("unchanged code against itself (false alarms)" if cond.target == 0 else
                f"+{cond.measured:.1f}% measured (target +{cond.target:g}%; caught)")
        lines.append(
            f"| {name} | {share(caught, len(cs))} | {every}/{len(rs)} | "
            + (f"{pct(statistics.median(changes))} ({pct(min(changes))} to {pct(max(changes))})" if changes else "n/a")
            + f" | {100 * statistics.median(widths):.1f} points | "
            + (f"{pct(statistics.median(detect))}" if detect else "n/a") + " |" if widths else " | n/a | n/a |")
    lines += ["", "Beside the stored-baseline figures above (the same machine and workload family, a step of 27 to "
              "75 ms): against a stored baseline, trainperf's default gate caught none of the +5% and a fifth of "
              "the +10% slowdowns, and pytest-benchmark's `median:5%` caught more only by failing about half "
              "of the unchanged cells. Measuring both trees side by side removes the drift between processes "
              "that forces those wide gates.", ""]
    pairs_used = [c.pairs for r in runs for c in r.cells if c.pairs]
    if pairs_used:
        lines += [f"Timed pairs per comparison (at least {pairs}; batches of {pairs // 2} more while the interval "
                  f"still held 1 + tolerance): median {statistics.median(pairs_used):g}, range {min(pairs_used)} to "
                  f"{max(pairs_used)}; {sum(p > pairs for p in pairs_used)} of {len(pairs_used)} comparisons took "
                  f"more than {pairs}.", ""]
    lines += ["Injected slowdowns per cell (target, step time, extra matmuls, size measured by A/B in one "
              "process, mean change trainperf reported, runs in which the cell was caught):", "",
              "| target | cell | step time while sizing | extra matmuls | measured | trainperf's median change | caught |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for cond in conditions:
        for size in cond.sizes:
            cs = [c for r in by.get(cond.name, []) for c in r.cells if c.cell == size.cell]
            changes = [c.change for c in cs if c.change is not None]
            lines.append(f"| +{cond.target:g}% | `{size.cell}` | {size.step_ms:.1f} ms | {size.extra} | "
                         f"{size.measured:+.1f}% | {pct(statistics.median(changes)) if changes else 'n/a'} | "
                         f"{sum(c.timing for c in cs)}/{len(cs)} |")
    walls = [r.wall_s / max(len(cells), 1) for r in runs]
    errored = sum(len(cells) - len(r.cells) for r in runs)
    lines += ["", f"Wall time per cell (the whole pytest process, start-up and both children of every cell "
              f"included, / {len(cells)} cell{'s' * (len(cells) != 1)}): median {statistics.median(walls):.1f} s "
              f"(range {min(walls):.1f} to {max(walls):.1f} s) for {pairs} timed pairs after {2} warm pairs; "
              f"cells that errored or left no result: {errored}. Runs per condition: "
              + ", ".join(f"{c.name} {len(by.get(c.name, []))}" for c in conditions) + ".", "", "### Goals", ""]
    unchanged = [c for r in by.get("unchanged", []) for c in r.cells]
    alarms = sum(c.timing for c in unchanged)
    rate = alarms / len(unchanged) if unchanged else 1.0
    lines.append(f"- False alarms ≤ {FALSE_ALARM_GOAL:.0%} of cells: **{'met' if rate <= FALSE_ALARM_GOAL else 'not met'}**, "
                 f"{share(alarms, len(unchanged))}.")
    for target, goal in GOALS.items():
        cond = next((c for c in conditions if c.target == target), None)
        if cond is None:
            continue
        cs = [c for r in by.get(cond.name, []) for c in r.cells]
        got = sum(c.timing for c in cs) / len(cs) if cs else 0.0
        lines.append(f"- ≥ {goal:.0%} of runs catch +{target:g}% (measured +{cond.measured:.1f}%): "
                     f"**{'met' if got >= goal else 'not met'}**, {share(sum(c.timing for c in cs), len(cs))} of cells.")
    lines += ["", END]
    return "\n".join(lines)


def _torch() -> str:
    import torch

    return str(torch.__version__)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help=f"pytest processes per condition (default {DEFAULT_RUNS})")
    parser.add_argument("--sizes", default=",".join(f"{s:g}" for s in DEFAULT_SIZES),
                        help="target slowdowns in percent, comma-separated (default %(default)s)")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="--trainperf-pairs (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_RUNS} runs per condition")
    parser.add_argument("--out", type=Path, default=OUT, help="document to write the section to (default %(default)s)")
    parser.add_argument("--raw", type=Path, default=None,
                        help="also write every run's figures to this JSON file (rewritten after every run)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a --raw file of an interrupted run: keep its sizes and whole rounds, run the rest")
    parser.add_argument("--deadline", type=float, default=None,
                        help="stop starting rounds after this many minutes (the report states the runs made)")
    args = parser.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    args.sizes = tuple(float(s) for s in args.sizes.split(",") if s.strip())
    if args.runs < 1 or any(s <= 0 for s in args.sizes):
        parser.error("expected --runs >= 1 and positive --sizes")
    return args


def write_raw(path: Path | None, command: str, pairs: int, conditions: Sequence[verdicts.Condition],
              runs: Sequence[Run], elapsed_s: float) -> None:
    """Every run's figures as JSON (after each run, so that an interrupted benchmark keeps what it measured)."""
    if path is None:
        return
    path.write_text(json.dumps({
        "command": command, "pairs": pairs, "elapsed_s": elapsed_s,
        "conditions": [{"name": c.name, "target": c.target, "sizes": [s.__dict__ for s in c.sizes]}
                       for c in conditions],
        "runs": [{"condition": r.condition, "wall_s": r.wall_s, "returncode": r.returncode, "load": r.load,
                  "cells": [c.__dict__ for c in r.cells]} for r in runs]}, indent=1))


def read_raw(path: Path) -> tuple[list[verdicts.Condition], list[Run], float, str]:
    """The conditions (with their sizes), the complete rounds of runs, the elapsed seconds and the command
    of a raw file."""
    doc = json.loads(path.read_text())
    conditions = [verdicts.Condition(c["name"], c["target"], tuple(verdicts.Size(**s) for s in c["sizes"]))
                  for c in doc["conditions"]]
    runs = [Run(condition=r["condition"], wall_s=r["wall_s"], returncode=r["returncode"], load=tuple(r["load"]),
                cells=tuple(CellRun(**(c | {"interval": tuple(c["interval"]) if c["interval"] else None}))
                            for c in r["cells"])) for r in doc["runs"]]
    runs = runs[:len(runs) - len(runs) % len(conditions)]  # whole rounds only
    return conditions, runs, float(doc.get("elapsed_s", sum(r.wall_s for r in runs))), str(doc["command"])


def main(argv: Sequence[str] | None = None) -> None:
    """Run everything and write the section of the document."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "benchmarks/against.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    fix_malloc()
    threads = default_threads()
    before = 0.0
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="trainperf-against-bench-") as tmp:
        where = Path(tmp)
        workload = write_repo(where)
        cells = tuple(workload.cell_id(*c) for c in workload.CELLS)
        if args.resume is not None:  # the same sizes, then the rounds still missing
            conditions, runs, before, first = read_raw(args.resume)
            # the figures come from the first command; a resumption that adds rounds says so
            command = first if len(runs) // len(conditions) >= args.runs else f"{first}` and resumed with `{command}"
            log(f"resuming {args.resume}: {len(runs) // len(conditions)} rounds done in {before / 60:.0f} minutes")
        else:
            log(f"sizing {len(args.sizes)} slowdown(s) on {len(cells)} cells ({threads} thread(s))")
            conditions = [verdicts.Condition("unchanged", 0.0), *verdicts.calibrate(workload, args.sizes, threads)]
        branches: Mapping[str, str] = {c.name: (BASE if c.target == 0 else commit_condition(where, c))
                                       for c in conditions}
        index = len(runs)
        for round_ in range(len(runs) // len(conditions), args.runs):
            if args.deadline is not None and before + time.perf_counter() - started > args.deadline * 60:
                log(f"deadline of {args.deadline:g} minutes reached after {round_} rounds")
                break
            for cond in conditions:
                index += 1
                run = run_once(where, branches[cond.name], cond.name, args.pairs, index)
                runs.append(run)
                log(f"round {round_ + 1}/{args.runs} {cond.name}: "
                    + ", ".join(f"{c.cell} {pct(c.change) if c.change is not None else '?'}"
                                + (" CAUGHT" if c.timing else "") for c in run.cells)
                    + f" in {run.wall_s:.0f} s (load {run.load[0]:.2f})")
                write_raw(args.raw, command, args.pairs, conditions, runs, before + time.perf_counter() - started)
        git(where, "checkout", "-q", BASE)
    total = before + time.perf_counter() - started
    section = render(conditions, runs, args.pairs, command, args.quick, threads, cells, total)
    verdicts.write_doc(args.out, section, BEGIN, END)
    print(section)
    log(f"done in {total:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
