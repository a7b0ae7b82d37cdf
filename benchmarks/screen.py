"""Screen, then confirm side by side: how often unchanged code fails, how often a committed slowdown is
caught, and what it costs, with baselines from this machine and with a busy neighbour on the core.

A temporary git repository holds a small suite (an MLP training step over a grid of widths, each step a
few milliseconds) at three commits: the base, and +5% and +10% step time from a pure-Python spin added
to each step, sized per cell on warm steps and scaled by one factor for the suite, as side-by-side pairs
time a step: two processes pinned to one CPU take turns, one with a probe spin, and the median of the
cells' readings gives the factor (:func:`spin_per_paired_step`), in each condition's own setting
(``--sizing each``, the default: the busy condition's commits are sized in pairs with the neighbour on the
core, where the same spin is a smaller share of a step, and the quiet-sized ones are measured there too;
``--sizing quiet``: one set of commits for both). The spin dispatches no torch op,
so FLOPs, ops, memory traffic and peak memory are unchanged: only the timings can catch it (extra
layers, as before, were caught at once by the exact metrics). Each committed spin is then measured with
240 fixed pairs per cell, quiet and busy (:func:`measure_commits`): the size of what was committed, which
the side-by-side column (stopped early once decided) underestimates near the stop's boundary. The
baselines are updated at the base
(the default rounds: two in process, three in fresh processes) and committed with it. Then, run after run, the conditions take turns in one loop, so that
the machine's slow spells hit them all alike:

* ``quiet``: the compare run alone on the machine's cores;
* ``busy``: the compare run and a spinning neighbour process pinned to the same core
  (``taskset -c 0`` for both; the baselines were made without it, so the screen flags every cell).

At each of ``unchanged``, ``+5%`` and ``+10%``. Unchanged runs also run once more with
``--trainperf-confirm-against=none`` (the stored verdict alone, the plugin before this feature) for the
wall-time ratio and the false alarms side by side. Writes a section of ``docs/performance.md``.

    python benchmarks/screen.py --runs 3 --extra-quiet 12 --raw /tmp/screen.json   # 46 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verdicts  # noqa: E402  (write_doc: one section of a document between markers)

BEGIN, END = "<!-- screen:begin -->", "<!-- screen:end -->"
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
WIDTHS = (64, 80, 96, 112, 128, 144, 160, 176)
LAYERS = 20
SLOWDOWNS = {"unchanged": 0.0, "+5%": 0.05, "+10%": 0.10}
"""Each condition's added step time, as a fraction of the base step time of each cell."""
CELL = """torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(32, width)
extra = SPIN.get(width, 0)


def step():
    spin(extra)
    opt.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss
"""
"""One cell of the suite, built and stepped (at the indentation of a function body: see :func:`cell`)."""


def cell(indent: int) -> str:
    """:data:`CELL` at ``indent`` spaces, blank lines kept blank."""
    return textwrap.indent(CELL, " " * indent).replace("\n\n\n", "\n\n")


SUITE = '''
import torch
from torch import nn
import pytest_trainperf as tp

from work import SPIN

LAYERS = {layers}


def spin(iterations):
    for _ in range(iterations):  # pure Python: no torch op, invisible to every exact metric
        pass


@tp.grid(width=[{widths}])
def test_mlp(trainperf, width):
{cell}
    trainperf.train(step, steps=30, warmup=5, items_per_step=32)
'''
INI = "[pytest]\ntrainperf_threads = 1\n"


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=where, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(where: Path) -> str:
    """The suite at its base commit (no spin); returns the commit."""
    (where / "pytest.ini").write_text(INI)
    (where / "test_suite.py").write_text(SUITE.format(widths=", ".join(map(str, WIDTHS)), layers=LAYERS, cell=cell(4)))
    (where / ".gitignore").write_text("__pycache__/\n.pytest_cache/\nr.json\n")
    (where / "work.py").write_text("SPIN = {}\n")
    git(where, "init", "-q", "-b", "main")
    git(where, "config", "user.email", "bench@example.com")
    git(where, "config", "user.name", "bench")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "unchanged")
    return git(where, "rev-parse", "HEAD")


