"""The plugin through pytester: options, grids, plain mode, baselines, verdicts, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import textwrap

import pytest

# A small real training workload. Knobs come from module constants so a test can inject a change
# by rewriting one line: SLEEP_S (a slower step), EXTRA_MIB (a larger live tensor), LR (numerics).
WORKLOAD = """
import time
from math import inf
import torch
from torch import nn
import pytest_trainperf as tp

SLEEP_S = {sleep}
EXTRA_MIB = {extra}
LR = {lr}
SLOW_CALLS = {slow_calls}  # only the first SLOW_CALLS calls of a cell sleep

@tp.grid(batch_size=[4, 8], width=[16, 32])
@tp.tolerance(step_time={step_tol})
def test_mlp(trainperf, batch_size, width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1)).to(trainperf.device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    x = torch.randn(batch_size, width, generator=torch.Generator().manual_seed(1)).to(trainperf.device)
    y = x.sum(dim=1, keepdim=True)
    calls = [0]

    def step():
        calls[0] += 1
        opt.zero_grad(set_to_none=True)
        scratch = torch.ones(EXTRA_MIB * 2**18, device=trainperf.device) if EXTRA_MIB else None
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if SLEEP_S and calls[0] <= SLOW_CALLS:
            time.sleep(SLEEP_S)
        del scratch
        return loss

    trainperf.train(step, steps=8, warmup=2, items_per_step=batch_size)
"""


def workload(sleep: float = 0.0, extra: int = 0, lr: float = 1e-2, step_tol: float = 1.0,
             slow_calls: int = 10**9) -> str:
    """The workload source. Unchanged runs use a generous step-time tolerance so that they cannot
    flake on a loaded machine; the slowdown injected below (100 ms) is ~100x the step, far beyond it.
    ``step_tol=math.inf`` leaves step time (and throughput) ungated, both ways."""
    return WORKLOAD.format(sleep=sleep, extra=extra, lr=lr, step_tol=step_tol, slow_calls=slow_calls)


ONE_THREAD = "[pytest]\ntrainperf_threads = 1\ntrainperf_rounds = 2\n"
"""One intra-op thread: two threads on a two-core runner turn any other load into 20x step times.
Two noise rounds per update (not the default five), so updates stay quick; tests of the rounds say
how many they want."""


@pytest.fixture(autouse=True)
def _one_thread(pytester: pytest.Pytester) -> None:
    pytester.makeini(ONE_THREAD)


CELLS = ["batch_size=4-width=16", "batch_size=4-width=32", "batch_size=8-width=16", "batch_size=8-width=32"]


def baseline_doc(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "baselines" / "test_work.json").read_text())


def only_env(doc: dict) -> dict:
    (env,) = doc["environments"].values()
    return env


# ------------------------------------------------------------------ options


HELP_REACH = 120
"""Characters after an option in which its help text must begin (a word too long for the width is split)."""
HELP_OPTIONS = [  # all 25 options, pinned: a new option, or one renamed, is a change to this list
    ("--trainperf", "measure every trainperf test"),
    ("--trainperf-update-baselines", "measure and write the baselines"),
    ("--trainperf-baselines=DIR", "directory of baseline files"),
    ("--trainperf-device=DEVICE", "device to measure on"),
    ("--trainperf-strict", "fail cells that have no baseline"),
    ("--trainperf-show=METRICS", "comma-separated metrics to render as heatmaps"),
    ("--trainperf-confirm=N", "re-time a cell whose step time regressed"),
    ("--trainperf-rounds=N", "measurement rounds per cell of an update"),
    ("--trainperf-max-time=SECONDS", "seconds per cell that adaptive measurement"),
    ("--trainperf-memory-budget=SIZE", "a cell whose peak memory exceeds SIZE"),
    ("--trainperf-malloc=MODE", "fixed: fix glibc malloc's thresholds"),
    ("--trainperf-threads=N", "intra-op threads to fix during measurement"),
    ("--trainperf-json=PATH", "write every cell of the session"),
    ("--trainperf-markdown=PATH", "write the heatmaps as Markdown tables"),
    ("--trainperf-devices=DEVICES", "comma-separated devices, one per pytest-xdist worker"),
    ("--trainperf-cudnn-benchmark=POLICY", "during measurement on CUDA"),
    ("--trainperf-isolate", "run each trainperf cell in a fresh child process"),
    ("--trainperf-plots=DIR", "write PNG figures of the session"),
    ("--trainperf-against=REF", "compare each trainperf cell with the same cell at git revision REF"),
    ("--trainperf-confirm-against=POLICY", "where a cell whose step time regressed"),
    ("--trainperf-pairs=N", "the budget of timed step pairs per cell"),
    ("--trainperf-nnodes=N", "nodes the ranks of each distributed cell"),
    ("--trainperf-rdzv-endpoint=HOST:PORT", "the c10d rendezvous endpoint of a multi-node session"),
    ("--trainperf-rdzv-id=ID", "the id of a multi-node session"),
    ("--trainperf-csv=PATH", "write the session's results to this CSV file"),
]


def test_help_lists_every_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    flat = " ".join(re.sub(r"-\n\s+", "-", out).split())  # argparse wraps help text at spaces and after hyphens
    for option, text in HELP_OPTIONS:
        at = flat.index(f"{option} ")
        assert text in flat[at:at + len(option) + HELP_REACH], option
    listed = set(re.findall(r"(--trainperf[a-z-]*)", out))
    assert listed == {option.split("=")[0] for option, _ in HELP_OPTIONS}  # nothing more, nothing less
    for option, _ in HELP_OPTIONS:  # each has its ini twin
        ini = option.split("=")[0].lstrip("-").replace("-", "_")
        assert re.search(rf"^  {ini} \(", out, re.MULTILINE), ini


@pytest.mark.parametrize(("arg", "expected"), [
    ("--trainperf-device=gpu", "*--trainperf-device*expected auto, cpu, cuda, cuda:N*got 'gpu'*"),
    ("--trainperf-threads=0", "*--trainperf-threads*expected a positive integer, got '0'*"),
    ("--trainperf-malloc=jemalloc", "*--trainperf-malloc*expected one of fixed, system, got 'jemalloc'*"),
    ("--trainperf-confirm=-1", "*--trainperf-confirm*expected a non-negative integer*got '-1'*"),
    ("--trainperf-rounds=0", "*--trainperf-rounds*expected a positive integer*got '0'*"),
    ("--trainperf-max-time=soon", "*--trainperf-max-time*expected a positive number of seconds, got 'soon'*"),
    ("--trainperf-max-time=-5", "*--trainperf-max-time*expected a positive number of seconds, got '-5'*"),
    ("--trainperf-show=step time", "*--trainperf-show*expected a comma-separated list*got 'step time'*"),
])
def test_bad_option_is_refused_at_parse_time(pytester: pytest.Pytester, arg: str, expected: str) -> None:
    result = pytester.runpytest(arg)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_bad_ini_value_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_device = tpu\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option trainperf_device*expected auto, cpu*got 'tpu'*"])


def test_ini_twin_enables_measurement_and_cli_wins_for_paths(pytester: pytest.Pytester) -> None:
    pytester.makeini(ONE_THREAD + "trainperf = true\ntrainperf_baselines = from_ini\n")
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    assert (pytester.path / "from_ini" / "test_work.json").is_file()
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-baselines=from_cli").assert_outcomes(
        passed=4)
    assert (pytester.path / "from_cli" / "test_work.json").is_file()


# ------------------------------------------------------------------ grids


def test_grid_expands_to_one_item_per_cell(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines([f"test_work.py::test_mlp[[]{cell}[]]" for cell in CELLS])


def test_empty_grid_is_a_single_cell_and_axes_arrive_as_arguments(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest_trainperf as tp

        @tp.grid()
        def test_one(trainperf):
            assert trainperf.params == {}

        @tp.grid(kind=["a", "b"], flag=[True], rate=[0.5])
        def test_values(trainperf, kind, flag, rate):
            assert trainperf.params == {"kind": kind, "flag": True, "rate": 0.5}
            assert isinstance(flag, bool) and isinstance(rate, float)
    """)
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_one PASSED*", "*test_values[[]kind=a-flag=True-rate=0.5[]] PASSED*"])


