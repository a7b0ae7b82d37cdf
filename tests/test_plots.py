"""``--trainperf-plots``: the PNG figures, drawn from synthetic session results built of real records,
and the option through pytester."""

from __future__ import annotations

import math
import random
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_trainperf import derived, results
from pytest_trainperf.records import (
    Direction,
    Figure,
    FigureKind,
    FigureVerdict,
    Fingerprint,
    Measurement,
    Metric,
    Outcome,
    RelativeSpec,
    Scalar,
    ScalingSpec,
)
from pytest_trainperf.report.plots import DPI, FIGSIZE, HEATMAP_METRICS, file_stem, write_plots
from pytest_trainperf.settings import parse_plots
from pytest_trainperf.stats import judge

pytest.importorskip("matplotlib")

CPU = Fingerprint(device="Test CPU", device_type="cpu", torch="2.13.0", cuda=None, threads=1, cpu="Test CPU")
SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
"""Every PNG's width and height in pixels."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Params = tuple[tuple[str, Scalar], ...]
Axes = tuple[tuple[str, tuple[Scalar, ...]], ...]


# ------------------------------------------------------------------ building synthetic sessions


def cell_id(params: Params) -> str:
    return "-".join(f"{k}={v}" for k, v in params) or "default"


def samples(median: float, seed: int) -> tuple[float, ...]:
    """Six step times around ``median`` (a 2% spread), the same for the same seed."""
    rng = random.Random(seed)
    return tuple(sorted(median * (1 + rng.uniform(-0.02, 0.02)) for _ in range(6)))


def timed(step_time: float, seed: int, *, items: float | None = None, memory: float | None = None,
          flops: float | None = None, utilization: float | None = None) -> tuple[Metric, ...]:
    """The metrics of a measured cell: step time, throughput, peak memory, FLOPs, CPU utilization."""
    steps = samples(step_time, seed)
    metrics = [Metric("step_time", sorted(steps)[3], "s", Direction.LOWER_IS_BETTER, steps)]
    if items is not None:
        rates = tuple(items / s for s in steps)
        metrics.append(Metric("throughput", sorted(rates)[3], "items/s", Direction.HIGHER_IS_BETTER, rates))
    if memory is not None:
        metrics.append(Metric("peak_memory", memory, "B"))
    if flops is not None:
        metrics.append(Metric("flops", flops, "FLOP"))
    if utilization is not None:
        metrics.append(Metric("cpu_utilization", utilization, "%", Direction.HIGHER_IS_BETTER, tolerance=math.inf))
    return tuple(metrics)


def cell(test: str, params: Params, metrics: tuple[Metric, ...], **kwargs: object) -> Measurement:
    return Measurement(test=test, cell=cell_id(params), params=params, metrics=metrics, steps=6, warmup=1,
                       **kwargs)  # type: ignore[arg-type]


def record(test_file: str, axes: Axes, now: Measurement, before: Measurement | None) -> results.CellResult:
    return results.CellResult(nodeid=f"{test_file}::{now.test}[{now.cell}]", test_file=test_file, test=now.test,
                              cell=now.cell, axes=axes, verdict=judge(now, before), fingerprint=CPU)


def grid(axes: Axes) -> list[Params]:
    out: list[Params] = [()]
    for name, values in axes:
        out = [(*p, (name, v)) for p in out for v in values]
    return out


def inference_grid() -> list[results.CellResult]:
    """A ``run`` grid of three variants (seed 003): batch size x sequence length, out of memory at the
    largest cells, one regression and one improvement against the baseline."""
    axes: Axes = (("batch_size", (1, 2, 4, 8, 16, 32, 64, 128)), ("seq_len", (128, 512)),
                  ("variant", ("original", "width", "depth")))
    cost = {"original": 1.0, "width": 1.3, "depth": 0.7}
    out = []
    for n, params in enumerate(grid(axes)):
        p = dict(params)
        b, s, v = int(p["batch_size"]), int(p["seq_len"]), str(p["variant"])
        latency = 2e-3 * cost[v] * (1 + b * s / 2048)
        items = float(b * s)
        baseline = cell("test_infer", params, timed(latency, n + 1000, items=items,
                                                    memory=2**20 * b * s * cost[v], utilization=50.0), kind="run")
        if b * s > 32768:
            now = cell("test_infer", params, (), kind="run", outcome=Outcome.OOM, detail="CUDA out of memory")
            baseline = replace(baseline, metrics=(), outcome=Outcome.OOM)
        elif b == 64 and s == 512:  # ran out of memory now, not before: the outcome regressed
            outcome = Outcome.OOM_EMULATED if v == "width" else Outcome.OOM_KILLED
            now = cell("test_infer", params, (), kind="run", outcome=outcome, detail="over the budget")
        else:
            scale = 1.35 if (b, s, v) == (8, 128, "width") else 0.75 if (b, s, v) == (2, 512, "depth") else 1.0
            now = cell("test_infer", params, timed(latency * scale, n, items=items,
                                                   memory=2**20 * b * s * cost[v], utilization=min(99.0, 40 + 8 * b)),
                       kind="run")
        out.append(record("tests/test_lm.py", axes, now, baseline))
    return out


def recompute_grid() -> tuple[list[results.CellResult], list[FigureVerdict]]:
    """A ``train`` grid of plain and checkpointed steps (seed 000): batch size x window, the
    checkpointed step's cost relative to the plain one, one cost that rose beyond tolerance."""
    axes: Axes = (("batch_size", (1, 2, 4, 8, 16, 32)), ("window", (16, 32, 64, 128, 256, 512)),
                  ("variant", ("plain", "checkpointed")))
    now_cells, before_cells, records = [], [], []
    for n, params in enumerate(grid(axes)):
        p = dict(params)
        b, w, v = int(p["batch_size"]), int(p["window"]), str(p["variant"])
        base = 1e-3 * b * (1 + w / 64)
        cost = min(0.03 * w / 16, 0.45) if v == "checkpointed" else 0.0
        moved = 1.3 if (b, w, v) == (8, 128, "checkpointed") else 1.0
        memory = 2**20 * b * w * (0.5 if v == "checkpointed" else 1.0)
        now = cell("test_recompute", params, timed(base * (1 + cost) * moved, n, memory=memory))
        before = cell("test_recompute", params, timed(base * (1 + cost), n + 5000, memory=memory))
        now_cells.append(now)
        before_cells.append(before)
        records.append(record("tests/test_train.py", axes, now, before))
    spec = RelativeSpec(axis="variant", reference="plain", metrics=("step_time",))
    figures = judged(spec, now_cells, before_cells, ("tests/test_train.py", "test_recompute", axes))
    return records, figures