CALIBRATE = """
import json, statistics, sys, time
import torch
from torch import nn

torch.set_num_threads(1)
SPIN = {{}}  # the base: no spin in the step
LAYERS = {layers}


def spin(iterations):
    for _ in range(iterations):
        pass


found = {{}}
for width in {widths}:
{cell}
    for _ in range(5):
        step()
    ratios = []
    for _ in range(9):  # the step and the spin in turns, in this process: the same CPU for both
        times = []
        for _ in range(10):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        spin({spin_iters})
        per_iteration = (time.perf_counter() - t) / {spin_iters}
        ratios.append(statistics.median(times) / per_iteration)
    found[width] = statistics.median(ratios)
print(json.dumps(found))
"""
SPIN_ITERS = 20_000
"""Iterations of the spin loop timed against each calibration block of steps."""


def spin_per_step() -> dict[int, float]:
    """By width: how many iterations of the suite's spin loop take as long as one warm step, measured in
    one fresh process that takes turns between the two (a median of nine blocks), so that both see the
    same CPU; the size of the probe of :func:`spin_per_paired_step`."""
    code = CALIBRATE.format(widths=list(WIDTHS), layers=LAYERS, spin_iters=SPIN_ITERS, cell=cell(4))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {int(width): float(ratio) for width, ratio in json.loads(done.stdout).items()}


PAIR_WORKER = """
import sys, time
import torch
from torch import nn
from pytest_trainperf.measure.waiting import neighbour_wait, read

torch.set_num_threads(1)
SPIN = {spins!r}
LAYERS = {layers}


def spin(iterations):
    for _ in range(iterations):
        pass


step = None
for line in sys.stdin:
    word, *rest = line.split()
    if word == "w":  # build the cell of this width, as the suite does, and warm it up
        width = int(rest[0])
{cell}
        for _ in range(5):
            step()
        print("ok", flush=True)
    else:  # one step, timed, less what another process took of it, as the plugin's pairs time it
        before = read()
        started = time.perf_counter_ns()
        step()
        elapsed = time.perf_counter_ns() - started
        print((elapsed - neighbour_wait(before, read(), elapsed)) / 1e9, flush=True)
"""
CALIBRATION_PAIRS = 160
"""Timed step pairs per width when the spin is sized in pairs (after 10 untimed ones)."""
PROBE = 0.10
"""The probe spin of the sizing in pairs, as a fraction of a warm step."""


def spin_per_paired_step(busy: bool = False) -> dict[int, float]:
    """By width: how many iterations of the spin loop add one step's time *as side-by-side pairs time a
    step*. A spin sized on warm steps in a row (:func:`spin_per_step`) was measured at +3.5% for +5% in
    the pairs, where every other step runs right after a switch of process (caches cold), which the spin
    hardly feels. So: two processes pinned to one CPU (as the plugin's workers are), one with a probe
    spin of :data:`PROBE` of a warm step, take turns step by step; the median balanced ratio ``r_w`` of
    each width (:func:`pytest_trainperf.paired.paired_change`), and their median ``r`` over the widths,
    give ``warm_w * PROBE / (r - 1)`` iterations per step. One factor for all widths: a factor per width
    moved the commits by ±2-3 points from one sizing to the next (2026-12-01), one per suite by less
    than one (a warm-sized +5% read +4.5% ±0.5% per width in three fresh process pairs).
    ``busy``: in the busy setting (core 0, a spinning neighbour: :func:`paired_ratios`), where the same
    spin is a smaller share of a step (the neighbour's visits slow the step's torch work, not the spin)."""
    warm = spin_per_step()
    probe = {width: round(PROBE * iterations) for width, iterations in warm.items()}
    ratios = paired_ratios({}, probe, CALIBRATION_PAIRS, busy=busy)
    share = statistics.median(ratio - 1 for ratio in ratios.values())
    print(f"  sized in {'busy' if busy else 'quiet'} pairs: a probe of +{PROBE:.0%} of a warm step measured "
          + ", ".join(f"{ratios[w] - 1:+.1%}" for w in WIDTHS) + f" in pairs (median {share:+.1%})", flush=True)
    if share < PROBE / 4:
        return warm
    return {width: iterations * PROBE / share for width, iterations in warm.items()}