@pytest.mark.parametrize(("decorator", "expected"), [
    ("tp.grid(batch_size=[])", "*tp.grid axis 'batch_size': expected a non-empty list of scalars, got an "
                               "empty list*"),
    ("tp.grid(batch_size=[4, [8]])", "*tp.grid axis 'batch_size': expected scalar values*got list [[]8[]]*"),
    ("tp.grid(batch_size=4)", "*tp.grid axis 'batch_size': expected a non-empty list of scalars, got int 4*"),
    ("tp.grid(batch_size=[4, 4])", "*tp.grid axis 'batch_size': expected distinct values, got 4*"),
    ("tp.tolerance(step_tme=0.1)", "*tp.tolerance: unknown metric 'step_tme'; expected one of step_time*"),
    ("tp.tolerance(step_time=-0.1)", "*tp.tolerance(step_time=...): expected a non-negative relative "
                                     "tolerance*got -0.1*"),
])
def test_bad_grid_or_tolerance_is_refused_at_collection(pytester: pytest.Pytester, decorator: str,
                                                        expected: str) -> None:
    pytester.makepyfile(f"""
        import pytest_trainperf as tp

        @{decorator}
        def test_x(trainperf):
            pass
    """)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", expected])


def test_axis_that_is_not_an_argument_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest_trainperf as tp

        @tp.grid(batch_size=[4], seq_len=[8])
        def test_x(trainperf, batch_size):
            pass
    """)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*tp.grid axis 'seq_len' is not an argument of test_x(); expected each axis to be one of the "
        "test's arguments (trainperf, batch_size)*"])
    assert "Traceback" not in result.stdout.str()


# ------------------------------------------------------------------ bad calls


@pytest.mark.parametrize(("body", "expected"), [
    ("trainperf.train(step, steps=0)", "*trainperf.train(steps=0): expected an integer >= 1*"),
    ("trainperf.train(step, steps=3, warmup=-1)", "*trainperf.train(warmup=-1): expected an integer >= 0*"),
    ("trainperf.train(lambda: torch.ones(4, 16), steps=3)",
     "*must return the loss as a 0-d tensor or a float; got a Tensor of shape (4, 16)*"),
    ("trainperf.train(lambda: None, steps=3)", "*must return the loss*got NoneType None*"),
    ("trainperf.train(lambda: float('nan'), steps=3)", "*loss diverged: trainperf.train step 0 returned nan*"),
    ("trainperf.record('loss', 1.0)", "*trainperf.record('loss', ...): expected a metric name*other than*"),
    ("trainperf.record('acc', 'high')", "*trainperf.record('acc', ...): expected a finite number*"),
])
@pytest.mark.parametrize("mode", [[], ["--trainperf"]], ids=["plain", "measured"])
def test_bad_call_fails_the_cell_with_a_clear_message(pytester: pytest.Pytester, body: str, expected: str,
                                                      mode: list[str]) -> None:
    pytester.makepyfile(f"""
        import torch

        def test_x(trainperf):
            step = lambda: torch.tensor(1.0)
            {body}
    """)
    result = pytester.runpytest(*mode)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([expected])


# ------------------------------------------------------------------ plain mode


def test_plain_mode_runs_one_step_and_touches_no_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import torch
        import pytest_trainperf as tp

        CALLS = []

        @tp.grid(n=[1, 2])
        def test_x(trainperf, n):
            def step():
                CALLS.append(n)
                return torch.tensor(1.0)
            assert trainperf.train(step, steps=50, warmup=5) is None
            assert CALLS == [n]
            CALLS.clear()
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    assert not (pytester.path / "baselines").exists()
    assert "cells measured" not in result.stdout.str()


# ------------------------------------------------------------------ baselines and verdicts


def test_update_writes_baselines_then_an_unchanged_run_passes(pytester: pytest.Pytester) -> None:
    # step time ungated: a CI update run under load once took 2.4x the unchanged run's steps, which
    # is "improved" even at a 100% tolerance; what is stored and the exact metrics' verdicts are under test
    pytester.makepyfile(test_work=workload(step_tol=math.inf))
    result = pytester.runpytest("--trainperf-update-baselines", "-v")  # -v: every new value listed
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["baselines/test_work.json*", "  test_mlp[[]batch_size=4-width=16[]]",
                                 "    step_time *— -> * new"])
    doc = baseline_doc(pytester)
    assert doc["format"] == "pytest-trainperf baselines" and doc["schema"] == 1
    env = only_env(doc)
    assert sorted(env["tests"]["test_mlp"]) == CELLS
    cell = env["tests"]["test_mlp"]["batch_size=4-width=16"]
    assert cell["params"] == [["batch_size", 4], ["width", 16]]
    step_time = cell["metrics"]["step_time"]
    assert len(step_time["rounds"]) == 2  # trainperf_rounds in the ini
    assert 2 * 4 <= len(step_time["samples"]) <= 2 * 8  # 8 timed steps a round, up to half of them warm-up
    assert len(cell["loss_curve"]) == 1 + 1 + 2 + 8  # FLOP-counted, memory-tracked, warm-up, timed
    assert cell["metrics"]["loss"]["value"] == cell["loss_curve"][-1]
    assert cell["metrics"]["flops"]["value"] > 0 and cell["metrics"]["peak_memory"]["value"] > 0
    assert env["fingerprint"]["threads"] == 1

    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*4 cells measured: 4 unchanged*"])


def test_exact_metrics_are_identical_across_processes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest_subprocess("--trainperf-update-baselines").assert_outcomes(passed=4)
    first = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    pytester.runpytest_subprocess("--trainperf-update-baselines").assert_outcomes(passed=4)
    second = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    for cell in CELLS:
        for metric in ("flops", "peak_memory", "loss"):
            assert first[cell]["metrics"][metric]["value"] == second[cell]["metrics"][metric]["value"]
        assert first[cell]["loss_curve"] == second[cell]["loss_curve"]


@pytest.mark.parametrize(("change", "metric"), [
    ({"sleep": 0.1}, "step_time"),  # ~100x the step: a two-round band on a loaded runner can pass +1600%
    ({"extra": 16}, "peak_memory"),
    ({"lr": 1e-3}, "loss"),
])
def test_injected_regression_fails_naming_the_metric(pytester: pytest.Pytester, change: dict,
                                                     metric: str) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    before = (pytester.path / "baselines" / "test_work.json").read_text()
    pytester.makepyfile(test_work=workload(**change))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines([
        f"*trainperf regression: *{metric} *",
        "test_work.py::test_mlp[[]batch_size=4-width=16[]] against its baseline in baselines/test_work.json",
        f"*  {metric}: baseline *, now *, change +*(tolerance *",
        "*If the change is intended, run `pytest --trainperf-update-baselines`*",
    ])
    failures = result.stdout.str().split("short test summary")[0]
    others = {"step_time", "peak_memory", "loss"} - {metric, "step_time"}  # timing may move with anything
    for other in others:
        assert not re.search(rf"^\s+{other}: baseline", failures, re.M), other
    assert (pytester.path / "baselines" / "test_work.json").read_text() == before  # compare never writes


def test_peak_memory_regression_is_exactly_the_injected_bytes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    before = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    pytester.makepyfile(test_work=workload(extra=16))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    after = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    for cell in CELLS:
        grown = after[cell]["metrics"]["peak_memory"]["value"] - before[cell]["metrics"]["peak_memory"]["value"]
        assert grown == 16 * 2**20


def test_improvement_passes_with_a_hint(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload(extra=16))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload())
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "*4 cells measured: 4 improved*",
        "*4 cells improved beyond tolerance; to accept:",
        "  pytest --trainperf-update-baselines",
    ])


def test_update_replaces_only_the_cells_it_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    before = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    pytester.makepyfile(test_work=workload(extra=16))
    result = pytester.runpytest("--trainperf-update-baselines", "test_work.py::test_mlp[batch_size=8-width=32]")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["  test_mlp[[]batch_size=8-width=32[]]", "    peak_memory *KiB -> *MiB *+*%"])
    after = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    for cell in CELLS[:3]:
        assert after[cell] == before[cell]
    assert after[CELLS[3]]["metrics"]["peak_memory"] != before[CELLS[3]]["metrics"]["peak_memory"]


def test_new_cells_pass_unless_strict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*4 cells measured: 4 new*"])
    assert not (pytester.path / "baselines").exists()
    result = pytester.runpytest("--trainperf", "--trainperf-strict")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*has no baseline for this environment in baselines/test_work.json "
                                 "(--trainperf-strict)*"])


@pytest.mark.parametrize(("content", "reason"), [
    ("{not json", "*not valid JSON*"),
    ('{"some": "other tool"}', "*not a pytest-trainperf baseline file*"),
    ('{"format": "pytest-trainperf baselines", "schema": 99, "environments": {}}',
     "*written by a newer pytest-trainperf (schema 99*"),
])
@pytest.mark.parametrize("mode", ["--trainperf", "--trainperf-update-baselines"])
def test_unusable_baseline_file_is_named_and_left_untouched(pytester: pytest.Pytester, content: str,
                                                            reason: str, mode: str) -> None:
    pytester.makepyfile(test_work=workload())
    path = pytester.path / "baselines" / "test_work.json"
    path.parent.mkdir()
    path.write_text(content)
    result = pytester.runpytest(mode)
    result.assert_outcomes(errors=4)  # at setup: the cells do not train for nothing
    result.stdout.fnmatch_lines([f"*trainperf: baseline file baselines/test_work.json cannot be used: {reason}",
                                 "*It was left untouched*"])
    assert "During handling" not in result.stdout.str()
    assert path.read_text() == content
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_work.json"]


def test_record_is_stored_and_compared(pytester: pytest.Pytester) -> None:
    source = textwrap.dedent("""
        def test_eval(trainperf):
            trainperf.record("test_loss", {value}, unit="nats", tolerance=0.05)
            trainperf.record("accuracy", {acc}, higher_is_better=True)
    """)
    pytester.makepyfile(test_rec=source.format(value=2.0, acc=0.9))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    pytester.makepyfile(test_rec=source.format(value=2.08, acc=0.905))
    pytester.runpytest("--trainperf").assert_outcomes(passed=1)
    pytester.makepyfile(test_rec=source.format(value=2.2, acc=0.8))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_loss: baseline 2 nats, now 2.2 nats, change +10.0% (tolerance 5.0%)*",
                                 "*accuracy: baseline 0.9, now 0.8, change -11.1% (tolerance 1.0%)*"])


def test_peak_memory_leaves_out_what_other_tests_keep_alive(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.makepyfile(test_aaa="""
        import torch

        KEPT = [torch.ones(2**22)]  # 16 MiB alive for the whole session

        def test_hold():
            KEPT.append(torch.ones(2**21))  # and 8 MiB more, left behind by a test
    """)
    pytester.runpytest("--trainperf-update-baselines", "test_work.py").assert_outcomes(passed=4)
    alone = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    pytester.runpytest("--trainperf-update-baselines", "test_aaa.py", "test_work.py").assert_outcomes(passed=5)
    together = only_env(baseline_doc(pytester))["tests"]["test_mlp"]
    for cell in CELLS:
        assert together[cell]["metrics"]["peak_memory"] == alone[cell]["metrics"]["peak_memory"]


# the first timed steps of every cell sleep (2 warm-up + FLOP-counted + memory-tracked + 8 timed = 12 calls),
# the re-timed ones do not: a transient slowdown
TRANSIENT = {"sleep": 0.1, "slow_calls": 12}
TWO_CELLS = [f"test_work.py::test_mlp[{cell}]" for cell in (CELLS[0], CELLS[-1])]
"""The compare runs of the tests that sleep 100 ms a step take two of the four cells: each sleeping cell
costs seconds."""


def test_a_timing_regression_that_does_not_reproduce_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(**TRANSIENT))
    pytester.runpytest("--trainperf", *TWO_CELLS).assert_outcomes(passed=2)
    result = pytester.runpytest("--trainperf", "--trainperf-confirm=0", *TWO_CELLS)
    result.assert_outcomes(failed=2)
    assert "confirmed by" not in result.stdout.str()


def test_a_confirmed_timing_regression_fails_saying_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(sleep=0.1))
    result = pytester.runpytest("--trainperf", "--trainperf-confirm=2", *TWO_CELLS)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*  step_time: baseline *, change +*",
                                 "*  (timings confirmed by 2 re-measurements; figures from the last)"])


def test_report_colour_follows_pytest(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(extra=16))
    plain = pytester.runpytest("--trainperf", "--color=no")
    plain.assert_outcomes(failed=4)
    assert "\x1b[" not in plain.stdout.str()
    plain.stdout.fnmatch_lines(["test_work.py::test_mlp · peak_memory (MiB)", "batch_size \\ width*16*32",
                                "4 *16.0 *16.0", "* +*% REGR * +*% REGR"])
    coloured = pytester.runpytest("--trainperf", "--color=yes")
    assert "\x1b[1;31m" in coloured.stdout.str()  # regressed cells in bold red
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in pytester.runpytest("--trainperf").stdout.str()


def test_cuda_device_without_cuda_is_a_clear_error(pytester: pytest.Pytester) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the refusal is for machines without it")
    pytester.makepyfile(test_work=workload())
    result = pytester.runpytest("--trainperf", "--trainperf-device=cuda")
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["*--trainperf-device=cuda, but torch.cuda.is_available() is False*"])


def test_measures_on_cuda_for_real(pytester: pytest.Pytester) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False on this machine")
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-device=cuda").assert_outcomes(passed=4)
    env = only_env(baseline_doc(pytester))
    assert env["fingerprint"]["device_type"] == "cuda"
    cell = env["tests"]["test_mlp"][CELLS[0]]["metrics"]
    assert cell["peak_memory"]["value"] > 0 and cell["reserved_memory"]["value"] >= cell["peak_memory"]["value"]
    pytester.makepyfile(test_work=workload(extra=16))
    result = pytester.runpytest("--trainperf", "--trainperf-device=cuda")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*  peak_memory: baseline *"])


def test_cells_new_here_but_stored_for_another_environment_are_pointed_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-threads=2").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(extra=16))  # a regression nobody compares on this environment
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*4 cells measured: 4 new*",
                                 "note: cells new here have baselines for other environments only:",
                                 "  cpu | * | threads 2 | *"])


def test_a_metric_to_show_that_nothing_measured_is_pointed_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    result = pytester.runpytest("--trainperf", "--trainperf-show=step_tme,flops")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["test_work.py::test_mlp · flops (kFLOP)",
                                 "--trainperf-show: no cell measured step_tme (measured: arithmetic_intensity, *"])


def test_a_metric_that_is_no_longer_measured_is_pointed_out(pytester: pytest.Pytester) -> None:
    source = textwrap.dedent("""
        def test_eval(trainperf):
            trainperf.record("test_loss", 2.0)
            {extra}
    """)
    pytester.makepyfile(test_rec=source.format(extra='trainperf.record("accuracy", 0.9)'))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    pytester.makepyfile(test_rec=source.format(extra="pass"))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["note: not measured any more, though in the baselines: accuracy (1 cell; *"])


# ------------------------------------------------------------------ the noise band


ORDER_LOGGED = """
import torch
import pytest_trainperf as tp

