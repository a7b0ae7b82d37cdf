"""Figures of whole grids: relative views (tp.relative) and scaling fits (tp.scaling).

The fits and verdicts are checked directly on synthetic measurements with known answers; the plugin
through pytester on real (small) workloads whose FLOPs, an exact metric, carry the change.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pytest_trainperf as tp
from pytest_trainperf import derived, store
from pytest_trainperf.grid import GridError, check_figures, make_grid
from pytest_trainperf.records import (
    Figure,
    FigureKind,
    Fingerprint,
    Measurement,
    Metric,
    Outcome,
    RelativeSpec,
    ScalingSpec,
    Status,
)

# ------------------------------------------------------------------ synthetic cells


def cell(params: dict, **metrics: float | tuple[float, ...]) -> Measurement:
    """A measured cell; a tuple value is a sampled metric (its samples), a float an exact one."""
    built = []
    for name, value in metrics.items():
        if isinstance(value, tuple):
            built.append(Metric(name, sorted(value)[len(value) // 2], "s", samples=value))
        else:
            built.append(Metric(name, value, "FLOP"))
    cell_id = "-".join(f"{k}={v}" for k, v in params.items())
    return Measurement(test="test_x", cell=cell_id, params=tuple(params.items()), metrics=tuple(built))


def samples(center: float, n: int = 12, spread: float = 0.01) -> tuple[float, ...]:
    """Deterministic samples around ``center``, ``spread`` relative either way."""
    return tuple(center * (1 + spread * ((i * 7) % n - n / 2) / n) for i in range(n))


# ------------------------------------------------------------------ fits


@given(exponent=st.floats(0.2, 3.0), coefficient=st.floats(1e-6, 1e6))
def test_fit_recovers_a_known_power_law(exponent: float, coefficient: float) -> None:
    xs = [16, 32, 64, 128, 256]
    b, a, (low, high) = derived.fit_power_law(xs, [coefficient * x ** exponent for x in xs])
    assert b == pytest.approx(exponent, rel=1e-9)
    assert a == pytest.approx(coefficient, rel=1e-6)
    assert low == pytest.approx(exponent, rel=1e-9) and high == pytest.approx(exponent, rel=1e-9)


def test_fit_is_robust_to_one_outlier_point() -> None:
    xs = [8, 16, 32, 64, 128, 256]
    ys = [2.0 * x ** 1.5 for x in xs]
    ys[2] *= 3  # one cell hit by a slow spell
    b, _, (low, high) = derived.fit_power_law(xs, ys)
    assert b == pytest.approx(1.5, abs=0.05)
    assert low <= 1.5 <= high


def test_scaling_figures_per_cell_of_the_other_axes_with_rounds() -> None:
    cells = []
    for batch in (1, 4):
        for n in (32, 64, 128, 256):
            flops = 10.0 * batch * n ** 2
            m = cell({"batch": batch, "n": n}, flops=flops)
            times = Metric("step_time", 1e-6 * n, "s", samples=samples(1e-6 * n),
                           rounds=(1e-6 * n, 1.01e-6 * n, 0.99e-6 * n))
            cells.append(Measurement(test=m.test, cell=m.cell, params=m.params, metrics=(*m.metrics, times)))
    figures = derived.scaling_figures(ScalingSpec(x="n", metrics=("flops", "step_time")), cells)
    by = {(f.cell, f.metric): f for f in figures}
    assert set(by) == {(f"batch={b}", m) for b in (1, 4) for m in ("flops", "step_time")}
    assert by[("batch=4", "flops")].value == pytest.approx(2.0)
    assert by[("batch=4", "flops")].coefficient == pytest.approx(40.0)
    assert by[("batch=1", "step_time")].value == pytest.approx(1.0, abs=1e-6)
    assert len(by[("batch=1", "step_time")].rounds) == 3
    assert [x for x, _ in by[("batch=1", "flops")].points] == [32, 64, 128, 256]


def test_scaling_by_a_recorded_metric_and_too_few_points() -> None:
    cells = [cell({"width": w}, flops=6.0 * (w * w) * 100, parameters=float(w * w)) for w in (8, 16, 32)]
    (fit,) = derived.scaling_figures(ScalingSpec(x="width", metrics=("flops",), x_metric="parameters"), cells)
    assert fit.value == pytest.approx(1.0)
    assert fit.reference == "parameters (along width)"
    oom = Measurement(test="test_x", cell="width=32", params=(("width", 32),), metrics=(), outcome=Outcome.OOM)
    assert derived.scaling_figures(ScalingSpec(x="width", metrics=("flops",)), [*cells[:2], oom]) == []


# ------------------------------------------------------------------ relative views


def test_relative_figures_pair_each_variant_with_the_reference_in_the_same_cell() -> None:
    cells = [cell({"batch": b, "variant": v}, flops=100.0 * b * (1.42 if v == "ckpt" else 1.0),
                  step_time=samples(0.01 * b * (1.42 if v == "ckpt" else 1.0)))
             for b in (2, 8) for v in ("plain", "ckpt")]
    figures = derived.relative_figures(RelativeSpec("variant", "plain", ("step_time", "flops")), cells)
    assert {(f.cell, f.metric) for f in figures} == {(f"batch={b}-variant=ckpt", m)
                                                    for b in (2, 8) for m in ("step_time", "flops")}
    for f in figures:
        assert f.value == pytest.approx(0.42, abs=1e-3)
        assert f.title().startswith(f"{f.metric} of variant=ckpt relative to variant=plain at batch=")
    timing = next(f for f in figures if f.metric == "step_time")
    assert timing.interval is not None and timing.interval[0] < 0.42 < timing.interval[1]
    # no reference measured in that cell (out of memory): no figure there
    oom = Measurement(test="test_x", cell="batch=8-variant=plain", params=(("batch", 8), ("variant", "plain")),
                      metrics=(), outcome=Outcome.OOM)
    left = derived.relative_figures(RelativeSpec("variant", "plain", ("flops",)), [*cells[:2], oom, cells[3]])
    assert [f.cell for f in left] == ["batch=2-variant=ckpt"]


def relative(value: float, rounds: tuple[float, ...] = (), interval: tuple[float, float] | None = None) -> Figure:
    return Figure(kind=FigureKind.RELATIVE, metric="step_time", axis="variant", cell="batch=8-variant=ckpt",
                  reference="plain", value=value, params=(("batch", 8), ("variant", "ckpt")),
                  interval=interval, rounds=rounds)


def test_a_recompute_cost_that_rose_from_42_to_55_percent_regresses() -> None:
    before = relative(0.42, rounds=(0.41, 0.42, 0.43, 0.42))
    verdict = derived.judge_figure(relative(0.55, interval=(0.53, 0.57)), before, 0.05)
    assert verdict.status is Status.REGRESSED
    assert verdict.change == pytest.approx(1.55 / 1.42 - 1)
    text = verdict.describe()
    assert "step_time of variant=ckpt relative to variant=plain at batch=8" in text
    assert "baseline +42.0%, now +55.0%" in text and "the ratio moved +9.2%" in text


def test_a_relative_figure_within_its_noise_or_not_significant_passes() -> None:
    noisy = relative(0.42, rounds=(0.30, 0.42, 0.55, 0.40))  # a wide band widens the tolerance
    assert derived.judge_figure(relative(0.55, interval=(0.53, 0.57)), noisy, 0.05).status is Status.UNCHANGED
    steady = relative(0.42, rounds=(0.42, 0.42))
    # the estimate moved, but the interval now still holds the baseline's figure
    assert derived.judge_figure(relative(0.55, interval=(0.30, 0.80)), steady, 0.05).status is Status.UNCHANGED
    assert derived.judge_figure(relative(0.30, interval=(0.29, 0.31)), steady, 0.05).status is Status.IMPROVED
    assert derived.judge_figure(relative(0.30), None, 0.05).status is Status.NEW


def exponent(value: float, interval: tuple[float, float], rounds: tuple[float, ...] = ()) -> Figure:
    return Figure(kind=FigureKind.SCALING, metric="step_time", axis="seq_len", cell="default",
                  reference="seq_len", value=value, interval=interval, rounds=rounds)


def test_an_exponent_that_went_quadratic_regresses_and_noise_widens_the_gate() -> None:
    before = exponent(1.02, (0.98, 1.06), rounds=(1.0, 1.03, 1.02))
    verdict = derived.judge_figure(exponent(1.98, (1.90, 2.05)), before, derived.SCALING_TOLERANCE)
    assert verdict.status is Status.REGRESSED
    assert verdict.change == pytest.approx(0.96)
    assert "step_time ~ seq_len^b: baseline x^1.02, now x^1.98 (exponent +0.96; tolerance +0.25" in verdict.describe()
    assert derived.judge_figure(exponent(1.15, (1.10, 1.20)), before, 0.25).status is Status.UNCHANGED
    shaky = exponent(1.0, (0.5, 1.5), rounds=(0.7, 1.0, 1.3))  # rounds 0.3 apart: the gate is 3 x 0.3
    assert derived.judge_figure(exponent(1.6, (1.5, 1.7)), shaky, 0.25).status is Status.UNCHANGED
    assert derived.judge_figure(exponent(0.5, (0.45, 0.55)), before, 0.25).status is Status.IMPROVED


# ------------------------------------------------------------------ decorators and collection-time checks


def test_decorators_reject_bad_arguments_naming_what_was_expected() -> None:
    with pytest.raises(GridError, match="exactly one axis=reference keyword"):
        tp.relative(variant="a", size="b")
    with pytest.raises(GridError, match="expected metrics=.*got 'step_time'"):
        tp.relative(variant="a", metrics="step_time")
    with pytest.raises(GridError, match="non-negative number, got -1"):
        tp.relative(variant="a", tolerance=-1)
    with pytest.raises(GridError, match="expected x='<grid axis>'"):
        tp.scaling(x=3, metrics=["flops"])  # type: ignore[arg-type]
    with pytest.raises(GridError, match="expected metrics="):
        tp.scaling(x="n", metrics=[])


def test_figures_are_checked_against_the_grid() -> None:
    grid = make_grid({"n": [32, 64, 128], "variant": ["a", "b"], "kind": ["x", "y"]})
    assert check_figures(grid, RelativeSpec("variant", "a", ("flops",)), (ScalingSpec("n", ("flops",)),)) is None
    assert "expected a grid axis, got 'model'" in check_figures(grid, RelativeSpec("model", "a", ("flops",)), ())
    assert "expected one of the axis values ['a', 'b'], got 'c'" in check_figures(
        grid, RelativeSpec("variant", "c", ("flops",)), ())
    assert "expected positive numbers" in check_figures(grid, None, (ScalingSpec("kind", ("flops",)),))
    two = make_grid({"n": [1, 2]})
    assert "at least 3 values" in check_figures(two, None, (ScalingSpec("n", ("flops",)),))
    assert "expected a grid axis" in check_figures(None, RelativeSpec("variant", "a", ("flops",)), ())


# ------------------------------------------------------------------ the baseline file


CPU = Fingerprint(device="cpu", device_type="cpu", torch="2.13.0", cuda=None, threads=1, cpu="cpu")


def test_update_stores_the_figures_recomputed_from_the_merged_cells(tmp_path) -> None:
    path = tmp_path / "test_x.json"
    spec = ScalingSpec(x="n", metrics=("flops",))

    def derive(cells):
        return {"test_x": derived.scaling_figures(spec, [m for (t, _), m in cells.items() if t == "test_x"])}

    first = [cell({"n": n}, flops=float(n)) for n in (8, 16)]
    store.update(path, CPU, first, derive=derive)
    assert store.read(path).figures(CPU.key, "test_x") == ()  # two points: no fit yet
    changes = store.update(path, CPU, [cell({"n": 32}, flops=32.0), cell({"n": 16}, flops=64.0)], derive=derive)
    (fit,) = store.read(path).figures(CPU.key, "test_x")
    assert fit.kind is FigureKind.SCALING and fit.value == pytest.approx(1.0)  # the median of slopes 3, 1, -1
    assert [c.metric for c in changes if c.metric.startswith("exponent")] == ["exponent of flops ~ n"]
    doc = json.loads(path.read_text())
    (stored,) = doc["environments"][CPU.key]["figures"]["test_x"].values()
    assert stored["kind"] == "scaling" and stored["points"] == [[8, 8.0], [16, 64.0], [32, 32.0]]


def test_a_corrupt_figure_is_reported_and_the_file_kept(tmp_path) -> None:
    path = tmp_path / "test_x.json"
    store.update(path, CPU, [cell({"n": n}, flops=float(n)) for n in (8, 16, 32)],
                 derive=lambda cells: {"test_x": derived.scaling_figures(
                     ScalingSpec(x="n", metrics=("flops",)), list(cells.values()))})
    doc = json.loads(path.read_text())
    (key,) = doc["environments"][CPU.key]["figures"]["test_x"]
    doc["environments"][CPU.key]["figures"]["test_x"][key]["value"] = "fast"
    text = json.dumps(doc)
    path.write_text(text)
    with pytest.raises(store.BaselineError, match=r"figures\.test_x\..*\.value: expected a finite number, got 'fast'"):
        store.update(path, CPU, [cell({"n": 8}, flops=8.0)])
    assert path.read_text() == text


# ------------------------------------------------------------------ through pytester

# FLOPs are exact, so a change of the work per step changes these figures deterministically.
FIGURES = """
import math
import torch
import pytest_trainperf as tp