def paired_ratios(before: dict[int, int], after: dict[int, int], pairs: int, busy: bool) -> dict[int, float]:
    """By width: the median balanced ratio (:func:`pytest_trainperf.paired.paired_change`) of ``pairs``
    timed step pairs (after 10 untimed ones) of two processes taking turns on one CPU, with spins
    ``before`` and ``after``, every pair timed (no stop). Quiet: on the CPU the plugin pins its pairs to;
    busy: on core 0 with a spinning :func:`neighbour`, as the benchmark's busy compare runs."""
    from pair_cpus import step  # one timed step of a worker: "go", then its time

    from pytest_trainperf.paired import paired_change
    from pytest_trainperf.runners.children import pair_cpus

    cpus = frozenset({0}) if busy else pair_cpus(1)
    sides = [subprocess.Popen([sys.executable, "-c", PAIR_WORKER.format(spins=spins, layers=LAYERS, cell=cell(8))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
             for spins in (before, after)]
    spinner = neighbour() if busy else None
    found = {}
    try:
        for width in WIDTHS:
            for side in sides:  # build and warm up the cell of this width; it answers "ok"
                assert side.stdin is not None and side.stdout is not None
                side.stdin.write(f"w {width}\n")
                side.stdin.flush()
                side.stdout.readline()
            times: tuple[list[float], list[float]] = ([], [])
            for i in range(10 + pairs):
                for s in (0, 1) if i % 2 == 0 else (1, 0):
                    elapsed = step(sides[s])
                    if i >= 10:
                        times[s].append(elapsed)
            found[width] = paired_change(times[0], times[1]).ratio
    finally:
        procs: list[subprocess.Popen[Any]] = [*sides, *([spinner] if spinner is not None else [])]
        for proc in procs:
            proc.kill()
            proc.wait()
    return found


MEASURE_PAIRS = 240
"""Timed pairs per width that measure each committed slowdown, every pair (the plugin's budget at the
default ``--trainperf-pairs``, without its stop)."""


def measure_commits(spins: dict[tuple[str, str], dict[int, int]], conditions: Sequence[str]
                    ) -> dict[str, dict[str, list[float]]]:
    """By condition (quiet, busy) and slowdown: each width's change as :data:`MEASURE_PAIRS` fixed pairs
    measure the condition's committed spin against none: the size of what was committed, with no
    sequential stop to bias it (a comparison that stops at its first look below a boundary reports less
    than the truth). ``spins`` by (the setting it was sized in, slowdown); a busy condition with commits
    of its own also measures the quiet-sized ones, as ``"<slowdown> sized quiet"``."""
    found: dict[str, dict[str, list[float]]] = {}
    for condition in conditions:
        for (setting, name), spin in spins.items():
            if setting not in (condition, "quiet"):
                continue
            ratios = paired_ratios({}, spin, MEASURE_PAIRS, busy=condition == "busy")
            beside = setting != condition and (condition, name) in spins  # quiet-sized, beside the busy-sized ones
            label = f"{name} sized quiet" if beside else name
            found.setdefault(condition, {})[label] = [ratios[w] - 1 for w in WIDTHS]
            print(f"  {name} commit sized {setting}, {condition}, {MEASURE_PAIRS} fixed pairs: "
                  + ", ".join(f"{ratios[w] - 1:+.1%}" for w in WIDTHS), flush=True)
    return found


def commit_slowdowns(repo: Path, base: str, settings: Sequence[str]
                     ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], dict[int, int]]]:
    """Commit each slowdown on top of the base, its spin per width sized in the pairs of each setting of
    ``settings`` (``quiet``, ``busy``: :func:`spin_per_paired_step`); the commits and the spins, by
    (setting, slowdown)."""
    commits: dict[tuple[str, str], str] = {}
    committed: dict[tuple[str, str], dict[int, int]] = {}
    for setting in settings:
        per_step = spin_per_paired_step(busy=setting == "busy")
        commits[(setting, "unchanged")] = base
        for name, fraction in SLOWDOWNS.items():
            if not fraction:
                continue
            git(repo, "checkout", "-q", base)
            spins = {width: round(fraction * iterations) for width, iterations in per_step.items()}
            (repo / "work.py").write_text(f"SPIN = {spins!r}\n")
            git(repo, "checkout", "-q", "-B", f"slower-{setting}-{fraction:g}")
            git(repo, "add", "work.py")
            git(repo, "commit", "-qm", f"{name}, sized in {setting} pairs")
            commits[(setting, name)] = git(repo, "rev-parse", "HEAD")
            committed[(setting, name)] = spins
    git(repo, "checkout", "-q", base)
    return commits, committed