def judged(spec: RelativeSpec | ScalingSpec, now: Sequence[Measurement], before: Sequence[Measurement],
           where: tuple[str, str, Axes]) -> list[FigureVerdict]:
    """The figures of ``spec`` now, judged against the baseline's."""
    derive: Callable[..., list[Figure]]
    if isinstance(spec, RelativeSpec):
        derive, kind = derived.relative_figures, FigureKind.RELATIVE
    else:
        derive, kind = derived.scaling_figures, FigureKind.SCALING
    def tolerance(figure: Figure) -> float:
        return derived.figure_tolerance(kind, figure.metric, spec.tolerance)

    return derived.judge_figures(derive(spec, now), derive(spec, before), tolerance, where)


def schedule_grid() -> tuple[list[results.CellResult], list[FigureVerdict]]:
    """Three model sizes (FLOPs counted) x three phases (seed 001): memory and time relative to no phase."""
    axes: Axes = (("model", ("s", "m", "l")), ("phase", ("none", "early", "late")))
    flops = {"s": 2e12, "m": 4e12, "l": 6e12}
    saving = {"none": 0.0, "early": -0.3, "late": -0.1}
    now_cells, before_cells, records = [], [], []
    for n, params in enumerate(grid(axes)):
        p = dict(params)
        f, s = flops[str(p["model"])], saving[str(p["phase"])]
        memory = 2**30 * f / 1e12 * (1 + s)
        now = cell("test_schedule", params, timed(0.05 * f / 1e12 * (1 + s / 2), n, memory=memory, flops=f))
        slower = 1.25 if p["phase"] == "late" and p["model"] == "l" else 1.0
        before = cell("test_schedule", params,
                      timed(0.05 * f / 1e12 * (1 + s / 2) / slower, n + 99, memory=memory * 1.02, flops=f))
        now_cells.append(now)
        before_cells.append(before)
        records.append(record("tests/test_schedule.py", axes, now, before))
    spec = RelativeSpec(axis="phase", reference="none", metrics=("peak_memory", "step_time"))
    return records, judged(spec, now_cells, before_cells, ("tests/test_schedule.py", "test_schedule", axes))


