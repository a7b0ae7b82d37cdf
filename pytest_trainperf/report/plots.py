"""PNG figures of a session (``--trainperf-plots=DIR``): pure functions over :class:`SessionResults`.

Per grid test, from its cells:

- **heatmaps** of ``step_time``, ``peak_memory``, ``throughput`` and the utilization metrics, laid out
  as the terminal heatmaps are (first axis down the rows, second across the columns, one panel per
  combination of further axes): each cell shows the value in the figure's unit and its change against
  the baseline; regressed cells are outlined, and cells that did not fit (``OOM``, ``OOM*``,
  ``KILLED``) or crashed are hatched grey with their label;
- **latency against the first numeric axis** of ``run`` cells, one line per combination of the other
  axes (cells that did not end measured are left out);
- **items processed against step, coloured by the loss** of ``train`` cells with a loss curve and
  ``items_per_step``;
- **the step-time samples** of every measured cell (as pytest-benchmark's histogram): a violin per
  cell with its median, the baseline's value as a red tick where there is one, at most
  :data:`VIOLINS_PER_FIGURE` cells per file.

From the session's derived figures (``tp.relative``, ``tp.scaling``):

- **relative bars**: each variant's value relative to the reference variant, in %, per cell of the
  other axes (placed in order of the reference cell's FLOPs when the cells counted them), with the
  baseline's value as a marker; with exactly two other axes also a **relative heatmap** per variant;
- **scaling fits**: the points on log-log axes, the fitted ``a * x^b`` with the exponent and its 95%
  interval in the legend, the baseline's fit dashed; one panel per metric.

matplotlib is imported inside the functions (it is the optional ``plots`` extra), and only its
object-oriented API is used (:class:`matplotlib.figure.Figure`, saved through Agg): no pyplot state.
Every figure is :data:`FIGSIZE` inches at :data:`DPI`, and its file name is derived from the test file,
the test and the figure (:func:`file_stem`), so reruns overwrite the same files.
"""

from __future__ import annotations

import itertools
import math
import re
import textwrap
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pytest_trainperf.records import (
    CellResult,
    CellVerdict,
    FigureKind,
    FigureVerdict,
    Measurement,
    MetricVerdict,
    Outcome,
    Scalar,
    Status,
    format_change,
    relative_change,
)
from pytest_trainperf.report.heatmap import MARKERS, AxisValue, GridAxis, ValueKey, grid_axes, value_key
from pytest_trainperf.results import SessionResults
from pytest_trainperf.units import common_scale, format_value, in_scale

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure as Canvas
    from matplotlib.text import Text

K = TypeVar("K", bound=Hashable)

FIGSIZE = (8.0, 5.0)
"""Every figure's size in inches."""
DPI = 100
"""Every figure's resolution: 800 x 500 pixels."""
HEATMAP_METRICS = ("step_time", "peak_memory", "peak_memory_forecast", "throughput", "sm_utilization",
                   "cpu_utilization")
"""The metrics drawn as heatmaps, where the cells have them."""
PANELS_PER_FIGURE = 4
"""Heatmap panels (combinations of the third and later axes) per file; more go to further files."""
REGRESSED_COLOUR = "#d62728"
"""The outline of a regressed cell or bar."""
IMPROVED_COLOUR = "#2ca02c"
"""The outline of an improved cell."""
OUTCOME_FACE = "#d9d9d9"
"""The face of a cell that did not end measured (drawn hatched)."""
MISSING = "—"
"""A grid cell with no verdict (not run, failed, deselected)."""
CROWDED = 12
"""More bars (or cells of the other axes) than this and the relative bars lose their value labels and
get rotated tick labels; more loss curves than this lose their labels."""
DOTS = 40
"""A loss curve of at most this many steps gets a dot per step on its line."""
LOG_SPAN = 8.0
"""An axis whose values span at least this ratio is drawn on a log scale."""
VIOLINS_PER_FIGURE = 16
"""Cells per figure of step-time samples; more go to further files."""
MIN_FONT, MAX_FONT = 4.5, 11.0
"""The range of a heatmap cell's text size in points: smaller cells give smaller text."""


# --------------------------------------------------------------------------- entry point


def write_plots(results: SessionResults, directory: Path) -> list[Path]:
    """Draw every figure the session's results support into ``directory`` (created when there is
    something to draw) and return the paths written, in drawing order. Empty results write nothing."""
    names = _Names(directory)
    tests = _by_test(results.cells)
    for (test_file, test), cells in tests.items():
        title = f"{test_file}::{test}"
        for metric in _heatmap_metrics(cells):
            for page, canvas in enumerate(_heatmap(title, cells, metric), start=1):
                names.save(canvas, test_file, test, f"heatmap-{metric}" + (f"-{page}" if page > 1 else ""))
        latency = _latency(title, cells)
        if latency is not None:
            names.save(latency, test_file, test, "latency")
        items = _items(title, cells)
        if items is not None:
            names.save(items, test_file, test, "items-loss")
        for page, canvas in enumerate(_samples(title, cells), start=1):
            names.save(canvas, test_file, test, "samples-step_time" + (f"-{page}" if page > 1 else ""))
    drawable = [f for f in results.figures if math.isfinite(f.figure.value)]
    relative = [f for f in drawable if f.figure.kind is FigureKind.RELATIVE]
    for (test_file, test, metric), figures in _group(relative, lambda f: (f.test_file, f.test, f.figure.metric)):
        cells = tests.get((test_file, test), [])
        names.save(_relative_bars(test_file, test, metric, figures, cells), test_file, test, f"relative-{metric}")
        for variant, canvas in _relative_heatmaps(test_file, test, metric, figures):
            names.save(canvas, test_file, test, f"relative-heatmap-{metric}-{variant}")
    scaling = [f for f in drawable if f.figure.kind is FigureKind.SCALING and f.figure.points]
    for (test_file, test), figures in _group(scaling, lambda f: (f.test_file, f.test)):
        names.save(_scaling(f"{test_file}::{test}", figures), test_file, test, "scaling")
    return names.written


