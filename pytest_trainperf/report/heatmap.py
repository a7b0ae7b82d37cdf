"""Heatmap tables of a test's grid, and the table of rewritten baselines.

One table per metric and per combination of the third and later axes: the first axis runs down the
rows, the second across the columns. Each cell holds the value measured now and, on the next line, its
change against the baseline with a marker (``REGR``, ``impr``, ``new``), so the table reads the same
without colour; colour only repeats the marker (regressed bold red, improved green, new cyan).

Everything is printed through rich renderables with styles, never markup or ANSI codes: the caller's
``Console`` decides whether colour is emitted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement as RenderWidth
from rich.table import Table
from rich.text import Text

from pytest_trainperf.records import (
    BaselineChange,
    CellVerdict,
    MetricVerdict,
    Outcome,
    Scalar,
    Status,
    format_change,
    relative_change,
)
from pytest_trainperf.units import common_scale, format_value, in_scale

STATUS_STYLES: dict[Status, str] = {
    Status.REGRESSED: "bold red",
    Status.IMPROVED: "green",
    Status.NEW: "cyan",
    Status.UNCHANGED: "",
}
"""The style of a cell, by the status of its metric."""

MARKERS: dict[Status, str] = {
    Status.REGRESSED: "REGR",
    Status.IMPROVED: "impr",
    Status.NEW: "new",
    Status.UNCHANGED: "",
}
"""The word after the change that says the status without colour."""

OUTCOME_STYLE = "magenta"
"""The style of an expected out-of-memory cell (one whose baseline ran out of memory too)."""

ABSENT_STYLE = "dim"
"""The style of a grid cell with no verdict, or with no value for the metric."""

NOT_MEASURED = "n/a"
"""A cell that ran but did not measure this metric."""

_MEASURE_WIDTH = 100_000
"""A console width no table reaches: measuring a table against it gives its natural width."""


@dataclass(frozen=True)
class _Glyphs:
    """The characters that need Unicode, with ASCII stand-ins for other encodings."""

    missing: str
    """A grid cell with no verdict (not run, failed, deselected)."""
    sep: str
    """Between the parts of a table title."""
    at_least: str
    """Before the smallest detectable change."""


_UNICODE = _Glyphs(missing="—", sep=" · ", at_least="≥")
_ASCII = _Glyphs(missing="-", sep=" | ", at_least=">=")


def _glyphs(console: Console) -> _Glyphs:
    return _UNICODE if console.encoding.lower().startswith("utf") else _ASCII


class _Absent:
    """The value of an axis in a cell whose params do not name that axis."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()

AxisValue = Scalar | _Absent
"""A value along one axis: one of its declared values, or absent from a cell's params."""

ValueKey = tuple[bool, object]
"""An axis value as a dict key (:func:`value_key`)."""


def value_key(value: AxisValue) -> ValueKey:
    """A dict key for an axis value that keeps ``True`` apart from ``1`` (and ``1`` equal to ``1.0``)."""
    return (isinstance(value, bool), value)


def _label(value: AxisValue, glyphs: _Glyphs) -> str:
    return glyphs.missing if isinstance(value, _Absent) else str(value)


@dataclass(frozen=True)
class GridAxis:
    """One axis of the rendered grid."""

    name: str
    """The param name."""
    values: tuple[AxisValue, ...]
    """Its values: the declared ones in order, then any others the cells carry, in order of appearance."""


def grid_axes(
    axes: Sequence[tuple[str, Sequence[Scalar]]], cells: Sequence[CellVerdict]
) -> tuple[list[GridAxis], dict[tuple[ValueKey, ...], CellVerdict]]:
    """The axes to render (declared, then extra params of the cells) and the cells by their keys."""
    names: list[str] = []
    values: dict[str, list[AxisValue]] = {}
    seen: dict[str, set[ValueKey]] = {}

    def add(name: str, value: AxisValue) -> None:
        if value_key(value) not in seen[name]:
            seen[name].add(value_key(value))
            values[name].append(value)

    def add_name(name: str) -> None:
        if name not in values:
            names.append(name)
            values[name] = []
            seen[name] = set()

    for name, declared in axes:
        add_name(name)
        for value in declared:
            add(name, value)
    for cell in cells:
        for name, _ in cell.measurement.params:
            add_name(name)
    index: dict[tuple[ValueKey, ...], CellVerdict] = {}
    for cell in cells:
        params: dict[str, AxisValue] = dict(cell.measurement.params)
        point = [params.get(name, _ABSENT) for name in names]
        for name, at in zip(names, point, strict=True):
            add(name, at)
        index.setdefault(tuple(value_key(v) for v in point), cell)
    return [GridAxis(name, tuple(values[name])) for name in names], index