@tp.grid(n=[1, 2])
def test_x(trainperf, n):
    with open("order.log", "a") as log:
        log.write(f"{n}\\n")
    w = torch.ones(8, 8, requires_grad=True)
    def step():
        loss = (w * n).sum()
        loss.backward()
        return loss
    trainperf.train(step, steps=6, warmup=1)
"""


def test_update_measures_rounds_interleaved_across_cells_and_stores_the_band(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_order=ORDER_LOGGED)
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=3")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["trainperf: noise round 2 of 3 (2 cells)",
                                 "trainperf: noise round 3 of 3 (2 cells, in a fresh process)",
                                 "trainperf note: the step times of this update's 2 cells spread ±*% within a process "
                                 "(median; widest ±*%) and ±*% between processes (median; widest ±*%)*"])
    assert (pytester.path / "order.log").read_text().split() == ["1", "2", "1", "2", "1", "2"]
    doc = json.loads((pytester.path / "baselines" / "test_order.json").read_text())
    for cell in only_env(doc)["tests"]["test_x"].values():
        step_time = cell["metrics"]["step_time"]
        assert len(step_time["rounds"]) == 3
        assert len(step_time["samples"]) > 6  # the pool of the rounds' samples (settling may drop a few), not round 1's
        assert step_time["value"] == pytest.approx(statistics.median(step_time["samples"]), rel=1e-9)
        assert "rounds" not in cell["metrics"]["flops"]  # exact metrics: measured once


CALLS_LOGGED = """
import os
import torch
import pytest_trainperf as tp

