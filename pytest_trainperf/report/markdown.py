"""The session as Markdown, for a pull-request comment or ``$GITHUB_STEP_SUMMARY``.

Regressions first (each regressed cell with its failure lines), then the heatmaps as Markdown tables,
tests with a regression first: one table per test, metric and combination of the third and later axes,
the first axis down the rows and the second across the columns, as the terminal heatmaps lay them out.
A cell holds the value in the table's unit, the change and the marker (``REGR`` in bold, ``impr``,
``new``), so the table reads the same without colour.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from pytest_trainperf.records import (
    CellResult,
    CellVerdict,
    FigureKind,
    FigureVerdict,
    Outcome,
    Scalar,
    Status,
    format_change,
    relative_change,
)
from pytest_trainperf.report.heatmap import (
    MARKERS,
    NOT_MEASURED,
    OUTCOME_MEANINGS,
    GridAxis,
    ValueKey,
    detectable_text,
    grid_axes,
    interval_text,
    value_key,
)
from pytest_trainperf.report.summary import metrics_to_show
from pytest_trainperf.results import SessionResults
from pytest_trainperf.units import common_scale, format_value, in_scale

TITLE = "pytest-trainperf"
"""The heading of the report."""
MISSING = "—"
"""A grid cell with no verdict (not run, failed, deselected)."""


def _escape(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def _cell(verdict: CellVerdict | None, metric: str, factor: float) -> str:
    if verdict is None:
        return MISSING
    outcome = verdict.measurement.outcome
    if outcome is not Outcome.MEASURED:
        status = verdict.outcome or Status.UNCHANGED
        marker = MARKERS[status]
        return " ".join(p for p in (outcome.label, f"**{marker}**" if status is Status.REGRESSED else marker) if p)
    found = verdict.metric(metric)
    if found is None:
        return NOT_MEASURED
    parts = [in_scale(found.current, factor)]
    if found.baseline is not None:
        change = found.change if found.change is not None else relative_change(found.current, found.baseline)
        parts.append(format_change(change))
    marker = MARKERS[found.status] if found.baseline is not None or found.status is Status.NEW else ""
    if marker:
        parts.append(f"**{marker}**" if found.status is Status.REGRESSED else marker)
    extra = [text for text in (interval_text(found), detectable_text(found)) if text]
    return " ".join(parts) + (f" <br>{' '.join(extra)}" if extra else "")


def _label(value: object) -> str:
    return MISSING if not isinstance(value, (bool, int, float, str)) else _escape(str(value))


def _table(metric: str, rows: GridAxis | None, columns: GridAxis | None, fixed: tuple[ValueKey, ...],
           index: dict[tuple[ValueKey, ...], CellVerdict], factor: float) -> list[str]:
    header: list[str] = []
    if rows is not None:
        header.append(_escape(rows.name if columns is None else f"{rows.name} \\ {columns.name}"))
    column_values = columns.values if columns is not None else (None,)
    header += ["value" if v is None else _label(v) for v in column_values]
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] * (rows is not None) + ["---:"] * len(column_values)) + " |"]
    for row in rows.values if rows is not None else (None,):
        cells = [] if row is None else [_label(row)]
        for column in column_values:
            point = [value_key(v) for v in (row, column) if v is not None]
            cells.append(_escape(_cell(index.get((*point, *fixed)), metric, factor)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def heatmap_tables(test: str, axes: Sequence[tuple[str, Sequence[Scalar]]], cells: Sequence[CellVerdict],
                   metrics: Sequence[str]) -> list[str]:
    """The Markdown lines of one test's heatmaps: a heading and a table per metric and combination
    of the third and later axes."""
    grid, index = grid_axes(axes, cells)
    rows = grid[0] if grid else None
    columns = grid[1] if len(grid) > 1 else None
    further = grid[2:]
    out: list[str] = []
    for metric in metrics:
        found = [m for c in cells for m in c.metrics if m.name == metric]
        label, factor = common_scale([m.current for m in found], found[0].unit if found else "")
        suffix = f" ({label})" if label else ""
        for combination in itertools.product(*(axis.values for axis in further)):
            title = f"{_code(test)} · {metric}{suffix}"
            title += "".join(f" · {axis.name}={_label(v)}" for axis, v in zip(further, combination, strict=True))
            out += [f"#### {title}", ""]
            out += _table(metric, rows, columns, tuple(value_key(v) for v in combination), index, factor)
            out.append("")
    return out


def _counts(results: SessionResults) -> str:
    counts = results.counts
    n = len(results.cells)
    parts = [f"{counts[s]} {s.value}" for s in Status if counts[s]]
    return f"**{n} cell{'s' * (n != 1)} measured**" + (": " + ", ".join(parts) if parts else "")


def _regressions(cells: Sequence[CellResult]) -> list[str]:
    regressed = [c for c in cells if c.verdict.regressions or c.verdict.outcome is Status.REGRESSED]
    if not regressed:
        return []
    out = ["### Regressions", ""]
    for c in regressed:
        out.append(f"- {_code(c.nodeid)} on {_code(c.fingerprint.key)}")
        if c.verdict.outcome is Status.REGRESSED:
            m = c.verdict.measurement
            out.append(f"  - {m.outcome.label}: {_escape(m.detail)}")
        out += [f"  - {m.describe()}" for m in c.verdict.regressions]
    return out + [""]


def _figures(figures: Sequence[FigureVerdict]) -> list[str]:
    """Figures of whole grids: regressions first, one row each."""
    if not figures:
        return []
    out = ["### Figures of whole grids", "", "| test | figure | baseline | now | change | |",
           "| --- | --- | ---: | ---: | ---: | --- |"]
    for f in sorted(figures, key=lambda f: -f.status.rank):
        change = ""
        if f.change is not None:
            change = format_change(f.change) if f.figure.kind is FigureKind.RELATIVE else f"{f.change:+.2f}"
        base = f.baseline.shown() if f.baseline is not None else MISSING
        row = [f"{f.test_file}::{f.test}", f.figure.title(), base, f.figure.shown(), change, MARKERS[f.status]]
        out.append("| " + " | ".join(_escape(x) for x in row) + " |")
    return out + [""]


def _info(cells: Sequence[CellResult]) -> list[str]:
    """The cells' free-form metadata (``trainperf.info``), one row per cell that gave any."""
    given = [c for c in cells if c.verdict.measurement.info]
    if not given:
        return []
    out = ["### Cell metadata", "", "| cell | metadata |", "| --- | --- |"]
    for c in given:
        values = ", ".join(f"{key}={_code(str(value))}" for key, value in c.verdict.measurement.info)
        out.append(f"| {_escape(_code(c.nodeid))} | {_escape(values)} |")
    return out + [""]