HEAVY_REPS = {reps}
POWER = {power}

@tp.grid(batch=[2, 4], variant=["plain", "heavy"])
@tp.relative(variant="plain", metrics=["flops", "step_time"])
@tp.tolerance(step_time=math.inf)  # microsecond steps: the cells' timings are not the point here
def test_variants(trainperf, batch, variant):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(batch, 32)
    reps = 1 if variant == "plain" else HEAVY_REPS

    def step():
        y = x
        for _ in range(reps):
            y = lin(y)
        loss = y.pow(2).mean()
        loss.backward()
        return loss

    trainperf.train(step, steps=4, warmup=1, items_per_step=batch)

@tp.grid(n=[8, 16, 32, 64])
@tp.scaling(x="n", metrics=["flops"])
@tp.tolerance(step_time=math.inf)
def test_scaling(trainperf, n):
    a = torch.randn(n, 16)
    b = torch.randn(16, max(1, int(n ** (POWER - 1))))
    trainperf.run(lambda: a @ b, iters=4, warmup=1)
"""


def figures_file(reps: int = 2, power: float = 2.0) -> str:
    return FIGURES.format(reps=reps, power=power)


@pytest.fixture(autouse=True)
def _one_thread(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_threads = 1\ntrainperf_rounds = 2\n")


def test_figures_are_reported_stored_and_pass_unchanged(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=figures_file())
    update = pytester.runpytest("--trainperf-update-baselines", "-p", "no:randomly", "-v")  # -v: new values listed
    update.assert_outcomes(passed=8)
    update.stdout.fnmatch_lines(["*test_work.py::test_variants: flops of variant=heavy relative to variant=plain*",
                                 "*+150%*", "*test_scaling: scaling, metric = a * x^b*",
                                 "*flops*n*2.00 [[]2.00, 2.00[]]*",
                                 "*exponent of flops ~ n*new*", "*flops relative to variant=plain*new*"])
    doc = json.loads((pytester.path / "baselines" / "test_work.json").read_text())
    (env,) = doc["environments"].values()
    assert {f["kind"] for figs in env["figures"].values() for f in figs.values()} == {"relative", "scaling"}
    (fit,) = env["figures"]["test_scaling"].values()
    assert fit["value"] == pytest.approx(2.0)
    result = pytester.runpytest("--trainperf", "--trainperf-json=out.json")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*figures of whole grids*"])
    out = json.loads((pytester.path / "out.json").read_text())
    statuses = {(f["figure"]["kind"], f["figure"]["metric"]): f["status"] for f in out["figures"]}
    assert statuses[("scaling", "flops")] == "unchanged" and statuses[("relative", "flops")] == "unchanged"


def test_a_relative_regression_fails_naming_the_variant_pair(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=figures_file(reps=2))
    pytester.runpytest("--trainperf-update-baselines", "-k", "test_variants").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=figures_file(reps=3))
    # every cell of the heavy variant regresses on its own; the grid's last cell also carries the
    # figures' failure, which names the variant pair and the two figures
    result = pytester.runpytest("--trainperf", "-k", "test_variants")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "*trainperf regression: flops of variant=heavy relative to variant=plain at batch=2 +150% -> +300%*",
        "*test_work.py::test_variants: the figures of its grid (judged when its last cell finished)*",
        "*flops of variant=heavy relative to variant=plain at batch=4: baseline +150%, now +300% "
        "(the ratio moved +60.0%; tolerance 0.1%*",
    ])


def test_an_exponent_regression_fails_with_the_exponents(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=figures_file(power=1.0))
    pytester.runpytest("--trainperf-update-baselines", "-k", "test_scaling").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=figures_file(power=2.0))
    result = pytester.runpytest("--trainperf", "-k", "test_scaling", "--trainperf-markdown=report.md")
    result.stdout.fnmatch_lines([
        "*trainperf regression: flops ~ n^b x^1.00 -> x^2.00*",
        "*flops ~ n^b: baseline x^1.00, now x^2.00 (exponent +1.00; tolerance +0.25*",
    ])
    assert result.ret == 1
    assert "flops ~ n^b" in (pytester.path / "report.md").read_text()


def test_figures_that_do_not_fit_the_grid_fail_collection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad="""
        import pytest_trainperf as tp

        @tp.grid(n=[1, 2, 3])
        @tp.relative(variant="plain")
        def test_x(trainperf, n):
            pass
    """)
    result = pytester.runpytest("--trainperf")
    result.stdout.fnmatch_lines(["*test_bad.py::test_x: tp.relative: expected a grid axis, got 'variant' "
                                 "(the grid's axes: n)*"])
    assert result.ret != 0


def test_a_plain_run_ignores_the_figures(pytester: pytest.Pytester) -> None:
    """Without --trainperf the tests run their steps once, unmeasured; nothing is derived or written."""
    pytester.makepyfile(test_work=figures_file())
    result = pytester.runpytest()
    result.assert_outcomes(passed=8)
    assert "figures of whole grids" not in result.stdout.str()
    assert not (pytester.path / "baselines").exists()


# A timing figure: the heavy variant sleeps SLEEP_S per step, in every run of the test or only in its
# first run in the process (ONLY_FIRST: a slow spell that a re-measurement does not see). The cells'
# own step-time gate is off, so only the figure can fail. Every step first keeps the core busy for 2 ms
# by the clock: a ratio of two microsecond steps moves by more than the figure's tolerance on a loaded
# runner. Even a ratio of two 2 ms steps once read +103% re-measured in CI, so the figure's tolerance is
# 300%: a 50 ms spell reads about +2200% (a 20 ms one, +900%, was read as low as +580%).
TIMED = """
import math
import time
import torch
import pytest_trainperf as tp