def attention_grid() -> tuple[list[results.CellResult], list[FigureVerdict]]:
    """Linear and quadratic attention along the sequence length (seed 002): the quadratic one's step
    time exponent rose from 1 to 2 against the baseline."""
    axes: Axes = (("seq_len", (128, 256, 512, 1024, 2048, 4096)), ("impl", ("linear", "quadratic")))
    now_cells, before_cells, records = [], [], []
    for n, params in enumerate(grid(axes)):
        p = dict(params)
        s, impl = int(p["seq_len"]), str(p["impl"])
        exponent = 2.0 if impl == "quadratic" else 1.0
        now = cell("test_attention", params, timed(1e-3 * (s / 128) ** exponent, n, memory=2**20 * s), kind="run")
        before = cell("test_attention", params, timed(1e-3 * (s / 128), n + 7, memory=2**20 * s), kind="run")
        now_cells.append(now)
        before_cells.append(before)
        records.append(record("tests/test_attention.py", axes, now, before))
    spec = ScalingSpec(x="seq_len", metrics=("step_time", "peak_memory"))
    return records, judged(spec, now_cells, before_cells, ("tests/test_attention.py", "test_attention", axes))


def batch_scan() -> list[results.CellResult]:
    """Training at five batch sizes with their loss curves and items per step (seed 004)."""
    axes: Axes = (("batch_size", (8, 16, 32, 64, 128)),)
    out = []
    for n, params in enumerate(grid(axes)):
        b = int(dict(params)["batch_size"])
        curve = tuple(2.5 + 7.5 * math.exp(-step * b / 400) for step in range(60))
        now = cell("test_scan", params, timed(1e-3 * b, n, items=b * 128.0), loss_curve=curve,
                   items_per_step=b * 128.0)
        out.append(record("tests/test_scan.py", axes, now, None))
    return out


def full_session() -> results.SessionResults:
    recompute, recompute_figures = recompute_grid()
    schedule, schedule_figures = schedule_grid()
    attention, attention_figures = attention_grid()
    return results.SessionResults(
        cells=tuple(inference_grid() + recompute + schedule + attention + batch_scan()),
        figures=tuple(recompute_figures + schedule_figures + attention_figures))


# ------------------------------------------------------------------ reading PNGs


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def names(paths: Sequence[Path]) -> list[str]:
    return [p.name for p in paths]


