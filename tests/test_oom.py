"""Out of memory as a cell outcome, through pytester: a real CPU allocator failure, and memory budgets."""

from __future__ import annotations

import json

import pytest

# Two cells: batch 1 holds a 1 MiB activation, batch 64 a 64 MiB one. BIG_ALLOC makes the big cell ask
# the CPU allocator for a petabyte (a real allocator failure, raised inside the step).
WORKLOAD = """
import math

import torch
import pytest_trainperf as tp

BIG_ALLOC = {big_alloc}

@tp.grid(batch_size=[1, 64])
@tp.tolerance(step_time=math.inf)  # outcomes and memory are under test: a 1 ms step under load is not
def test_act(trainperf, batch_size):
    w = torch.ones(1024, 16, requires_grad=True)

    def step():
        x = torch.ones(batch_size * 256, 1024)  # batch_size MiB of activations
        if BIG_ALLOC and batch_size == 64:
            torch.empty(2**50, dtype=torch.uint8)
        loss = (x @ w).square().mean()
        loss.backward()
        return loss

    trainperf.train(step, steps=4, warmup=1)
"""


def workload(big_alloc: bool = False) -> str:
    return WORKLOAD.format(big_alloc=big_alloc)


@pytest.fixture(autouse=True)
def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_threads = 1\ntrainperf_rounds = 1\n")


def cells(pytester: pytest.Pytester) -> dict:
    doc = json.loads((pytester.path / "baselines" / "test_work.json").read_text())
    (env,) = doc["environments"].values()
    return env["tests"]["test_act"]


def test_a_cpu_allocator_failure_is_an_oom_cell_and_the_next_cell_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload(big_alloc=True))
    result = pytester.runpytest("--trainperf-update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*OOM new*", "OOM out of memory", "OOM: test_work.py::test_act[[]batch_size=64[]]: *"])
    assert "RuntimeError:" in result.stdout.str() and "DefaultCPUAllocator" in result.stdout.str()
    stored = cells(pytester)
    assert stored["batch_size=64"]["outcome"] == "oom"
    assert stored["batch_size=64"]["metrics"] == {}
    assert stored["batch_size=1"]["metrics"]["flops"]["value"] > 0

    # expected: the same OOM against its baseline passes
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*2 cells measured: 2 unchanged*"])

    # an OOM that went away is an improvement
    pytester.makepyfile(test_work=workload(big_alloc=False))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*was OOM*", "*1 improved, 1 unchanged*"])


def test_a_new_oom_fails_as_a_regression(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload(big_alloc=False))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=2)
    pytester.makepyfile(test_work=workload(big_alloc=True))
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*trainperf regression: out of memory (oom), where the baseline was measured",
                                 "*RuntimeError: *DefaultCPUAllocator*"])


def test_without_trainperf_an_allocator_failure_is_an_ordinary_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload(big_alloc=True))
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*DefaultCPUAllocator: can't allocate memory*"])


def test_a_memory_budget_emulates_oom_on_the_cpu(pytester: pytest.Pytester) -> None:
    """A 16 MiB budget: the 64 MiB cell is reported out of memory (emulated) and not timed; the same
    budget against that baseline passes; without the budget the cell fits again (improved); a
    budget applied to a baseline measured without one fails that cell."""
    pytester.makepyfile(test_work=workload())
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-memory-budget=16MiB")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["OOM[*]: test_work.py::test_act[[]batch_size=64[]]: peak memory * MiB exceeds *"])
    words = " ".join(result.stdout.str().split())  # the note may wrap at 80 columns
    assert "exceeds the memory budget of 16.0 MiB (emulated out of memory; not timed)" in words
    result.stdout.fnmatch_lines(["outcome written: test_work.py::test_act[[]batch_size=64[]]: new -> oom-emulated"])
    big = cells(pytester)["batch_size=64"]
    assert big["outcome"] == "oom-emulated"
    assert "step_time" not in big["metrics"] and big["metrics"]["peak_memory"]["value"] > 16 * 2**20

    pytester.runpytest("--trainperf", "--trainperf-memory-budget=16MiB").assert_outcomes(passed=2)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*1 improved, 1 unchanged*"])

    result = pytester.runpytest("--trainperf-update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["outcome written: test_work.py::test_act[[]batch_size=64[]]: oom-emulated -> measured"])
    result = pytester.runpytest("--trainperf", "--trainperf-memory-budget=16MiB")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*trainperf regression: out of memory (oom-emulated), where the baseline was measured"])


def test_tp_memory_budget_overrides_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=workload().replace("@tp.grid(", "@tp.memory_budget('1GiB')\n@tp.grid("))
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-memory-budget=16MiB")
    result.assert_outcomes(passed=2)
    assert "outcome" not in cells(pytester)["batch_size=64"]