def pytest_run(where: Path, args: Sequence[str], pinned: bool) -> tuple[float, dict[str, object]]:
    """One pytest process; its wall time and its JSON results."""
    out = where / "r.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--trainperf-json={out}", *args]
    if pinned:
        argv = ["taskset", "-c", "0", *argv]
    started = time.perf_counter()
    subprocess.run(argv, cwd=where, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    return wall, json.loads(out.read_text()) if out.exists() else {}


def neighbour() -> subprocess.Popen[bytes]:
    """A process spinning on core 0 until killed."""
    return subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])


def counts(doc: dict[str, object]) -> tuple[int, int, int, list[float], list[float], list[float],
                                             list[dict[str, object]]]:
    """Cells, cells failed (regressed), cells confirmed side by side, the step-time changes those
    side-by-side comparisons measured (this tree / the baseline's commit, minus one), every cell's
    step-time change against its stored baseline (the screen's), the lower ends of the side-by-side
    intervals (a cell fails when its lower end clears the tolerance), and each cell (:func:`per_cell`)."""
    cells = doc.get("cells", [])
    assert isinstance(cells, list)
    failed = sum(c["status"] == "regressed" for c in cells)
    confirmed = [c for c in cells if c["verdict"].get("confirmed_against")]
    changes = [m["change"] for c in confirmed for m in c["verdict"]["metrics"]
               if m["name"] == "step_time" and m.get("change") is not None]
    stored = [m["change"] for c in cells for m in (c["verdict"].get("screen") or c["verdict"]["metrics"])
              if m["name"] == "step_time" and m.get("change") is not None]
    lows = [m["interval"][0] for c in confirmed for m in c["verdict"]["metrics"]
            if m["name"] == "step_time" and m.get("interval")]
    return len(cells), failed, len(confirmed), changes, stored, lows, [per_cell(c) for c in cells]


def per_cell(cell: dict[str, Any]) -> dict[str, object]:
    """One cell of a run's JSON results: its id, status, how many pairs of processes confirmed it side
    by side (0: not sent), and its step time's change and interval (side by side where confirmed)."""
    step = next((m for m in cell["verdict"]["metrics"] if m["name"] == "step_time"), {})
    return {"cell": cell.get("cell"), "status": cell["status"],
            "pairings": cell["verdict"].get("confirmed_pairings", 0),
            "change": step.get("change"), "interval": step.get("interval")}