# ------------------------------------------------------------------ the figures


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Every figure of the full synthetic session, drawn once for the tests below."""
    directory = tmp_path_factory.mktemp("figures") / "figs"
    return directory, write_plots(full_session(), directory)


def test_every_figure_is_a_png_of_the_fixed_size(drawn: tuple[Path, list[Path]]) -> None:
    directory, written = drawn
    assert written, "nothing was drawn"
    assert sorted(written) == sorted(directory.iterdir())
    for path in written:
        assert png_size(path) == SIZE, path.name


def test_heatmaps_per_test_and_metric(drawn: tuple[Path, list[Path]]) -> None:
    written = names(drawn[1])
    for metric in ("step_time", "throughput", "peak_memory", "cpu_utilization"):
        assert f"tests_test_lm.test_infer.heatmap-{metric}.png" in written
    assert "tests_test_train.test_recompute.heatmap-step_time.png" in written
    assert "tests_test_train.test_recompute.heatmap-peak_memory.png" in written
    assert not any("heatmap-loss" in n or "heatmap-flops" in n for n in written)


def test_relative_bars_and_a_heatmap_for_a_two_axis_remainder(drawn: tuple[Path, list[Path]]) -> None:
    written = names(drawn[1])
    assert "tests_test_train.test_recompute.relative-step_time.png" in written
    assert "tests_test_train.test_recompute.relative-heatmap-step_time-checkpointed.png" in written
    assert "tests_test_schedule.test_schedule.relative-peak_memory.png" in written
    assert "tests_test_schedule.test_schedule.relative-step_time.png" in written
    # one axis besides the variant axis: bars only
    assert not any(n.startswith("tests_test_schedule.test_schedule.relative-heatmap") for n in written)


def test_scaling_latency_and_items_figures(drawn: tuple[Path, list[Path]]) -> None:
    written = names(drawn[1])
    assert "tests_test_attention.test_attention.scaling.png" in written
    assert "tests_test_lm.test_infer.latency.png" in written
    assert "tests_test_attention.test_attention.latency.png" in written
    assert "tests_test_scan.test_scan.items-loss.png" in written
    # train cells give no latency figure; cells without items_per_step no items figure
    assert "tests_test_train.test_recompute.latency.png" not in written
    assert "tests_test_train.test_recompute.items-loss.png" not in written


def test_empty_results_write_nothing(tmp_path: Path) -> None:
    assert write_plots(results.SessionResults(cells=()), tmp_path / "figs") == []
    assert not (tmp_path / "figs").exists()


def test_a_grid_that_ran_out_of_memory_everywhere_still_gets_its_heatmap(tmp_path: Path) -> None:
    axes: Axes = (("batch_size", (64, 128)), ("seq_len", (512,)))
    cells = [record("tests/test_big.py", axes, cell("test_big", params, (), kind="run", outcome=outcome), None)
             for params, outcome in zip(grid(axes), (Outcome.OOM, Outcome.CRASHED), strict=True)]
    written = write_plots(results.SessionResults(cells=tuple(cells)), tmp_path)
    assert names(written) == ["tests_test_big.test_big.heatmap-step_time.png"]
    assert png_size(written[0]) == SIZE


def test_a_figure_without_a_finite_value_is_not_drawn(tmp_path: Path) -> None:
    _, figures = schedule_grid()
    broken = [replace(f, figure=replace(f.figure, value=math.inf)) for f in figures]
    assert write_plots(results.SessionResults(cells=(), figures=tuple(broken)), tmp_path) == []


def test_a_single_cell_test_without_axes_gets_its_samples_and_no_heatmap(tmp_path: Path) -> None:
    now = cell("test_one", (), timed(0.01, 1, memory=2.0**20))
    written = write_plots(results.SessionResults(cells=(record("tests/test_one.py", (), now, None),)), tmp_path)
    assert names(written) == ["tests_test_one.test_one.samples-step_time.png"]
    assert png_size(written[0]) == SIZE


def test_more_than_four_panels_go_to_further_files(tmp_path: Path) -> None:
    axes: Axes = (("a", (1, 2)), ("b", (1, 2)), ("c", (1, 2, 3)), ("d", ("x", "y")))
    cells = [record("t.py", axes, cell("test_p", params, timed(0.01 * (n + 1), n)), None)
             for n, params in enumerate(grid(axes))]
    written = names(write_plots(results.SessionResults(cells=tuple(cells)), tmp_path))
    assert written == ["t.test_p.heatmap-step_time.png", "t.test_p.heatmap-step_time-2.png",
                       "t.test_p.samples-step_time.png", "t.test_p.samples-step_time-2.png"]  # 16 + 8 cells


def test_file_names_are_safe_and_deterministic() -> None:
    assert file_stem("examples/test_lm.py", "TestLM::test_step", "heatmap-step_time") == \
        "examples_test_lm.TestLM__test_step.heatmap-step_time"
    assert file_stem("a b/c*d.py", "test_x", "relative-heatmap-step_time-ck/pt") == \
        "a_b_c_d.test_x.relative-heatmap-step_time-ck_pt"


def test_the_heatmap_metrics_include_a_utilization_metric() -> None:
    assert {"step_time", "peak_memory", "throughput"} <= set(HEATMAP_METRICS)
    assert any("utilization" in m for m in HEATMAP_METRICS)


def test_results_read_back_from_json_draw_the_same_pngs(tmp_path: Path) -> None:
    cells, figures = schedule_grid()
    session = results.SessionResults(cells=tuple(cells), figures=tuple(figures))
    first = write_plots(session, tmp_path / "now")
    again = write_plots(results.loads("results.json", results.dump(session)), tmp_path / "again")
    assert names(first) == names(again) == [
        "tests_test_schedule.test_schedule.heatmap-step_time.png",
        "tests_test_schedule.test_schedule.heatmap-peak_memory.png",
        "tests_test_schedule.test_schedule.samples-step_time.png",
        "tests_test_schedule.test_schedule.relative-peak_memory.png",
        "tests_test_schedule.test_schedule.relative-step_time.png"]
    for a, b in zip(first, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs"


# ------------------------------------------------------------------ the option


def test_help_lists_the_option_and_its_ini_twin(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--trainperf-plots=DIR*", "*write PNG figures of the session*"])
    assert "trainperf_plots" in result.stdout.str()


def test_the_option_needs_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    assert parse_plots("figs") == "figs"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(argparse.ArgumentTypeError, match=r"pip install pytest-trainperf\[plots\]"):
        parse_plots("figs")


def test_without_matplotlib_the_session_stops_before_any_test(pytester: pytest.Pytester,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_x(): raise AssertionError('ran')")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = pytester.runpytest("--trainperf-plots=figs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--trainperf-plots*matplotlib*pip install pytest-trainperf[[]plots[]]*"])
    pytester.makeini("[pytest]\ntrainperf_plots = figs\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option trainperf_plots*pip install pytest-trainperf[[]plots[]]*"])


WORKLOAD = """
import torch
from torch import nn
import pytest_trainperf as tp

