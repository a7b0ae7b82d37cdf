"""The end-of-session report: heatmaps per grid test, counts, hints, baseline updates."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from pytest_trainperf.records import BaselineChange, CellVerdict, FigureVerdict, Outcome, Scalar, Status
from pytest_trainperf.report.figures import render_figures
from pytest_trainperf.report.heatmap import render_heatmaps, render_updates

WIDE_BAND = 0.5
"""A cell whose smallest detectable slowdown is above this is pointed out: its timings are barely gated."""

SHOWN_WHERE_MEASURED = frozenset({"step_time", "peak_memory", "peak_memory_forecast"})
"""The default ``--trainperf-show``: some kinds of test measure only some of them (a ``tp.forecast`` test,
only ``peak_memory_forecast``; a record-only test, none): no warning when no cell measured them."""
Axes = tuple[tuple[str, tuple[Scalar, ...]], ...]
"""A grid's axes in declaration order."""


def metrics_to_show(cells: Sequence[CellVerdict], show: Sequence[str]) -> list[str]:
    """The metrics asked for that some cell has, then every other metric that regressed or improved
    somewhere (so that the counts under the tables can be found in them)."""
    present = {m.name for c in cells for m in c.metrics}
    changed = [m.name for c in cells for m in c.metrics if m.status in (Status.REGRESSED, Status.IMPROVED)]
    out = [name for name in show if name in present]
    for name in changed:
        if name not in out:
            out.append(name)
    if not out and show and any(c.measurement.outcome is not Outcome.MEASURED for c in cells):
        out = [show[0]]  # a grid that ran out of memory everywhere still gets its table of OOM cells
    return out


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def render_session(console: Console, *, results: Sequence[tuple[str, str, Axes, CellVerdict]],
                   fingerprints: Sequence[str], show: Sequence[str],
                   changes: Sequence[BaselineChange], update: bool, errors: Sequence[str],
                   hint: str, elsewhere: Sequence[str] = (), figures: Sequence[FigureVerdict] = (),
                   warnings: Sequence[str] = (), verbose: bool = False) -> None:
    """Render the session: ``results`` are ``(test file, test name, grid axes, verdict)`` per cell;
    ``elsewhere`` the environments that hold baselines for cells that are new in this one; ``figures``
    the verdicts on figures derived from whole grids, printed after their test's heatmaps; ``verbose``
    (``-v``) lists every new baseline value written, not only their count."""
    groups: dict[tuple[str, str], tuple[Axes, list[CellVerdict]]] = {}
    for test_file, test, axes, verdict in results:
        groups.setdefault((test_file, test), (axes, []))[1].append(verdict)
    for (test_file, test), (axes, cells) in groups.items():
        render_heatmaps(console, test=f"{test_file}::{test}", axes=axes, cells=cells,
                        metrics=metrics_to_show(cells, show))
        console.print()
        own = [f for f in figures if (f.test_file, f.test) == (test_file, test)]
        if own:
            render_figures(console, f"{test_file}::{test}", own)
    measured = {m.name for *_, verdict in results for m in verdict.metrics}
    unknown = [name for name in show if name not in measured and name not in SHOWN_WHERE_MEASURED]
    if unknown:
        console.print(Text(f"--trainperf-show: no cell measured {', '.join(unknown)} "
                           f"(measured: {', '.join(sorted(measured))})", style="yellow"))
    for key in fingerprints:
        console.print(Text(f"environment: {key}", style="dim"))
    counts = {status: 0 for status in Status}
    for *_, verdict in results:
        counts[verdict.status] += 1
    parts = [f"{counts[s]} {s.value}" for s in Status if counts[s]]
    console.print(Text(f"{_cells(len(results))} measured: " + ", ".join(parts)))
    if figures:
        by_status = {status: sum(f.status is status for f in figures) for status in Status}
        console.print(Text(f"{len(figures)} figure{'s' * (len(figures) != 1)} of whole grids: "
                           + ", ".join(f"{n} {s.value}" for s, n in by_status.items() if n)))
    for warning in warnings:
        console.print(Text(f"note: {warning}", style="yellow"))
    if counts[Status.IMPROVED] and not update:
        console.print(Text(f"{_cells(counts[Status.IMPROVED])} improved beyond tolerance; to accept:",
                           style="green"))
        console.print(Text(f"  {hint}", style="green"))
    for test_file, test, _, verdict in results:
        m = verdict.measurement
        if m.outcome is not Outcome.MEASURED and m.detail:
            console.print(Text(f"{m.outcome.label}: {test_file}::{test}[{m.cell}]: {m.detail}", style="magenta"))
        for note in m.notes:
            console.print(Text(f"note: {test_file}::{test}[{m.cell}]: {note}", style="yellow"))
    wide = [m for *_, verdict in results for m in verdict.metrics
            if m.name == "step_time" and m.detectable is not None and m.detectable > WIDE_BAND]
    if wide:
        widest = max(m.noise or 0.0 for m in wide)
        console.print(Text(f"note: {_cells(len(wide))} cannot reliably detect a slowdown below "
                           f"{WIDE_BAND:.0%} (noise bands up to ±{widest:.0%}): their step-time gates are "
                           "loose; update their baselines on a quiet machine", style="yellow"))
    missing = sorted({name for *_, verdict in results for name in verdict.missing})
    if missing:
        gone = sum(1 for *_, verdict in results if verdict.missing)
        console.print(Text(f"note: not measured any more, though in the baselines: {', '.join(missing)} "
                           f"({_cells(gone)}; an update drops them)", style="yellow"))
    if elsewhere:
        console.print(Text("note: cells new here have baselines for other environments only:", style="yellow"))
        for key in elsewhere:
            console.print(Text(f"  {key}", style="yellow"))
        console.print(Text("  (nothing was compared for them: update the baselines on this environment)",
                           style="yellow"))
    if update:
        outcomes = [(test_file, test, v) for test_file, test, _, v in results
                    if not v.measurement.outcome.died
                    and (v.measurement.outcome is not Outcome.MEASURED
                         or v.baseline_outcome not in (None, Outcome.MEASURED))
                    and v.measurement.outcome is not v.baseline_outcome]
        if changes:
            render_updates(console, changes, verbose)
        elif not outcomes:
            console.print(Text("baselines: nothing changed"))
        for test_file, test, v in outcomes:
            before = v.baseline_outcome.value if v.baseline_outcome is not None else "new"
            console.print(Text(f"outcome written: {test_file}::{test}[{v.measurement.cell}]: "
                               f"{before} -> {v.measurement.outcome.value}"))
    for error in errors:
        console.print(Text(f"trainperf: {error}", style="bold red"))
