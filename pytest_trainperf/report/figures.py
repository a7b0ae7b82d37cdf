"""Tables of the figures derived from whole grids: relative views (``tp.relative``) and scaling fits
(``tp.scaling``).

A relative view prints one table per metric and variant over the other axes (the first of them down
the rows, the last across the columns): each cell holds the figure now (``+42.0%``: the variant
costs 42% more than the reference there) and, under it, the baseline's (``was +40.1%``) with the
status marker. A scaling fit prints one line per fitted metric and cell of the other axes: the
exponent now with its interval, the baseline's, the change and the marker. A timing figure judged
side by side (its stored baseline from another machine) shows how far it moved there
(``side by side -0.6%``): that, not the gap to the stored figure, decided its marker.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from pytest_trainperf.records import FigureKind, FigureVerdict, Status, format_change, format_scalar
from pytest_trainperf.report.heatmap import MARKERS, STATUS_STYLES, plain_table


def _relative_cell(verdict: FigureVerdict) -> Text:
    lines = [verdict.figure.shown()]
    if verdict.figure.interval is not None:
        low, high = verdict.figure.interval
        lines.append(f"[{format_change(low)},{format_change(high)}]")
    if verdict.baseline is not None:
        lines.append(f"was {verdict.baseline.shown()}" + (f" {MARKERS[verdict.status]}" if MARKERS[verdict.status]
                                                           else ""))
    elif verdict.status is Status.NEW:
        lines.append(MARKERS[Status.NEW])
    if verdict.confirmed_against and verdict.side_change is not None:
        lines.append(f"side by side {format_change(verdict.side_change)}")
    return Text("\n".join(lines), style=STATUS_STYLES[verdict.status])


def _relative_tables(console: Console, test: str, verdicts: Sequence[FigureVerdict]) -> None:
    groups: dict[tuple[str, str], list[FigureVerdict]] = {}
    for v in verdicts:
        variant = dict(v.figure.params).get(v.figure.axis, "")
        groups.setdefault((v.figure.metric, format_scalar(variant)), []).append(v)
    for (metric, variant), members in groups.items():
        first = members[0].figure
        others = [name for name, _ in first.params if name != first.axis]
        title = (f"{test}: {metric} of {first.axis}={variant} relative to {first.axis}={first.reference}")
        console.print(Text(title, style="bold"))
        columns_axis = others[-1] if others else None
        row_axes = others[:-1]
        index: dict[tuple[str, str], FigureVerdict] = {}
        rows: list[str] = []
        columns: list[str] = []
        for v in members:
            params = dict(v.figure.params)
            row = ", ".join(f"{format_scalar(params[a])}" for a in row_axes) or ""
            column = format_scalar(params[columns_axis]) if columns_axis is not None else "value"
            index[(row, column)] = v
            rows += [row] if row not in rows else []
            columns += [column] if column not in columns else []
        table = plain_table(leading=1)
        corner = " \\ ".join(part for part in (", ".join(row_axes), columns_axis or "") if part)
        table.add_column(Text(corner), justify="left")
        for column in columns:
            table.add_column(Text(column), justify="right")
        for row in rows:
            table.add_row(Text(row), *[_relative_cell(index[(row, c)]) if (row, c) in index else Text("·", style="dim")
                                       for c in columns])
        console.print(table)
        console.print()


def _scaling_table(console: Console, test: str, verdicts: Sequence[FigureVerdict]) -> None:
    console.print(Text(f"{test}: scaling, metric = a * x^b", style="bold"))
    table = plain_table()
    for header in ("metric", "x", "at", "exponent b [95% CI]", "baseline", "change"):
        table.add_column(Text(header), justify="right" if header in ("baseline", "change") else "left")
    for v in verdicts:
        f = v.figure
        now = f"{f.value:.2f}"
        if f.interval is not None:
            now += f" [{f.interval[0]:.2f}, {f.interval[1]:.2f}]"
        base = f"{v.baseline.value:.2f}" if v.baseline is not None else ""
        change = f"{v.change:+.2f}" if v.change is not None else ""
        if v.confirmed_against and v.side_change is not None:
            change += f" (side by side {v.side_change:+.2f})"
        marker = MARKERS[v.status]
        table.add_row(f.metric, f.reference, "all" if f.cell == "default" else f.cell, now, base,
                      Text(" ".join(p for p in (change, marker) if p), style=STATUS_STYLES[v.status]))
    console.print(table)
    console.print()


def render_figures(console: Console, test: str, verdicts: Sequence[FigureVerdict]) -> None:
    """Print the figures of one test (``test`` as shown in titles)."""
    relative = [v for v in verdicts if v.figure.kind is FigureKind.RELATIVE]
    scaling = [v for v in verdicts if v.figure.kind is FigureKind.SCALING]
    if relative:
        _relative_tables(console, test, relative)
    if scaling:
        _scaling_table(console, test, scaling)