@tp.grid(width=[8, 16, 32], variant=["plain", "wide"])
@tp.tolerance(step_time=1.0)
@tp.relative(variant="plain", metrics=["flops"])
@tp.scaling(x="width", metrics=["flops"])
def test_mlp(trainperf, width, variant):
    torch.manual_seed(0)
    hidden = 16 if variant == "plain" else 64
    model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=4, warmup=1, items_per_step=4)
"""


def test_a_measured_session_writes_and_lists_its_figures(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_threads = 1\ntrainperf_rounds = 1\n")
    pytester.makepyfile(test_work=WORKLOAD)
    result = pytester.runpytest("--trainperf", "--trainperf-plots=figs")
    result.assert_outcomes(passed=6)
    figures = sorted((pytester.path / "figs").glob("*.png"))
    for figure in ("heatmap-step_time", "heatmap-peak_memory", "items-loss", "relative-flops", "scaling"):
        assert f"test_work.test_mlp.{figure}.png" in names(figures)
    for path in figures:
        assert png_size(path) == SIZE
    listed = sorted(line for line in result.outlines if line.startswith("trainperf: figure: "))
    assert listed == [f"trainperf: figure: figs/{name}" for name in names(figures)]


def test_plain_runs_draw_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_plots = figs\n")
    pytester.makepyfile(test_work=WORKLOAD)
    pytester.runpytest().assert_outcomes(passed=6)
    assert not (pytester.path / "figs").exists()
