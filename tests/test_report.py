"""The rich report renderers, fed hand-built verdicts and snapshot-tested at 80 columns."""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from pytest_trainperf.records import (
    BaselineChange,
    CellVerdict,
    Measurement,
    Metric,
    MetricVerdict,
    Scalar,
    Status,
)
from pytest_trainperf.report.heatmap import render_heatmaps, render_updates
from pytest_trainperf.units import common_scale, in_scale

WIDTH = 80
MIB = 2**20
SGR = re.compile(r"\x1b\[[0-9;]*m")


def console(*, colour: bool = False, width: int = WIDTH) -> Console:
    if colour:
        return Console(file=io.StringIO(), width=width, color_system="standard", force_terminal=True)
    return Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)


def output(con: Console) -> str:
    """What was printed, without the trailing spaces rich pads table lines with."""
    file = con.file
    assert isinstance(file, io.StringIO)
    return "".join(line.rstrip() + "\n" for line in file.getvalue().splitlines())


def snapshot(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def verdict(
    params: Sequence[tuple[str, Scalar]],
    current: float,
    status: Status,
    baseline: float | None = None,
    *,
    metric: str = "step_time",
    unit: str = "s",
    test: str = "test_encoder",
) -> CellVerdict:
    """A cell with one metric; the change is derived from ``baseline`` when there is one."""
    change = None if baseline is None else current / baseline - 1
    measurement = Measurement(
        test=test,
        cell="-".join(f"{k}={v}" for k, v in params) or "default",
        params=tuple(params),
        metrics=(Metric(metric, current, unit),),
    )
    mv = MetricVerdict(
        name=metric,
        status=status,
        current=current,
        baseline=baseline,
        tolerance=0.05,
        unit=unit,
        change=change,
    )
    return CellVerdict(measurement, (mv,))


AXES_2X2: list[tuple[str, Sequence[Scalar]]] = [("batch_size", [1, 2]), ("seq_len", [16, 32])]
CELLS_2X2 = [
    verdict([("batch_size", 1), ("seq_len", 16)], 0.123, Status.UNCHANGED, 0.123 / 1.032),
    verdict([("batch_size", 1), ("seq_len", 32)], 0.132, Status.REGRESSED, 0.1),
    verdict([("batch_size", 2), ("seq_len", 16)], 0.085, Status.IMPROVED, 0.1),
    verdict([("batch_size", 2), ("seq_len", 32)], 0.2, Status.NEW),
]


def render(
    axes: Sequence[tuple[str, Sequence[Scalar]]],
    cells: Sequence[CellVerdict],
    metrics: Sequence[str] = ("step_time",),
    *,
    test: str = "test_encoder",
    colour: bool = False,
) -> str:
    con = console(colour=colour)
    render_heatmaps(con, test=test, axes=axes, cells=cells, metrics=metrics)
    return output(con)


def test_2x2_grid_marks_each_status_in_words() -> None:
    assert render(AXES_2X2, CELLS_2X2) == snapshot(
        r"""
        test_encoder · step_time (ms)
        batch_size \ seq_len           16           32
        ──────────────────────────────────────────────
        1                             123          132
                                    +3.2%  +32.0% REGR

        2                            85.0          200
                              -15.0% impr          new

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_third_axis_gives_one_table_per_value() -> None:
    axes: list[tuple[str, Sequence[Scalar]]] = [*AXES_2X2, ("dtype", ["fp32", "fp16"])]
    cells = [
        verdict([("batch_size", b), ("seq_len", s), ("dtype", d)], t, Status.UNCHANGED, t / 1.01)
        for d, scale in (("fp32", 1.0), ("fp16", 0.5))
        for b in (1, 2)
        for s in (16, 32)
        for t in [0.001 * b * s * scale]
    ]
    assert render(axes, cells) == snapshot(
        r"""
        test_encoder · step_time (ms) · dtype=fp32
        batch_size \ seq_len     16     32
        ──────────────────────────────────
        1                      16.0   32.0
                              +1.0%  +1.0%

        2                      32.0   64.0
                              +1.0%  +1.0%

        test_encoder · step_time (ms) · dtype=fp16
        batch_size \ seq_len     16     32
        ──────────────────────────────────
        1                      8.00   16.0
                              +1.0%  +1.0%

        2                      16.0   32.0
                              +1.0%  +1.0%

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_extra_params_become_further_axes() -> None:
    cells = [
        verdict([("batch_size", 1), ("seq_len", 16), ("opt", "adam")], 0.01, Status.NEW),
        verdict([("batch_size", 1), ("seq_len", 16), ("opt", "sgd")], 0.02, Status.NEW),
    ]
    assert render(AXES_2X2, cells) == snapshot(
        r"""
        test_encoder · step_time (ms) · opt=adam
        batch_size \ seq_len    16  32
        ──────────────────────────────
        1                     10.0   —
                               new

        2                        —   —

        test_encoder · step_time (ms) · opt=sgd
        batch_size \ seq_len    16  32
        ──────────────────────────────
        1                     20.0   —
                               new

        2                        —   —

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_single_cell_test() -> None:
    cells = [verdict([], 0.5, Status.UNCHANGED, 0.49, test="test_single")]
    assert render([], cells, test="test_single") == snapshot(
        r"""
        test_single · step_time (ms)
        value
        ─────
          500
        +2.0%

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_single_axis_runs_down_the_rows() -> None:
    cells = [
        verdict([("batch_size", 1)], 12.5 * MIB, Status.IMPROVED, 16 * MIB, metric="peak_memory", unit="B"),
        verdict([("batch_size", 4)], 40 * MIB, Status.UNCHANGED, 40 * MIB, metric="peak_memory", unit="B"),
    ]
    assert render([("batch_size", [1, 2, 4])], cells, ["peak_memory"]) == snapshot(
        r"""
        test_encoder · peak_memory (MiB)
        batch_size        value
        ───────────────────────
        1                  12.5
                    -21.9% impr

        2                     —

        4                  40.0
                          +0.0%

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_missing_cell_and_missing_metric() -> None:
    cells = [CELLS_2X2[0], CELLS_2X2[1], CELLS_2X2[2]]  # (2, 32) did not run
    text = render(AXES_2X2, cells, ["step_time", "peak_memory"])
    assert text == snapshot(
        r"""
        test_encoder · step_time (ms)
        batch_size \ seq_len           16           32
        ──────────────────────────────────────────────
        1                             123          132
                                    +3.2%  +32.0% REGR

        2                            85.0            —
                              -15.0% impr

        test_encoder · peak_memory
        batch_size \ seq_len   16   32
        ──────────────────────────────
        1                     n/a  n/a

        2                     n/a    —

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_no_metrics_prints_nothing() -> None:
    assert render(AXES_2X2, CELLS_2X2, []) == ""


BATCHES = [1, 2, 4, 8, 16, 32]
WINDOWS = [16, 32, 64, 128, 256, 512]
AXES_6X6: list[tuple[str, Sequence[Scalar]]] = [("batch_size", BATCHES), ("window", WINDOWS)]


def test_6x6_grid_fits_80_columns() -> None:
    statuses = [Status.UNCHANGED, Status.REGRESSED, Status.IMPROVED, Status.NEW]
    cells = [
        verdict([("batch_size", b), ("window", w)], t, status, None if status is Status.NEW else base)
        for i, (b, w) in enumerate((b, w) for b in BATCHES for w in WINDOWS)
        for status in [statuses[i % 4]]
        for t in [0.1 + 0.001 * i]
        for base in [{Status.REGRESSED: t / 1.32, Status.IMPROVED: t / 0.85}.get(status, t / 1.01)]
    ]
    text = render(AXES_6X6, cells)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert text == snapshot(
        r"""
        test_encoder · step_time (ms)
        batch_size \
        window            16      32      64     128     256     512
        ────────────────────────────────────────────────────────────
        1                100     101     102     103     104     105
                       +1.0%  +32.0%  -15.0%     new   +1.0%  +32.0%
                                REGR    impr                    REGR

        2                106     107     108     109     110     111
                      -15.0%     new   +1.0%  +32.0%  -15.0%     new
                        impr                    REGR    impr

        4                112     113     114     115     116     117
                       +1.0%  +32.0%  -15.0%     new   +1.0%  +32.0%
                                REGR    impr                    REGR

        8                118     119     120     121     122     123
                      -15.0%     new   +1.0%  +32.0%  -15.0%     new
                        impr                    REGR    impr

        16               124     125     126     127     128     129
                       +1.0%  +32.0%  -15.0%     new   +1.0%  +32.0%
                                REGR    impr                    REGR

        32               130     131     132     133     134     135
                      -15.0%     new   +1.0%  +32.0%  -15.0%     new
                        impr                    REGR    impr

        REGR regressed, impr improved, new no baseline, — no result, n/a not measured
        """
    )


def test_6x6_grid_of_unchanged_cells_keeps_the_change_on_one_line() -> None:
    cells = [
        verdict([("batch_size", b), ("window", w)], 0.123, Status.UNCHANGED, 0.12)
        for b in BATCHES
        for w in WINDOWS
    ]
    text = render(AXES_6X6, cells)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert text.count("+2.5%") == 36
    assert "batch_size \\ window" in text


def grid_6x6(
    statuses: list[Status], values: list[float], changes: list[float], unit: str
) -> list[CellVerdict]:
    points = [(b, w) for b in BATCHES for w in WINDOWS]
    return [
        verdict(
            [("batch_size", b), ("window", w)],
            value,
            status,
            None if status is Status.NEW else value / (1 + change),
            unit=unit,
        )
        for (b, w), status, value, change in zip(points, statuses, values, changes, strict=True)
    ]


grids_6x6 = dict(
    statuses=st.lists(st.sampled_from(list(Status)), min_size=36, max_size=36),
    values=st.lists(st.floats(1e-9, 1e4), min_size=36, max_size=36),
    changes=st.lists(st.floats(-0.99, 20.0), min_size=36, max_size=36),
)


@settings(max_examples=50, deadline=None)
@given(**grids_6x6, unit=st.sampled_from(["s", "B"]))
def test_any_6x6_grid_of_times_or_bytes_fits_without_breaking_a_value(
    statuses: list[Status], values: list[float], changes: list[float], unit: str
) -> None:
    cells = grid_6x6(statuses, values, changes, unit)
    lines = render(AXES_6X6, cells).splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    label, factor = common_scale([c.metrics[0].current for c in cells], unit)
    assert lines[0].endswith(f"({label})")
    for cell in cells:
        value = in_scale(cell.metrics[0].current, factor)
        assert any(value in line.split() for line in lines), value


@settings(max_examples=25, deadline=None)
@given(**grids_6x6, unit=st.sampled_from(["FLOP", "items/s", ""]))
def test_any_6x6_grid_fits_80_columns(
    statuses: list[Status], values: list[float], changes: list[float], unit: str
) -> None:
    """Wider values (``12.3 GFLOP``) may wrap inside their cell, but never past the console."""
    text = render(AXES_6X6, grid_6x6(statuses, values, changes, unit))
    assert max(len(line) for line in text.splitlines()) <= WIDTH


def test_colour_only_adds_styles() -> None:
    plain = render(AXES_2X2, CELLS_2X2)
    coloured = render(AXES_2X2, CELLS_2X2, colour=True)
    assert "\x1b" not in plain
    assert "".join(line.rstrip() + "\n" for line in SGR.sub("", coloured).splitlines()) == plain
    bold_red, green, cyan = r"\x1b\[1;31m", r"\x1b\[32m", r"\x1b\[36m"
    assert re.search(bold_red + r" *132\b", coloured)
    assert re.search(bold_red + r" *\+32\.0% REGR", coloured)
    assert re.search(green + r" *-15\.0% impr", coloured)
    assert re.search(cyan + r" *200\b", coloured)
    assert re.search(r"\x1b\[[0-9;]*m *123\b", coloured) is None  # unchanged: default style


def test_ascii_console_gets_ascii_glyphs() -> None:
    file = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    con = Console(file=file, width=WIDTH, color_system=None, force_terminal=False)
    render_heatmaps(con, test="test_encoder", axes=AXES_2X2, cells=CELLS_2X2[:3], metrics=["step_time"])
    file.flush()
    text = file.buffer.getvalue().decode("ascii")
    assert "test_encoder | step_time" in text
    assert "- no result" in text


MODELS = "baselines/test_models.json"
CHANGES = [
    BaselineChange(MODELS, "test_encoder", "batch_size=4-seq_len=16", "step_time", 0.123, 0.098, "s"),
    BaselineChange(MODELS, "test_encoder", "batch_size=1-seq_len=16", "peak_memory", None, 12.5 * MIB, "B"),
    BaselineChange("baselines/test_lm.json", "TestLM::test_step", "default", "loss", 2.31, 2.3),
    BaselineChange(MODELS, "test_encoder", "batch_size=1-seq_len=16", "step_time", 0.1, 0.15, "s"),
]


def test_updates_sorted_and_grouped_by_file() -> None:
    con = console()
    render_updates(con, CHANGES)
    assert output(con) == snapshot(
        r"""
        baselines updated: 4 values in 2 files

        baselines/test_lm.json
          TestLM::test_step[default]
            loss  2.31 -> 2.3  -0.4%

        baselines/test_models.json
          test_encoder[batch_size=1-seq_len=16]
            peak_memory       — -> 12.5 MiB     new
            step_time    100 ms ->   150 ms  +50.0%
          test_encoder[batch_size=4-seq_len=16]
            step_time    123 ms ->  98.0 ms  -20.3%
        """
    )


def test_no_updates_prints_nothing() -> None:
    con = console()
    render_updates(con, [])
    assert output(con) == ""


def test_heatmap_module_imports_neither_pytest_nor_torch() -> None:
    import ast
    from pathlib import Path

    import pytest_trainperf.report.heatmap as heatmap

    tree = ast.parse(Path(heatmap.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in imported} & {"pytest", "_pytest", "torch"}


def test_out_of_memory_cells_show_their_outcome_in_every_table() -> None:
    from dataclasses import replace

    from pytest_trainperf.records import Outcome

    fits = verdict([("batch_size", 1), ("seq_len", 16)], 0.01, Status.UNCHANGED, 0.01)
    expected = verdict([("batch_size", 1), ("seq_len", 32)], 0.02, Status.UNCHANGED)
    expected = replace(expected, measurement=replace(expected.measurement, outcome=Outcome.OOM), metrics=(),
                       outcome=Status.UNCHANGED, baseline_outcome=Outcome.OOM)
    new_oom = verdict([("batch_size", 2), ("seq_len", 16)], 0.02, Status.NEW)
    new_oom = replace(new_oom, measurement=replace(new_oom.measurement, outcome=Outcome.OOM_EMULATED),
                      metrics=(), outcome=Status.REGRESSED, baseline_outcome=Outcome.MEASURED)
    gone = verdict([("batch_size", 2), ("seq_len", 32)], 0.03, Status.UNCHANGED)
    gone = replace(gone, outcome=Status.IMPROVED, baseline_outcome=Outcome.OOM)

    text = render(AXES_2X2, [fits, expected, new_oom, gone], metrics=("step_time", "peak_memory"))

    assert text.count("OOM*") == 2 * 1 + 1  # both tables, and the legend
    assert "OOM* REGR" in text
    assert "was OOM" in text and "impr" in text
    assert "OOM out of memory, OOM* over the memory budget (emulated)" in text