SLEEP_S = {sleep}
ONLY_FIRST = {only_first}
RUNS = {{}}

@tp.grid(batch=[2, 4], variant=["plain", "heavy"])
@tp.relative(variant="plain", metrics=["step_time"], tolerance=3.0)
@tp.tolerance(step_time=math.inf)
def test_timed(trainperf, batch, variant):
    RUNS[(batch, variant)] = RUNS.get((batch, variant), 0) + 1
    slow = variant == "heavy" and (not ONLY_FIRST or RUNS[(batch, variant)] == 1)
    torch.manual_seed(0)
    x = torch.randn(batch, 32, requires_grad=True)

    def step():
        busy = time.perf_counter() + 0.002
        while time.perf_counter() < busy:
            pass
        loss = (x @ x.T).sum()
        loss.backward()
        if slow and SLEEP_S:
            time.sleep(SLEEP_S)
        return loss

    trainperf.train(step, steps=6, warmup=1)
"""


def test_a_timing_figure_regression_is_confirmed_by_re_measuring_its_cells(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=TIMED.format(sleep=0.0, only_first=False))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=TIMED.format(sleep=0.05, only_first=False))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=4)  # no cell regressed on its own: the figures fail the session
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*re-measuring 4 cells of test_work.py::test_timed to confirm 2 regressed figures*",
        "*trainperf regression: step_time of variant=heavy relative to variant=plain at batch=2*",
        "*(confirmed by 1 re-measurement of the cells they come from, taken in turn*",
    ])


def test_a_slow_spell_in_one_cell_is_not_confirmed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=TIMED.format(sleep=0.0, only_first=False))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=TIMED.format(sleep=0.05, only_first=True))
    result = pytester.runpytest("--trainperf", "--trainperf-json=out.json")
    result.assert_outcomes(passed=4)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*re-measuring 4 cells*"])
    out = json.loads((pytester.path / "out.json").read_text())
    assert {f["status"] for f in out["figures"]} <= {"unchanged", "improved"}