@pytest.mark.parametrize(("source", "expected"), [
    ("@tp.memory_budget('lots')", "*tp.memory_budget: expected a size of at least 1 byte*such as 24GiB*got 'lots'*"),
    ("@tp.memory_budget(2.5)", "*tp.memory_budget: expected a size such as '24GiB' or a number of bytes, got 2.5*"),
    # issue 18: a raw OverflowError before
    ("@tp.memory_budget('1e400')", "*tp.memory_budget: expected a size of at least 1 byte*got '1e400'*"),
    ("@tp.memory_budget(10**5000)", "*tp.memory_budget: expected a size of at least 1 byte*got an integer of 16610 "
                                    "bits"),
    ("@tp.memory_budget('0.5')", "*tp.memory_budget: expected a size of at least 1 byte*got '0.5'*"),
    ("@tp.memory_budget(0)", "*tp.memory_budget: expected a size of at least 1 byte*got 0"),
])
def test_a_bad_budget_is_refused_at_collection(pytester: pytest.Pytester, source: str, expected: str) -> None:
    pytester.makepyfile(test_work=f"import pytest_trainperf as tp\n\n{source}\ndef test_x(trainperf):\n    pass\n")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines([expected])
    assert result.ret == pytest.ExitCode.INTERRUPTED


@pytest.mark.parametrize("value", ["-1GB", "1e400", "0.5", "0"])
def test_a_bad_budget_option_is_refused_at_parse_time(pytester: pytest.Pytester, value: str) -> None:
    result = pytester.runpytest(f"--trainperf-memory-budget={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*argument --trainperf-memory-budget: expected a size of at least 1 byte "
                                 f"(and below 8 EiB) such as 24GiB*got '{value}'*"])


@pytest.mark.parametrize("value", ["1e400", "0.5"])
def test_a_bad_budget_in_the_ini_file_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    pytester.makeini(f"[pytest]\ntrainperf_memory_budget = {value}\n")
    pytester.makepyfile(test_work="def test_x():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*ini option trainperf_memory_budget (twin of --trainperf-memory-budget): "
                                 f"expected a size of at least 1 byte*got '{value}'*"])


CUDA_OOM = """
import torch
import pytest_trainperf as tp

@tp.grid(gib=[0, 100000])
def test_cuda(trainperf, gib):
    w = torch.ones(256, 256, device=trainperf.device, requires_grad=True)

    def step():
        if gib:
            torch.empty(gib * 2**30, dtype=torch.uint8, device=trainperf.device)
        loss = (w @ w).sum()
        loss.backward()
        return loss

    trainperf.train(step, steps=4, warmup=1)
"""


def test_a_cuda_out_of_memory_error_is_an_oom_cell_and_the_next_cell_runs_cleanly(pytester: pytest.Pytester) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the OOM is torch.OutOfMemoryError from the caching allocator")
    pytester.makepyfile(test_cuda=CUDA_OOM.replace("gib=[0, 100000]", "gib=[100000, 0]"))
    result = pytester.runpytest_subprocess("--trainperf-update-baselines", "--trainperf-device=cuda")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*OOM: test_cuda.py::test_cuda[[]gib=100000[]]: OutOfMemoryError: CUDA out of memory*"])
    doc = json.loads((pytester.path / "baselines" / "test_cuda.json").read_text())
    (env,) = doc["environments"].values()
    fits = env["tests"]["test_cuda"]["gib=0"]["metrics"]
    assert fits["peak_memory"]["value"] < 2**24  # the failed 100000 GiB request left nothing behind


def test_code_after_train_does_not_run_in_an_emulated_oom_cell(pytester: pytest.Pytester) -> None:
    """Over its budget a cell stops at train(), as a real OOM would stop it: nothing is recorded from a
    model that never trained; the cell under its budget records as usual."""
    source = workload().replace("    trainperf.train(step, steps=4, warmup=1)",
                                "    trainperf.train(step, steps=4, warmup=1)\n    trainperf.record('eval_loss', 1.0)")
    pytester.makepyfile(test_work=source)
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-memory-budget=16MiB").assert_outcomes(passed=2)
    stored = cells(pytester)
    assert stored["batch_size=64"]["outcome"] == "oom-emulated"
    assert "eval_loss" not in stored["batch_size=64"]["metrics"]
    assert "peak_memory" in stored["batch_size=64"]["metrics"]
    assert "eval_loss" in stored["batch_size=1"]["metrics"]