def file_stem(test_file: str, test: str, figure: str) -> str:
    """A file name's stem from the test file, the test and the figure, in safe characters only:
    ``examples/test_lm.py``, ``TestLM::test_step``, ``heatmap-step_time`` ->
    ``examples_test_lm.TestLM__test_step.heatmap-step_time``."""
    path = test_file[:-3] if test_file.endswith(".py") else test_file
    return ".".join(_safe(part) for part in (path, test, figure) if part)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace("::", "__")).strip("._") or "_"


@dataclass
class _Names:
    """Saves figures under unique, deterministic names and remembers what was written."""

    directory: Path
    written: list[Path] = field(default_factory=list)

    def save(self, canvas: Canvas, test_file: str, test: str, figure: str) -> None:
        stem = file_stem(test_file, test, figure)
        path = self.directory / f"{stem}.png"
        for n in itertools.count(2):
            if path not in self.written:
                break
            path = self.directory / f"{stem}-{n}.png"
        self.directory.mkdir(parents=True, exist_ok=True)
        canvas.savefig(path, dpi=DPI, metadata={"Software": None})
        self.written.append(path)


# --------------------------------------------------------------------------- helpers


def _by_test(cells: Iterable[CellResult]) -> dict[tuple[str, str], list[CellResult]]:
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for c in cells:
        groups.setdefault((c.test_file, c.test), []).append(c)
    return groups


def _group(figures: Sequence[FigureVerdict], key: Callable[[FigureVerdict], K]) -> list[tuple[K, list[FigureVerdict]]]:
    groups: dict[K, list[FigureVerdict]] = {}
    for f in figures:
        groups.setdefault(key(f), []).append(f)
    return list(groups.items())


def _canvas(nrows: int = 1, ncols: int = 1) -> tuple[Canvas, list[Axes]]:
    """A figure of the fixed size with ``nrows x ncols`` axes, constrained layout."""
    from matplotlib.figure import Figure

    canvas = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = canvas.subplots(nrows, ncols, squeeze=False)
    return canvas, [ax for row in axes for ax in row]


def _title(canvas: Canvas, text: str) -> None:
    canvas.suptitle("\n".join(textwrap.wrap(text, 100)), fontsize=10)


def _footnote(canvas: Canvas, parts: Sequence[str]) -> None:
    if parts:
        canvas.supxlabel("; ".join(parts), fontsize=7, color="#555555")


def _text(value: object) -> str:
    return MISSING if not isinstance(value, (bool, int, float, str)) else str(value)


def _number(value: object) -> float | None:
    """An axis value as a positive-or-not float, None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _log_span(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) >= LOG_SPAN


def _unit_label(metric: str, unit: str) -> str:
    return f"{metric} ({unit})" if unit else metric


def _params_label(params: Sequence[tuple[str, Scalar]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params)


def _contrast(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _font(rows: int, columns: int, shape: tuple[int, int], lines: int, chars: int) -> float:
    """A cell text size (points) that fits ``lines`` lines of ``chars`` characters in a heatmap cell:
    the panel's share of the figure over its cells."""
    height = FIGSIZE[1] * 72 * 0.72 / shape[0] / max(rows, 1)
    width = FIGSIZE[0] * 72 * 0.78 / shape[1] / max(columns, 1)
    return max(MIN_FONT, min(MAX_FONT, height / (1.3 * max(lines, 1)), width / (0.6 * max(chars, 1))))


def _fit(canvas: Canvas, texts: Sequence[tuple[Axes, Text, bool]]) -> None:
    """Fit heatmap cell texts into their cells (a cell is one data unit wide and tall), measured once
    the layout is done: every text shrinks by the factor the widest *typical* one needs (so the cells
    read alike); a text with a marker that still overflows puts the marker on a line of its own, or
    shrinks further."""
    if not texts:
        return
    canvas.draw_without_rendering()

    def scale(ax: Axes, text: Text) -> float:
        (x0, y0), (x1, y1) = ax.transData.transform([(0.0, 0.0), (1.0, 1.0)])
        box = text.get_window_extent()
        if box.width <= 0 or box.height <= 0:
            return 1.0
        return float(min(0.9 * abs(x1 - x0) / box.width, 0.9 * abs(y1 - y0) / box.height))

    base = float(texts[0][1].get_fontsize())
    page = min([1.0] + [scale(ax, text) for ax, text, typical in texts if typical])
    for ax, text, typical in texts:
        text.set_fontsize(max(MIN_FONT, base * page))
        if typical or scale(ax, text) >= 1.0:
            continue
        flat = text.get_text()
        head, _, last = flat.rpartition("\n")
        stacked = "\n".join(p for p in (head, *last.rsplit(" ", 1)) if p)
        candidates = []
        for option in dict.fromkeys((flat, stacked)):
            text.set_text(option)
            candidates.append((min(1.0, scale(ax, text)), option))
        best, option = max(candidates)
        text.set_text(option)
        text.set_fontsize(max(MIN_FONT, base * page * best))