def _change(verdict: MetricVerdict) -> tuple[str, str]:
    """The change against the baseline and the status marker, e.g. ``("+32.0%", "REGR")``."""
    if verdict.status is Status.NEW:
        return "", MARKERS[Status.NEW]
    if verdict.baseline is None:  # a value shown on its own (``python -m pytest_trainperf show``)
        return "", ""
    change = verdict.change if verdict.change is not None else relative_change(verdict.current, verdict.baseline)
    return format_change(change), MARKERS[verdict.status]


def _percent_out(change: float, up: bool) -> str:
    """A bound of an interval in whole percent, rounded away from the estimate (so the printed
    interval never claims more than the computed one)."""
    pct = math.ceil(change * 100) if up else math.floor(change * 100)
    pct = max(min(pct, 999), -999)
    return f"{pct:+d}"


def interval_text(verdict: MetricVerdict) -> str:
    """The interval of a timing change in whole percent, ``[-1,+7]``; empty without one."""
    if verdict.interval is None or verdict.status is Status.NEW:
        return ""
    low, high = verdict.interval
    return f"[{_percent_out(low, up=False)},{_percent_out(high, up=True)}]"


def detectable_text(verdict: MetricVerdict, at_least: str = "≥") -> str:
    """The smallest change the cell detects, ``≥+12%`` for a time (``≤-11%`` for a rate); empty without one."""
    if verdict.detectable is None or verdict.status is Status.NEW or not math.isfinite(verdict.detectable):
        return ""
    if verdict.detectable >= 0:
        return f"{at_least}+{min(math.ceil(verdict.detectable * 100), 999)}%"
    at_most = "≤" if at_least == "≥" else "<="
    return f"{at_most}-{min(math.ceil(-verdict.detectable * 100), 999)}%"


def _cell(verdict: CellVerdict | None, metric: str, *, stacked: bool, glyphs: _Glyphs, factor: float) -> Text:
    """A cell's text: the value in the table's unit, then the change and marker (on a third line when
    ``stacked``), then for a timing its interval and the smallest change it detects."""
    if verdict is None:
        return Text(glyphs.missing, style=ABSENT_STYLE)
    outcome = verdict.measurement.outcome
    if outcome is not Outcome.MEASURED:  # the same label in every metric's table
        status = verdict.outcome or Status.UNCHANGED
        label = " ".join(part for part in (outcome.label, MARKERS[status]) if part)
        return Text(label, style=STATUS_STYLES[status] or OUTCOME_STYLE)
    found = verdict.metric(metric)
    if found is None:
        return Text(NOT_MEASURED, style=ABSENT_STYLE)
    if verdict.outcome is Status.IMPROVED and verdict.baseline_outcome is not None:  # it fits now
        lines = [in_scale(found.current, factor), f"was {verdict.baseline_outcome.label}", MARKERS[Status.IMPROVED]]
        return Text("\n".join(lines), style=STATUS_STYLES[Status.IMPROVED])
    change, marker = _change(found)
    parts = [change, marker] if change and marker else [change or marker]
    lines = [in_scale(found.current, factor)]
    if change or marker:
        lines += parts if stacked else [" ".join(parts)]
    lines += [text for text in (interval_text(found), detectable_text(found, glyphs.at_least)) if text]
    return Text("\n".join(lines), style=STATUS_STYLES[found.status])


def plain_table(*, leading: int = 0) -> Table:
    """A borderless table: a rule under the header, columns two spaces apart."""
    return Table(
        box=box.SIMPLE,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        leading=leading,
    )


def _table(
    metric: str,
    rows: GridAxis | None,
    columns: GridAxis | None,
    fixed: tuple[ValueKey, ...],
    index: dict[tuple[ValueKey, ...], CellVerdict],
    *,
    stacked: bool,
    glyphs: _Glyphs,
    factor: float,
) -> Table:
    """One metric over the rows x columns of the grid, at the further-axis values ``fixed``."""
    table = plain_table(leading=1 if rows is not None else 0)
    if rows is None:
        corner = None
    elif columns is None:
        corner = rows.name
    else:
        corner = f"{rows.name} \\" + ("\n" if stacked else " ") + columns.name
    if corner is not None:
        table.add_column(Text(corner), justify="left", overflow="fold")
    column_values = columns.values if columns is not None else (None,)
    for value in column_values:
        header = "value" if value is None else _label(value, glyphs)
        table.add_column(Text(header), justify="right", overflow="fold")
    row_values = rows.values if rows is not None else (None,)
    for row in row_values:
        cells: list[Text] = [] if row is None else [Text(_label(row, glyphs))]
        for column in column_values:
            point = [value_key(v) for v in (row, column) if v is not None]
            cells.append(_cell(index.get((*point, *fixed)), metric, stacked=stacked, glyphs=glyphs,
                               factor=factor))
        table.add_row(*cells)
    return table