def _updates(results: SessionResults) -> list[str]:
    if not results.changes:
        return []
    n = len(results.changes)
    out = [f"<details><summary>Baselines updated: {n} value{'s' * (n != 1)}</summary>", "",
           "| file | test | cell | metric | old | new | change |",
           "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for ch in sorted(results.changes, key=lambda c: (c.path, c.test, c.cell, c.metric)):
        old = MISSING if ch.old is None else format_value(ch.old, ch.unit)
        change = MARKERS[Status.NEW] if ch.old is None else format_change(relative_change(ch.new, ch.old))
        row = [ch.path, ch.test, ch.cell, ch.metric, old, format_value(ch.new, ch.unit), change]
        out.append("| " + " | ".join(_escape(x) for x in row) + " |")
    return out + ["", "</details>", ""]


def render_markdown(results: SessionResults, *, show: Sequence[str], hint: str = "",
                    title: str = TITLE) -> str:
    """The whole report as Markdown text: counts, regressions, heatmaps, environments, warnings,
    errors and baseline updates."""
    out = [f"## {title}", "", _counts(results), ""]
    machine = results.machine
    if machine is not None and not results.changes:
        line = machine.describe()
        out += [line[0].upper() + line[1:] + ".", ""]
    for warning in results.warnings:
        out += [f"> **Warning:** {warning}", ""]
    for error in results.errors:
        out += [f"> **Error:** {error}", ""]
    out += _regressions(results.cells)
    improved = results.counts[Status.IMPROVED]
    if improved and hint:
        out += [f"{improved} cell{'s' * (improved != 1)} improved beyond tolerance; to accept: {_code(hint)}", ""]
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for c in results.cells:
        groups.setdefault((c.test_file, c.test), []).append(c)
    ordered = sorted(groups.items(), key=lambda kv: not any(c.verdict.regressions for c in kv[1]))
    for (test_file, test), cells in ordered:
        verdicts = [c.verdict for c in cells]
        names = metrics_to_show(verdicts, show)
        regressed = [n for n in names if any(m.name == n and m.status is Status.REGRESSED
                                             for v in verdicts for m in v.metrics)]
        names = regressed + [n for n in names if n not in regressed]
        out += heatmap_tables(f"{test_file}::{test}", cells[0].axes, verdicts, names)
    out += _figures(results.figures)
    out += _info(results.cells)
    out += _updates(results)
    keys = sorted({c.fingerprint.key for c in results.cells})
    if keys:
        out += ["Environment" + "s" * (len(keys) > 1) + ": " + ", ".join(_code(k) for k in keys), ""]
    legend = "Legend: **REGR** regressed, impr improved, new no baseline, — no result, n/a not measured."
    outcomes = [o for o in Outcome if o is not Outcome.MEASURED
                and any(c.verdict.measurement.outcome is o for c in results.cells)]
    if outcomes:
        legend += " " + ", ".join(f"{o.label} {OUTCOME_MEANINGS[o]}" for o in outcomes) + "."
    return "\n".join(out + [legend]) + "\n"