def _shape(panels: int, rows: int, columns: int, lines: int, chars: int) -> tuple[int, int]:
    """The panel layout, rows x columns of panels, that leaves the largest cell text."""
    shapes = [(r, math.ceil(panels / r)) for r in range(1, panels + 1)]
    shapes = [s for s in shapes if (s[0] - 1) * s[1] < panels]  # no empty row of panels
    return max(shapes, key=lambda s: (_font(rows, columns, s, lines, chars), -s[0]))


def _value_format(axis: Any) -> None:
    """Plain numbers (``0.5``, ``20``) on a colour bar's or a log axis' ticks, not powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v)))
    axis.set_minor_formatter(NullFormatter())


def _tick(value: float) -> str:
    """A tick label: ``0.5``, ``20``, ``50k``, ``2M``, ``3G``."""
    for prefix, factor in (("G", 1e9), ("M", 1e6), ("k", 1e4)):
        if abs(value) >= factor:
            return f"{value / (1e3 if prefix == 'k' else factor):.3g}{prefix}"
    return f"{value:.4g}"


def _log_ticks(low: float, high: float) -> list[float]:
    """Ticks for a log axis over ``[low, high]``: decades, or 1-2-5 steps (finer still) when the
    decades give fewer than four."""
    if not (low > 0 and high >= low):
        return []
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ticks: list[float] = []
    for mantissas in ((1.0,), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
        ticks = [float(f"{m * 10.0**k:.3g}") for k in range(first, last + 1) for m in mantissas]
        ticks = [t for t in ticks if low * 0.999 <= t <= high * 1.001]
        if len(ticks) >= 4:
            break
    while len(ticks) > 10:
        ticks = ticks[::2]
    return ticks


def _log_axis(ax: Axes, which: str, values: Sequence[float]) -> None:
    """Put ``ax``'s x or y axis on a log scale with plain-number ticks over ``values``."""
    positive = [v for v in values if v > 0]
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis: Any = ax.xaxis if which == "x" else ax.yaxis
    ticks = _log_ticks(min(positive) / 1.2, max(positive) * 1.2) if positive else []
    if ticks:
        axis.set_ticks(ticks)
    _value_format(axis)


# --------------------------------------------------------------------------- heatmaps


def _heatmap_metrics(cells: Sequence[CellResult]) -> list[str]:
    """The heatmap metrics some cell has; ``step_time`` for a grid whose cells all failed to fit."""
    if not cells or not cells[0].axes and len(cells) < 2:
        return []
    present = {m.name for c in cells for m in c.verdict.metrics}
    names = [name for name in HEATMAP_METRICS if name in present]
    if not names and any(c.verdict.measurement.outcome is not Outcome.MEASURED for c in cells):
        names = [HEATMAP_METRICS[0]]
    return names


@dataclass(frozen=True)
class _Entry:
    """What one heatmap cell shows."""

    lines: tuple[str, ...]
    """The text, line by line."""
    value: float | None = None
    """The value coloured (None: not coloured)."""
    status: Status = Status.UNCHANGED
    """Regressed and improved cells are outlined."""
    outcome: Outcome | None = None
    """Set for a cell that did not end measured: drawn hatched grey."""


def _entry(verdict: CellVerdict | None, metric: str, factor: float) -> _Entry:
    if verdict is None:
        return _Entry((MISSING,))
    outcome = verdict.measurement.outcome
    if outcome is not Outcome.MEASURED:
        status = verdict.outcome or Status.UNCHANGED
        return _Entry(tuple(p for p in (outcome.label, MARKERS[status]) if p), status=status, outcome=outcome)
    found = verdict.metric(metric)
    if found is None or not math.isfinite(found.current):
        return _Entry(("n/a",))
    lines = [in_scale(found.current, factor)]
    status = found.status
    if verdict.outcome is Status.IMPROVED and verdict.baseline_outcome is not None:  # it fits now
        lines.append(f"was {verdict.baseline_outcome.label}")
        status = Status.IMPROVED
    else:
        change = _change(found)
        marker = MARKERS[found.status]
        if change or marker:
            lines.append(" ".join(p for p in (change, marker) if p))
    return _Entry(tuple(lines), found.current / factor, status)


def _change(found: MetricVerdict) -> str:
    if found.baseline is None or found.status is Status.NEW:
        return ""
    if found.change is not None:
        return format_change(found.change)
    if found.baseline == 0:
        return ""
    return format_change(relative_change(found.current, found.baseline))