def _fits(console: Console, table: Table) -> bool:
    options = console.options.update_width(_MEASURE_WIDTH)
    return RenderWidth.get(console, options, table).maximum <= console.width


def _timing_legend(glyphs: _Glyphs) -> Text:
    return Text(f"[lo,hi] 95% interval of the change, {glyphs.at_least}+x% smallest slowdown detected (95% power)")


OUTCOME_MEANINGS = {
    Outcome.OOM: "out of memory",
    Outcome.OOM_EMULATED: "over the memory budget (emulated)",
    Outcome.OOM_KILLED: "killed by the kernel",
    Outcome.OOM_FORECAST: "over the device's memory (forecast on meta)",
    Outcome.CRASHED: "crashed",
    Outcome.TIMEOUT: "timed out",
}


def _outcome_legend(outcomes: set[Outcome]) -> Text:
    legend = Text()
    for i, outcome in enumerate(o for o in Outcome if o in outcomes):
        if i:
            legend.append(", ")
        legend.append(outcome.label, style=OUTCOME_STYLE)
        legend.append(f" {OUTCOME_MEANINGS[outcome]}")
    return legend


def _legend(glyphs: _Glyphs) -> Text:
    legend = Text()
    entries = [
        (MARKERS[Status.REGRESSED], STATUS_STYLES[Status.REGRESSED], "regressed"),
        (MARKERS[Status.IMPROVED], STATUS_STYLES[Status.IMPROVED], "improved"),
        (MARKERS[Status.NEW], STATUS_STYLES[Status.NEW], "no baseline"),
        (glyphs.missing, ABSENT_STYLE, "no result"),
        (NOT_MEASURED, ABSENT_STYLE, "not measured"),
    ]
    for i, (mark, style, meaning) in enumerate(entries):
        if i:
            legend.append(", ")
        legend.append(mark, style=style)
        legend.append(f" {meaning}")
    return legend


def render_heatmaps(
    console: Console,
    *,
    test: str,
    axes: Sequence[tuple[str, Sequence[Scalar]]],
    cells: Sequence[CellVerdict],
    metrics: Sequence[str],
) -> None:
    """Print one heatmap table per metric and per combination of the third and later axes.

    ``axes`` is the grid as declared, ``(name, values)`` in order; params the cells carry beyond it
    become further axes, in order of appearance. The first axis runs down the rows, the second across
    the columns (a single axis runs down the rows of a one-column table; no axis gives one cell).
    Every point of the grid gets a cell, ``—`` where no verdict came (not run, failed, deselected)
    and ``n/a`` where the verdict lacks the metric. When a table is wider than the console, the
    status marker moves under the change so the table fits. A one-line legend follows the tables.
    Nothing is printed when ``metrics`` is empty.
    """
    if not metrics:
        return
    glyphs = _glyphs(console)
    grid, index = grid_axes(axes, cells)
    rows = grid[0] if len(grid) > 0 else None
    columns = grid[1] if len(grid) > 1 else None
    further = grid[2:]
    first = True
    for metric in metrics:
        found = [m for c in cells for m in c.metrics if m.name == metric]
        label, factor = common_scale([m.current for m in found], found[0].unit if found else "")
        suffix = f" ({label})" if label else ""
        for combination in itertools.product(*(axis.values for axis in further)):
            title = Text(f"{test}{glyphs.sep}{metric}{suffix}", style="bold")
            for axis, value in zip(further, combination, strict=True):
                title.append(f"{glyphs.sep}{axis.name}={_label(value, glyphs)}")
            fixed = tuple(value_key(v) for v in combination)
            table = _table(metric, rows, columns, fixed, index, stacked=False, glyphs=glyphs, factor=factor)
            if not _fits(console, table):
                table = _table(metric, rows, columns, fixed, index, stacked=True, glyphs=glyphs, factor=factor)
            if not first:
                console.print()
            first = False
            console.print(title)
            console.print(table)
    console.print()
    console.print(_legend(glyphs))
    outcomes = {c.measurement.outcome for c in cells} - {Outcome.MEASURED}
    if outcomes:
        console.print(_outcome_legend(outcomes))
    shown = [m for c in cells for m in c.metrics if m.name in metrics]
    if any(interval_text(m) or detectable_text(m) for m in shown):
        console.print(_timing_legend(glyphs))