@tp.grid(n=[1, 2])
def test_x(trainperf, n):
    w = torch.ones(8, 8, requires_grad=True)
    def step():
        with open("calls.log", "a") as log:
            log.write(f"{os.getpid()} {n}\\n")
        loss = (w * n).sum()
        loss.backward()
        return loss
    trainperf.train(step, steps=6, warmup=1)
"""


def test_a_noise_round_in_a_fresh_process_measures_timings_only(pytester: pytest.Pytester) -> None:
    """Like a round in the session's process, a round in a fresh one runs the warm-up and the timed steps
    of each cell, not the counting pass nor the memory-tracked step (exact metrics are measured once)."""
    pytester.makepyfile(test_calls=CALLS_LOGGED)
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=3")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["trainperf: noise round 3 of 3 (2 cells, in a fresh process)"])
    calls: dict[tuple[str, str], int] = {}
    for line in (pytester.path / "calls.log").read_text().split("\n"):
        if line:
            pid, n = line.split()
            calls[pid, n] = calls.get((pid, n), 0) + 1
    session = str(os.getpid())  # pytester runs the update in this process
    fresh = {n: count for (pid, n), count in calls.items() if pid != session}
    # round 1: 1 counted + 1 memory-tracked + 1 warm-up + 6 timed; round 2 (timing only): 1 + 6
    assert {n: count for (pid, n), count in calls.items() if pid == session} == {"1": 16, "2": 16}
    assert fresh == {"1": 7, "2": 7}


def test_one_round_or_no_time_left_stores_no_band(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_order=ORDER_LOGGED)
    for args in (["--trainperf-rounds=1"], ["--trainperf-rounds=4", "--trainperf-max-time=0.000001"]):
        (pytester.path / "order.log").unlink(missing_ok=True)
        result = pytester.runpytest("--trainperf-update-baselines", *args)
        result.assert_outcomes(passed=2)
        assert "noise round" not in result.stdout.str()
        if len(args) > 1:  # rounds were due but the time was not there: the summary says so
            result.stdout.fnmatch_lines(["trainperf note: 2 cells got fewer than 4 measurement rounds "
                                         "(--trainperf-max-time=1e-06 s per cell)*"])
        assert (pytester.path / "order.log").read_text().split() == ["1", "2"]
        doc = json.loads((pytester.path / "baselines" / "test_order.json").read_text())
        for cell in only_env(doc)["tests"]["test_x"].values():
            assert "rounds" not in cell["metrics"]["step_time"]


def test_a_wide_noise_band_widens_the_tolerance_and_the_failure_says_so(pytester: pytest.Pytester) -> None:
    """Rounds that moved by a factor of 3 widen a 100% tolerance to about 930%: a 100x slower step
    still fails, and the message names the band and the smallest change the cell detects. The samples
    are made as steady as the rounds are not: a loaded update's samples (0.7 to 14 ms of a 1.6 ms step,
    seen) would reach past a 100 ms step divided by the widened tolerance, and no test could clear it."""
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    path = pytester.path / "baselines" / "test_work.json"
    doc = json.loads(path.read_text())
    for cell in only_env(doc)["tests"]["test_mlp"].values():
        timing = cell["metrics"]["step_time"]
        value = timing["value"]
        timing["rounds"] = [value, value * 3, value / 3, value, value]
        timing["samples"] = [value * (1 + i / 1000) for i in range(len(timing["samples"]))]
    path.write_text(json.dumps(doc))
    pytester.makepyfile(test_work=workload(sleep=0.1))
    result = pytester.runpytest("--trainperf", "--trainperf-confirm=0")
    result.assert_outcomes(failed=4)
    assert "cannot reliably detect a slowdown below 50%" in " ".join(result.stdout.str().split())
    result.stdout.fnmatch_lines(["*step_time: baseline *(tolerance 9??.?%, widened from 100.0% by the baseline's "
                                 "noise band ±*; caught with 95% power from +*%)"])


def test_an_unconfirmed_regression_says_the_cell_ran_out_of_time(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=1").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(sleep=0.02))
    result = pytester.runpytest("--trainperf", "--trainperf-max-time=0.000001")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*  (not re-measured to confirm: the cell used its --trainperf-max-time of 1e-06 s)"])
    assert "confirmed by" not in result.stdout.str()


def test_report_shows_interval_and_detectable_change_per_timing_cell(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    assert re.search(r"\[[+-]\d+,[+-]\d+\]", out), out
    assert re.search(r"≥\+\d+%", out), out
    result.stdout.fnmatch_lines(["[[]lo,hi[]] 95% interval of the change, ≥+x% smallest slowdown detected (95% power)"])


def test_a_loss_curve_that_leaves_its_band_names_the_step(pytester: pytest.Pytester) -> None:
    """A smaller learning rate: the first call (before any update) gives the same loss, the second
    already differs, so the curve leaves its band at step 1."""
    pytester.makepyfile(test_work=workload())
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=4)
    pytester.makepyfile(test_work=workload(lr=1e-3))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*trainperf regression: *loss_curve *",
                                 "*  loss_curve: left its band at step 1 (mean of its window: baseline *, now *"])


def test_pytester_runs_keep_library_modules_and_drop_the_test_files_own(pytester: pytest.Pytester) -> None:
    """tests/conftest.py's wrapper of pytester's module snapshot is in effect: a library module first
    imported inside an in-process run stays loaded (torch cannot be imported twice), the module of the
    test file the run wrote is dropped, as pytester intends."""
    import sys

    library = "torch.utils.show_pickle"
    assert library not in sys.modules
    pytester.makepyfile(test_probe=f"import {library}\n\ndef test_probe():\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=1)
    assert library in sys.modules
    assert "test_probe" not in sys.modules