def run(runs: int, workdir: Path, extra_quiet: int = 0, raw: Path | None = None,
        only: Sequence[str] = (), sizing: str = "each") -> dict[str, object]:
    repo = workdir / "repo"
    repo.mkdir()
    base = make_repo(repo)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--trainperf-update-baselines"],
                   cwd=repo, capture_output=True, check=True)
    update_wall = time.perf_counter() - started
    git(repo, "add", "baselines")
    git(repo, "commit", "-qm", "baselines")
    base = git(repo, "rev-parse", "HEAD")
    conditions = [c for c in ("quiet", "busy") if not only or any(e.startswith(f"{c}:") for e in only)]
    sized_in = {condition: condition if sizing == "each" else "quiet" for condition in conditions}
    commits, spins = commit_slowdowns(repo, base, sorted(set(sized_in.values()), reverse=True))
    shutil.copytree(repo / "baselines", workdir / "baselines")
    rows: dict[str, list[tuple[Any, ...]]] = {}
    found: dict[str, object] = {"update_wall": update_wall, "rows": rows, "runs": 0, "extra_quiet": extra_quiet,
                                "only": list(only), "sizing": sizing}
    found["sizes"] = measure_commits({key: spin for key, spin in spins.items()
                                      if not only or any(entry.endswith(f":{key[1]}") for entry in only)}, conditions)
    for number in range(runs):
        plan = [(condition, change, True) for condition in ("quiet", "busy") for change in SLOWDOWNS]
        plan += [("quiet", "unchanged", False)] * extra_quiet  # the false-alarm row needs the most cell-runs
        if only:  # e.g. quiet:+5%: those conditions alone
            plan = [entry for entry in plan if f"{entry[0]}:{entry[1]}" in only]
        for condition, change, main in plan:
            git(repo, "checkout", "-q", commits[(sized_in[condition], change)])
            shutil.rmtree(repo / "baselines")
            shutil.copytree(workdir / "baselines", repo / "baselines")
            modes: list[tuple[str, list[str]]] = [("confirm", [])] + ([("stored only", ["--trainperf-confirm-against=none"])]
                                        if change == "unchanged" and main else [])
            for mode, extra in modes:
                spinner = neighbour() if condition == "busy" else None
                try:
                    wall, doc = pytest_run(repo, ["--trainperf", *extra], pinned=condition == "busy")
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                row = (wall, *counts(doc))
                rows.setdefault(f"{condition}|{change}|{mode}", []).append(row)
                found["runs"] = number + 1
                if raw is not None:  # as it goes: an interrupted run keeps what it measured
                    raw.write_text(json.dumps(found, indent=1))
                print(f"  {condition} {change} {mode}: {wall:.1f} s, {row[2]} of {row[1]} failed, {row[3]} confirmed: "
                      + ", ".join(f"{c:+.1%} (low end {low:+.1%})" for c, low in zip(row[4], row[6], strict=False)), flush=True)
        print(f"run {number + 1} of {runs} done", flush=True)
    return found


def _spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return "—"
    deciles = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):+.1%} ({deciles[0]:+.1%} to {deciles[-1]:+.1%})"