def _update_change(change: BaselineChange) -> str:
    if change.old is None:
        return MARKERS[Status.NEW]
    return format_change(relative_change(change.new, change.old))


def _by_file(
    changes: Iterable[BaselineChange],
) -> list[tuple[str, list[BaselineChange]]]:
    ordered = sorted(changes, key=lambda c: (c.path, c.test, c.cell, c.metric))
    return [(path, list(group)) for path, group in itertools.groupby(ordered, key=lambda c: c.path)]


def _values(n: int) -> str:
    return f"{n} value{'s' * (n != 1)}"


def _cells_of(changes: Sequence[BaselineChange]) -> str:
    n = len({(c.path, c.test, c.cell) for c in changes})
    return f"{n} cell{'s' * (n != 1)}"


def render_updates(console: Console, changes: Sequence[BaselineChange], verbose: bool = False) -> None:
    """Print the baseline values ``--trainperf-update-baselines`` rewrote, grouped by file.

    One heading per baseline file, then its rows sorted by test, cell and metric: the old value, the
    new one and the change, ``new`` where there was no old value. Values with nothing to compare
    (``new``) are counted, not listed, unless ``verbose`` (``-v``): a file whose values are all new is
    one line, a cell whose values are all new one line under its file, and an update whose values are
    all new (the first update of a suite) says so in its heading. Nothing is printed when ``changes``
    is empty.
    """
    if not changes:
        return
    glyphs = _glyphs(console)
    groups = _by_file(changes)
    files = len(groups)
    all_new = all(c.old is None for c in changes)
    cells = [list(rows) for _, group in groups for _, rows in itertools.groupby(group, key=lambda c: (c.test, c.cell))]
    counted = 0 if verbose else sum(len(cell) for cell in cells if all(c.old is None for c in cell))
    told = (", all new" + (" (-v lists them)" if counted else "") if all_new
            else f" ({counted} of new cells, counted: -v lists them)" if counted else "")
    console.print(Text(f"baselines updated: {_values(len(changes))} in {files} file{'s' * (files != 1)}{told}",
                       style="bold"))
    for path, group in groups:
        if not verbose and all(c.old is None for c in group):  # a new file: one line
            if not all_new:
                console.print()
            line = Text(f"{path}: ", style="bold")
            line.append(f"{_values(len(group))} in {_cells_of(group)}, new", style=STATUS_STYLES[Status.NEW])
            console.print(line)
            continue
        cells = [list(rows) for _, rows in itertools.groupby(group, key=lambda c: (c.test, c.cell))]
        listed = [verbose or any(c.old is not None for c in cell) for cell in cells]
        # a heading per cell and aligned metric lines under it: long test names and cell ids stay
        # out of the columns, so the lines fit 80 columns whatever the names
        rows = [[(c, glyphs.missing if c.old is None else format_value(c.old, c.unit),
                  format_value(c.new, c.unit), _update_change(c)) for c in cell] for cell in cells]
        shown = [row for cell_rows, full in zip(rows, listed, strict=True) if full for row in cell_rows]
        width = [max(len(c.metric) for c, *_ in shown), max(len(old) for _, old, _, _ in shown),
                 max(len(new) for _, _, new, _ in shown), max(len(marker) for *_, marker in shown)]
        console.print()
        console.print(Text(path, style="bold"))
        for cell, cell_rows, full in zip(cells, rows, listed, strict=True):
            first = cell[0]
            if not full:  # a new cell in a file with changes: one line
                line = Text(f"  {first.test}[{first.cell}]: ")
                line.append(f"{_values(len(cell))}, new", style=STATUS_STYLES[Status.NEW])
                console.print(line)
                continue
            console.print(Text(f"  {first.test}[{first.cell}]"))
            for change, old, new, marker in cell_rows:
                line = Text(f"    {change.metric:<{width[0]}}  {old:>{width[1]}} -> {new:>{width[2]}}  ")
                style = STATUS_STYLES[Status.NEW] if marker == MARKERS[Status.NEW] else ""
                line.append(f"{marker:>{width[3]}}", style=style)
                console.print(line)