def _heatmap(title: str, cells: Sequence[CellResult], metric: str) -> list[Canvas]:
    """The heatmap figures of one test and metric: one panel per combination of further axes,
    :data:`PANELS_PER_FIGURE` panels per figure, one colour scale across them all."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Patch, Rectangle

    verdicts = [c.verdict for c in cells]
    grid, index = grid_axes(cells[0].axes, verdicts)
    rows = grid[0] if grid else GridAxis("", ("",))
    columns = grid[1] if len(grid) > 1 else None
    further = grid[2:]
    found = [m for v in verdicts for m in v.metrics if m.name == metric]
    unit = found[0].unit if found else ""
    label, factor = common_scale([m.current for m in found], unit)
    values = [m.current / factor for m in found if math.isfinite(m.current)]
    norm: Normalize
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        norm = LogNorm(min(values), max(values))
    else:
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        norm = Normalize(low, high if high > low else low + 1.0)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    column_values: tuple[AxisValue, ...] = columns.values if columns is not None else ("",)
    panels = [(combination, [[_entry(index.get(_point(row, column, rows, columns, fixed)), metric, factor)
                              for column in column_values] for row in rows.values])
              for combination in itertools.product(*(axis.values for axis in further))
              for fixed in [tuple(value_key(v) for v in combination)]]
    texts = [e for _, entries in panels for line in entries for e in line]
    lines = max(len(e.lines) for e in texts)
    chars = max((len(t) for e in texts for t in e.lines if e.status is Status.UNCHANGED or e.outcome is not None),
                default=6)
    canvases = []
    for start in range(0, len(panels), PANELS_PER_FIGURE):
        page = panels[start:start + PANELS_PER_FIGURE]
        shape = _shape(len(page), len(rows.values), len(column_values), lines, chars)
        size = _font(len(rows.values), len(column_values), shape, lines, chars)
        canvas, axes = _canvas(*shape)
        seen: set[str] = set()
        image = None
        placed: list[tuple[Axes, Text, bool]] = []
        for ax, (combination, entries) in zip(axes, page, strict=False):
            data = [[math.nan if e.value is None else e.value for e in line] for line in entries]
            image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            for i, line in enumerate(entries):
                for j, e in enumerate(line):
                    colour = "black"
                    if e.outcome is not None:
                        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=OUTCOME_FACE, hatch="///",
                                               edgecolor="#9a9a9a", linewidth=0))
                        seen.add("outcome")
                    elif e.value is not None and math.isfinite(e.value):
                        colour = _contrast(cmap(norm(e.value)))
                    if e.status in (Status.REGRESSED, Status.IMPROVED):
                        edge = REGRESSED_COLOUR if e.status is Status.REGRESSED else IMPROVED_COLOUR
                        ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor=edge,
                                               linewidth=2.5 if e.status is Status.REGRESSED else 1.8))
                        seen.add(e.status.value)
                    weight = "bold" if e.status is Status.REGRESSED else "normal"
                    text = ax.text(j, i, "\n".join(e.lines), ha="center", va="center", fontsize=size, color=colour,
                                   fontweight=weight, in_layout=False)
                    placed.append((ax, text, e.status is Status.UNCHANGED or e.outcome is not None))
            ax.set_xticks(range(len(column_values)), [_text(v) for v in column_values])
            ax.set_yticks(range(len(rows.values)), [_text(v) for v in rows.values])
            ax.tick_params(length=0, labelsize=8)
            if columns is not None:
                ax.set_xlabel(columns.name, fontsize=9)
            ax.set_ylabel(rows.name, fontsize=9)
            if further:
                ax.set_title(", ".join(f"{a.name}={_text(v)}" for a, v in zip(further, combination, strict=True)),
                             fontsize=9)
        for ax in axes[len(page):]:
            ax.set_axis_off()
        if image is not None:
            bar = canvas.colorbar(image, ax=axes[:len(page)], shrink=0.9)
            bar.set_label(_unit_label(metric, label), fontsize=9)
            bar.ax.tick_params(labelsize=8)
            if isinstance(norm, LogNorm):
                bar.set_ticks(_log_ticks(norm.vmin or 0.0, norm.vmax or 0.0))
            _value_format(bar.ax.yaxis)
        _title(canvas, f"{title} · {_unit_label(metric, label)}")
        handles = []
        if "regressed" in seen:
            handles.append(Patch(fill=False, edgecolor=REGRESSED_COLOUR, linewidth=2.5, label="regressed"))
        if "improved" in seen:
            handles.append(Patch(fill=False, edgecolor=IMPROVED_COLOUR, linewidth=1.8, label="improved"))
        if "outcome" in seen:
            handles.append(Patch(facecolor=OUTCOME_FACE, hatch="///", edgecolor="#9a9a9a",
                                 label="did not fit or died: OOM, OOM* (over the budget), OOM (forecast), "
                                       "KILLED, CRASH"))
        if handles:
            canvas.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7,
                          frameon=False)
        _fit(canvas, placed)
        canvases.append(canvas)
    return canvases


def _point(row: AxisValue, column: AxisValue, rows: GridAxis, columns: GridAxis | None,
           fixed: tuple[ValueKey, ...]) -> tuple[ValueKey, ...]:
    """The index key of a heatmap cell (a test without axes has one cell, keyed by nothing)."""
    point = [] if not rows.name else [value_key(row)]
    if columns is not None:
        point.append(value_key(column))
    return (*point, *fixed)


# --------------------------------------------------------------------------- latency against batch


def _numeric_axis(cells: Sequence[CellResult]) -> str | None:
    """The first declared axis whose values are all numbers, at least two of them."""
    for name, values in cells[0].axes:
        if len(values) > 1 and all(_number(v) is not None for v in values):
            return name
    return None


def _latency(title: str, cells: Sequence[CellResult]) -> Canvas | None:
    """Latency per call of ``run`` cells against the first numeric axis, a line per combination of
    the other axes; None when no line has two points."""
    runs = [c for c in cells if c.verdict.measurement.kind == "run"]
    if not runs:
        return None
    axis = _numeric_axis(runs)
    if axis is None:
        return None
    lines: dict[tuple[tuple[str, Scalar], ...], list[tuple[float, float]]] = {}
    left_out = 0
    for c in runs:
        m = c.verdict.measurement
        params = dict(m.params)
        x = _number(params.get(axis))
        found = c.verdict.metric("step_time")
        rest = tuple((k, v) for k, v in m.params if k != axis)
        lines.setdefault(rest, [])
        if m.outcome is not Outcome.MEASURED or found is None:
            left_out += 1
            continue
        if x is not None and math.isfinite(found.current):
            lines[rest].append((x, found.current))
    if not any(len(points) > 1 for points in lines.values()):
        return None
    label, factor = common_scale([y for points in lines.values() for _, y in points], "s")
    canvas, (ax,) = _canvas()
    xs = sorted({x for points in lines.values() for x, _ in points})
    for n, (rest, points) in enumerate(lines.items()):
        if not points:
            continue
        points.sort()
        ax.plot([x for x, _ in points], [y / factor for _, y in points], marker="o", markersize=4,
                linewidth=1.5, label=_params_label(rest) or "latency", color=_colour(n))
    if _log_span(xs):
        _log_axis(ax, "x", xs)
    if len(xs) <= 12:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(axis, fontsize=9)
    ax.set_ylabel(f"latency per call ({label})", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if any(rest for rest in lines):
        ax.legend(fontsize=7, ncols=2 if len(lines) > 6 else 1)
    _title(canvas, f"{title} · step_time (latency) against {axis}")
    _footnote(canvas, [f"left out: {left_out} cell{'s' * (left_out != 1)} that ran out of memory or died"]
              if left_out else [])
    return canvas


def _samples(title: str, cells: Sequence[CellResult]) -> list[Canvas]:
    """The step-time samples of each measured cell as a violin with its median, the baseline's value
    as a red tick; :data:`VIOLINS_PER_FIGURE` cells per figure. Empty when no cell has two samples."""
    sampled = []
    for c in cells:
        metric = c.verdict.measurement.metric("step_time")
        if c.verdict.measurement.outcome is Outcome.MEASURED and metric is not None and len(metric.samples) > 1:
            sampled.append((c, [s for s in metric.samples if math.isfinite(s)]))
    sampled = [(c, samples) for c, samples in sampled if len(samples) > 1]
    if not sampled:
        return []
    canvases = []
    pages = [sampled[i:i + VIOLINS_PER_FIGURE] for i in range(0, len(sampled), VIOLINS_PER_FIGURE)]
    for number, page in enumerate(pages, start=1):
        baselines = [found.baseline if (found := c.verdict.metric("step_time")) is not None else None for c, _ in page]
        label, factor = common_scale([s for _, samples in page for s in samples], "s")
        canvas, (ax,) = _canvas()
        positions = list(range(1, len(page) + 1))
        parts = ax.violinplot([[s / factor for s in samples] for _, samples in page], positions=positions,
                              showmedians=True, showextrema=True, widths=0.8)
        bodies: Sequence[Any] = parts["bodies"]  # type: ignore[assignment]  # a list of PolyCollections
        for body in bodies:
            body.set_facecolor(_colour(0))
            body.set_alpha(0.45)
        labelled = False
        for x, base in zip(positions, baselines, strict=True):
            if base is not None and math.isfinite(base):
                ax.hlines(base / factor, x - 0.4, x + 0.4, colors=REGRESSED_COLOUR, linewidth=1.5,
                          label="_nolegend_" if labelled else "baseline")
                labelled = True
        names = [c.cell if c.cell else MISSING for c, _ in page]
        crowded = len(page) > 6 or max(len(n) for n in names) > 14
        ax.set_xticks(positions, names, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                      fontsize=7 if crowded else 8)
        ax.set_ylabel(f"step_time per sample ({label})", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        if any(b is not None for b in baselines):
            ax.legend(fontsize=7)
        suffix = f" ({number} of {len(pages)})" if len(pages) > 1 else ""
        _title(canvas, f"{title} · step_time samples per cell{suffix}")
        _footnote(canvas, [f"{sum(len(samples) for _, samples in page)} samples; the line in each violin is "
                           "its median"])
        canvases.append(canvas)
    return canvases


def _colour(n: int) -> str:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#d62728")
    return palette[n % len(palette)]


# --------------------------------------------------------------------------- items processed, by loss


def _items(title: str, cells: Sequence[CellResult]) -> Canvas | None:
    """Items processed (``(step + 1) * items_per_step``) against step, coloured by the loss, a line
    per ``train`` cell with a loss curve and ``items_per_step``; None when no cell has both."""
    curves: list[tuple[Measurement, list[tuple[int, float]]]] = []
    for c in cells:
        m = c.verdict.measurement
        if m.kind != "train" or m.items_per_step is None or not m.loss_curve:
            continue
        points = [(step, loss) for step, loss in enumerate(m.loss_curve, start=1) if math.isfinite(loss)]
        if points:
            curves.append((m, points))
    if not curves:
        return None
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    losses = [loss for _, points in curves for _, loss in points]
    low, high = min(losses), max(losses)
    norm = Normalize(low, high if high > low else low + 1.0)
    canvas, (ax,) = _canvas()
    varying = _varying([m.params for m, _ in curves])
    steps = [s for _, points in curves for s, _ in points]
    items = [s * (m.items_per_step or 0.0) for m, points in curves for s, _ in points]
    log = _log_span([float(s) for s in steps]) and all(v > 0 for v in items)
    collection = None
    ends: dict[tuple[float, float], list[str]] = {}
    for m, points in curves:
        per = m.items_per_step or 0.0
        xy = [(float(s), s * per) for s, _ in points]
        if len(xy) > 1:
            collection = LineCollection([[a, b] for a, b in itertools.pairwise(xy)], cmap="viridis", norm=norm,
                                        linewidths=2.5)
            collection.set_array([(a + b) / 2 for (_, a), (_, b) in itertools.pairwise(points)])
            ax.add_collection(collection)
        dots = ax.scatter([x for x, _ in xy], [y for _, y in xy], c=[loss for _, loss in points], cmap="viridis",
                          norm=norm, s=10 if len(xy) <= DOTS else 0, zorder=3)
        ends.setdefault(xy[-1], []).append(_params_label([(k, v) for k, v in m.params if k in varying]) or m.cell)
    if len(ends) <= CROWDED:  # more labels than that would overlap
        for end, labels in ends.items():
            text = "\n".join(labels) if len(labels) <= 3 else f"{labels[0]} and {len(labels) - 1} more"
            ax.annotate(text, end, xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    shared = sum(len(labels) for labels in ends.values() if len(labels) > 1)
    _footnote(canvas, [f"{shared} curves coincide (equal items per step): the one drawn last shows its loss"]
              if shared else [])
    if log:
        _log_axis(ax, "x", [float(x) for x in steps])
        _log_axis(ax, "y", items)
    ax.autoscale_view()
    ax.margins(x=0.12, y=0.05)
    bar = canvas.colorbar(collection if collection is not None else dots, ax=ax)
    bar.set_label("loss", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    ax.set_xlabel("step (every step: FLOP count, memory, warm-up, timed)", fontsize=9)
    ax.set_ylabel("items processed", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    _title(canvas, f"{title} · items processed against step, coloured by loss")
    return canvas


def _varying(params: Sequence[Sequence[tuple[str, Scalar]]]) -> set[str]:
    """The axis names whose values differ between the cells."""
    values: dict[str, set[ValueKey]] = {}
    for p in params:
        for k, v in p:
            values.setdefault(k, set()).add(value_key(v))
    return {k for k, seen in values.items() if len(seen) > 1}


# --------------------------------------------------------------------------- relative figures


def _ordered(values: Iterable[Scalar], declared: Sequence[Scalar]) -> list[Scalar]:
    """Distinct values in declared order, then the others in order of appearance."""
    out: list[Scalar] = []
    keys: set[ValueKey] = set()
    for v in [*declared, *values]:
        if value_key(v) not in keys:
            keys.add(value_key(v))
            out.append(v)
    present = {value_key(v) for v in values}
    return [v for v in out if value_key(v) in present]


def _rest(verdict: FigureVerdict) -> tuple[tuple[str, Scalar], ...]:
    return tuple((k, v) for k, v in verdict.figure.params if k != verdict.figure.axis)


def _rest_order(figures: Sequence[FigureVerdict]) -> list[tuple[tuple[str, Scalar], ...]]:
    """The distinct cells of the other axes, in the order of the declared axis values."""
    declared = dict(figures[0].axes)
    rests = list(dict.fromkeys(_rest(f) for f in figures))

    def rank(rest: tuple[tuple[str, Scalar], ...]) -> tuple[int, ...]:
        out = []
        for k, v in rest:
            values = [value_key(x) for x in declared.get(k, ())]
            out.append(values.index(value_key(v)) if value_key(v) in values else len(values))
        return tuple(out)

    return sorted(rests, key=rank)


def _reference_flops(figures: Sequence[FigureVerdict], cells: Sequence[CellResult],
                     rests: Sequence[tuple[tuple[str, Scalar], ...]]) -> dict[tuple[tuple[str, Scalar], ...], float]:
    """The FLOPs of the reference cell at each cell of the other axes, when every one counted them."""
    axis, reference = figures[0].figure.axis, figures[0].figure.reference
    flops: dict[tuple[tuple[str, Scalar], ...], float] = {}
    for c in cells:
        m = c.verdict.measurement
        params = dict(m.params)
        found = m.metric("flops")
        if axis in params and str(params[axis]) == reference and found is not None and found.value > 0:
            flops[tuple((k, v) for k, v in m.params if k != axis)] = found.value
    return flops if all(r in flops for r in rests) else {}


def _relative_bars(test_file: str, test: str, metric: str, figures: Sequence[FigureVerdict],
                   cells: Sequence[CellResult]) -> Canvas:
    """Bars of each variant's value relative to the reference, in %, per cell of the other axes."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    first = figures[0].figure
    axis, reference = first.axis, first.reference
    declared = dict(figures[0].axes)
    variants = _ordered([dict(f.figure.params)[axis] for f in figures], declared.get(axis, ()))
    rests = _rest_order(figures)
    flops = _reference_flops(figures, cells, rests)
    if flops:
        rests = sorted(rests, key=lambda r: flops[r])
    position = {r: i for i, r in enumerate(rests)}
    width = 0.8 / max(len(variants), 1)
    canvas, (ax,) = _canvas()
    by_variant = {value_key(v): n for n, v in enumerate(variants)}
    many = len(figures) > CROWDED
    regressed = baseline_shown = False
    for f in figures:
        n = by_variant[value_key(dict(f.figure.params)[axis])]
        x = position[_rest(f)] - 0.4 + width * (n + 0.5)
        value = 100 * f.figure.value
        error = None
        if f.figure.interval is not None:
            low, high = f.figure.interval
            error = [[max(value - 100 * low, 0.0)], [max(100 * high - value, 0.0)]]
        bad = f.status is Status.REGRESSED
        regressed |= bad
        ax.bar(x, value, width * 0.92, color=_colour(n), edgecolor=REGRESSED_COLOUR if bad else "none",
               linewidth=2.0 if bad else 0, hatch="xx" if bad else None, yerr=error, ecolor="#333333",
               capsize=2, zorder=2)
        if f.baseline is not None:
            baseline_shown = True
            ax.plot([x - width * 0.46, x + width * 0.46], [100 * f.baseline.value] * 2, color="black",
                    linewidth=2, zorder=3)
        if not many:
            text = f.figure.shown() + (" REGR" if bad else "")
            end = value if error is None else value + error[1][0] if value >= 0 else value - error[0][0]
            ax.annotate(text, (x, end), xytext=(0, 3 if value >= 0 else -3), textcoords="offset points",
                        ha="center", va="bottom" if value >= 0 else "top", fontsize=7, in_layout=False,
                        color=REGRESSED_COLOUR if bad else "#222222", fontweight="bold" if bad else "normal")
    ax.axhline(0, linestyle="--", color="#1f77b4", linewidth=1, zorder=1)
    crowded = len(rests) > CROWDED
    labels = []
    for r in rests:
        if crowded:  # values only, rotated: the axis label names the axes
            text = "/".join(str(v) for _, v in r) or "default"
            labels.append(f"{format_value(flops[r], 'FLOP')} {text}" if flops else text)
        else:
            text = "\n".join(f"{k}={v}" for k, v in r) or "default"
            labels.append(f"{format_value(flops[r], 'FLOP')}\n{text}" if flops else text)
    ax.set_xticks(range(len(rests)), labels, rotation=90 if crowded else 0, fontsize=7 if crowded else 8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(-0.6, len(rests) - 0.4)
    ax.use_sticky_edges = False  # room above and below the bars for their labels
    ax.margins(x=0, y=0.12)
    rest_names = [k for k, _ in rests[0]] if rests else []
    joined = ("/" if crowded else " · ").join(rest_names)
    ax.set_xlabel(f"FLOPs of the reference cell, then {joined}" if flops and rest_names
                  else "FLOPs of the reference cell" if flops else joined or "cell", fontsize=9)
    ax.set_ylabel(f"{metric} relative to {axis}={reference} (%)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    handles: list[Any] = [Patch(color=_colour(n), label=f"{axis}={v}") for n, v in enumerate(variants)]
    if baseline_shown:
        handles.append(Line2D([], [], color="black", linewidth=2, label="baseline"))
    if regressed:
        handles.append(Patch(facecolor="white", edgecolor=REGRESSED_COLOUR, hatch="xx", linewidth=2.0,
                             label="regressed"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _title(canvas, f"{test_file}::{test} · {metric} of each {axis} relative to {axis}={reference}")
    return canvas


def _relative_text(verdict: FigureVerdict) -> tuple[str, ...]:
    """A relative heatmap cell: the value now, then the baseline's with the status marker."""
    lines = [verdict.figure.shown()]
    if verdict.baseline is not None:
        marker = MARKERS[verdict.status]
        lines.append(f"was {verdict.baseline.shown()}" + (f" {marker}" if marker else ""))
    return tuple(lines)


def _relative_heatmaps(test_file: str, test: str, metric: str,
                       figures: Sequence[FigureVerdict]) -> list[tuple[str, Canvas]]:
    """With exactly two axes besides the variant axis: a heatmap of the relative value per variant."""
    from matplotlib import colormaps
    from matplotlib.colors import CenteredNorm
    from matplotlib.patches import Patch, Rectangle

    first = figures[0].figure
    axis = first.axis
    rests = _rest_order(figures)
    names = {tuple(k for k, _ in r) for r in rests}
    if len(names) != 1 or len(next(iter(names))) != 2:
        return []
    row_name, column_name = next(iter(names))
    declared = dict(figures[0].axes)
    row_values = _ordered([r[0][1] for r in rests], declared.get(row_name, ()))
    column_values = _ordered([r[1][1] for r in rests], declared.get(column_name, ()))
    variants = _ordered([dict(f.figure.params)[axis] for f in figures], declared.get(axis, ()))
    values = [100 * f.figure.value for f in figures if math.isfinite(f.figure.value)]
    norm = CenteredNorm(0.0, max((abs(v) for v in values), default=1.0) or 1.0)
    cmap = colormaps["coolwarm"].with_extremes(bad="white")
    rows = {value_key(v): i for i, v in enumerate(row_values)}
    columns = {value_key(v): j for j, v in enumerate(column_values)}
    out = []
    for variant in variants:
        mine = [f for f in figures if value_key(dict(f.figure.params)[axis]) == value_key(variant)]
        data = [[math.nan] * len(column_values) for _ in row_values]
        texts: dict[tuple[int, int], FigureVerdict] = {}
        for f in mine:
            (_, r), (_, c) = _rest(f)
            i, j = rows[value_key(r)], columns[value_key(c)]
            data[i][j] = 100 * f.figure.value
            texts[(i, j)] = f
        canvas, (ax,) = _canvas()
        image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        regressed = False
        placed: list[tuple[Axes, Text, bool]] = []
        cell_texts = {at: _relative_text(f) for at, f in texts.items()}
        lines = max((len(t) for t in cell_texts.values()), default=1)
        chars = max((len(line) for t in cell_texts.values() for line in t), default=6)
        size = _font(len(row_values), len(column_values), (1, 1), lines, chars)
        for i, j in itertools.product(range(len(row_values)), range(len(column_values))):
            shown = texts.get((i, j))
            if shown is None:
                ax.text(j, i, MISSING, ha="center", va="center", fontsize=size, color="#777777", in_layout=False)
                continue
            bad = shown.status is Status.REGRESSED
            regressed |= bad
            colour = _contrast(cmap(norm(data[i][j]))) if math.isfinite(data[i][j]) else "black"
            placed.append((ax, ax.text(j, i, "\n".join(cell_texts[(i, j)]), ha="center", va="center", in_layout=False,
                                       fontsize=size, color=colour, fontweight="bold" if bad else "normal"),
                           shown.status in (Status.UNCHANGED, Status.NEW)))
            if bad:
                ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="black",
                                       linewidth=2.5))
        ax.set_xticks(range(len(column_values)), [_text(v) for v in column_values])
        ax.set_yticks(range(len(row_values)), [_text(v) for v in row_values])
        ax.tick_params(length=0, labelsize=8)
        ax.set_xlabel(column_name, fontsize=9)
        ax.set_ylabel(row_name, fontsize=9)
        bar = canvas.colorbar(image, ax=ax)
        bar.set_label(f"{metric} relative to {axis}={first.reference} (%)", fontsize=9)
        bar.ax.tick_params(labelsize=8)
        _title(canvas, f"{test_file}::{test} · {metric} of {axis}={variant} relative to {axis}={first.reference}")
        if regressed:
            canvas.legend(handles=[Patch(fill=False, edgecolor="black", linewidth=2.5,
                                         label="regressed: the ratio moved beyond its tolerance")],
                          loc="outside lower center", fontsize=7, frameon=False)
        _fit(canvas, placed)
        out.append((str(variant), canvas))
    return out


# --------------------------------------------------------------------------- scaling fits


def _scaling(title: str, figures: Sequence[FigureVerdict]) -> Canvas:
    """Log-log points and fitted ``a * x^b`` per cell of the other axes, one panel per metric."""
    metrics = list(dict.fromkeys(f.figure.metric for f in figures))
    shape = (1, len(metrics)) if len(metrics) <= 3 else (math.ceil(len(metrics) / 3), 3)
    canvas, axes = _canvas(*shape)
    for ax, metric in zip(axes, metrics, strict=False):
        mine = [f for f in figures if f.figure.metric == metric]
        unit = mine[0].figure.unit
        ys = [y for f in mine for _, y in f.figure.points]
        label, factor = common_scale(ys, unit)
        xs = sorted({x for f in mine for x, _ in f.figure.points})
        for n, f in enumerate(mine):
            fig = f.figure
            colour = _colour(n)
            where = "" if fig.cell == "default" else f"{fig.cell}: "
            ax.scatter([x for x, _ in fig.points], [y / factor for _, y in fig.points], color=colour, s=18,
                       zorder=3)
            grid = _geomspace(min(x for x, _ in fig.points), max(x for x, _ in fig.points))
            text = f"{where}$x^{{{fig.value:.2f}}}$"
            if fig.interval is not None:
                text += f" [{fig.interval[0]:.2f}, {fig.interval[1]:.2f}]"
            bad = f.status is Status.REGRESSED
            if bad:
                text += f" REGR (+{f.change or 0.0:.2f})"
            if fig.coefficient is not None:
                ax.plot(grid, [fig.coefficient * x ** fig.value / factor for x in grid], color=colour,
                        linewidth=2.5 if bad else 1.5, label=text)
            base = f.baseline
            if base is not None and base.coefficient is not None:
                ax.plot(grid, [base.coefficient * x ** base.value / factor for x in grid], color=colour,
                        linestyle="--", linewidth=1, label=f"{where}baseline $x^{{{base.value:.2f}}}$")
        _log_axis(ax, "y", [y / factor for y in ys])
        _log_axis(ax, "x", xs)
        if 1 < len(xs) <= 10:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(mine[0].figure.reference, fontsize=9)
        ax.set_ylabel(_unit_label(metric, label), fontsize=9)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, title="exponent [95% interval]", title_fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.14), frameon=False)  # under the axes: the lines stay visible
    for ax in axes[len(metrics):]:
        ax.set_axis_off()
    _title(canvas, f"{title} · scaling fits a · x^b")
    return canvas


def _geomspace(low: float, high: float, n: int = 50) -> list[float]:
    if not (low > 0 and high > low):
        return [low, high]
    ratio = (high / low) ** (1 / (n - 1))
    return [low * ratio**i for i in range(n)]