def section(found: dict[str, object]) -> str:
    rows = found["rows"]
    assert isinstance(rows, dict)
    only = found.get("only") or []
    assert isinstance(only, list)
    lines = [BEGIN, "", "## Screen, then confirm side by side (issue 12 benchmark)", "",
             f"`python benchmarks/screen.py --runs {found['runs']} --extra-quiet {found.get('extra_quiet', 0)}"
             + (f" --only {','.join(map(str, only))}" if only else "")
             + (f" --sizing {found['sizing']}" if found.get("sizing") else "") + "`: a "
             f"{len(WIDTHS)}-cell MLP suite ({LAYERS} layers, widths {WIDTHS[0]} to {WIDTHS[-1]}, one thread); +5% and "
             "+10% step time committed as a pure-Python spin in each step, "
             "sized per cell on warm steps and scaled by one factor for the suite, as side-by-side pairs time a "
             "step (two processes on one CPU taking turns, one with a probe spin: the median of the cells), "
             + ("in each condition's own setting (the busy commits in pairs with the neighbour on the core)"
                if found.get("sizing", "quiet") == "each" else "in quiet pairs (one set of commits for both conditions)")
             + " (no torch op: FLOPs, ops, memory traffic and peak memory unchanged, so only "
             "the timings can catch it). Baselines updated at the base with the default rounds (two in "
             f"process, three in fresh processes: {found['update_wall']:.0f} s) and committed with it. Conditions "
             "interleaved, run after run (the extra quiet unchanged runs at the end of each round). *busy*: compare "
             "run and a spinning neighbour pinned to one core (`taskset -c 0`; the baselines were made without it).",
             "",
             "| condition | code | verdict | runs | cell-runs | cells failed | confirmed side by side | step time "
             "against the stored baseline (median; 10th to 90th percentile) | step time side by side (median; "
             f"10th to 90th) | the commit, {MEASURE_PAIRS} fixed pairs (median of the cells; lowest to highest) "
             "| wall time per run (median) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    sizes = found.get("sizes") or {}
    assert isinstance(sizes, dict)
    for key in sorted(rows, key=lambda k: (k.split("|")[0] != "quiet", list(SLOWDOWNS).index(k.split("|")[1]),
                                         k.split("|")[2])):
        values = rows[key]
        condition, change, mode = key.split("|")
        cells = sum(v[1] for v in values)
        failed = sum(v[2] for v in values)
        confirmed = sum(v[3] for v in values)
        measured = [c for v in values for c in v[4]]
        stored = [c for v in values for c in (v[5] if len(v) > 5 else [])]
        size = sizes.get(condition, {}).get(change)
        commit = f"{statistics.median(size):+.1%} ({min(size):+.1%} to {max(size):+.1%})" if size else "—"
        lines.append(f"| {condition} | {change} | {mode} | {len(values)} | {cells} | {failed} "
                     f"({failed / max(cells, 1):.1%}) | {confirmed} | {_spread(stored)} | {_spread(measured)} | "
                     f"{commit} | {statistics.median(v[0] for v in values):.1f} s |")
    lines += ["", "*cells failed* is a false alarm for unchanged code and a catch for a slowdown. *stored only*: "
              "`--trainperf-confirm-against=none`, the stored verdict alone (the plugin before this feature). "
              "*confirmed side by side*: cells the screen sent to a side-by-side comparison that measured them. "
              "*step time side by side*: the change those pairs measured (this tree against the baseline's "
              "commit), biased low near the stop's boundary (a comparison ends at its first look below it). "
              f"*the commit, {MEASURE_PAIRS} fixed pairs*: each cell's committed spin against none, every pair "
              "timed, in the condition's setting (`measure_commits`): the size of what was committed."]
    for condition, by_name in sizes.items():
        for name, size in by_name.items():
            if name.endswith(" sized quiet"):
                lines.append(f"The {name.removesuffix(' sized quiet')} commit sized in quiet pairs, measured {condition} "
                             f"the same way: {statistics.median(size):+.1%} ({min(size):+.1%} to {max(size):+.1%}).")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per condition (default %(default)s)")
    parser.add_argument("--extra-quiet", type=int, default=0,
                        help="more quiet runs of unchanged code per round, for the false-alarm row (default 0)")
    parser.add_argument("--only", default="", help="run these conditions alone, comma-separated, e.g. "
                        "quiet:+5%%,busy:unchanged (default: all)")
    parser.add_argument("--sizing", choices=("each", "quiet"), default="each",
                        help="each: size each condition's slowdowns in its own pairs (busy ones with the neighbour "
                        "on the core); quiet: one set of commits, sized in quiet pairs, for both (default %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="document to write the section to")
    parser.add_argument("--raw", type=Path, default=None, help="also write the raw figures as JSON, run by run")
    parser.add_argument("--from-raw", type=Path, default=None,
                        help="write the section from raw figures written earlier (an interrupted run) and stop")
    args = parser.parse_args(argv)
    if args.from_raw is not None:
        found = json.loads(args.from_raw.read_text())
        verdicts.write_doc(args.out, section(found), BEGIN, END)
        print(section(found))
        return 0
    if shutil.which("taskset") is None:
        print("screen.py: needs taskset (util-linux) to pin the busy condition", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="trainperf-screen-") as tmp:
        found = run(args.runs, Path(tmp), args.extra_quiet, args.raw, [c for c in args.only.split(",") if c],
                    args.sizing)
    if args.raw is not None:
        args.raw.write_text(json.dumps(found, indent=1))
    verdicts.write_doc(args.out, section(found), BEGIN, END)
    print(section(found))
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTEST_ADDOPTS", None)
    sys.exit(main())
