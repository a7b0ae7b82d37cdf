"""Options and names that collide (issue 18): outputs refused at configure time, test names derived
from node ids whose parameters hold ``::``."""

from __future__ import annotations

import pytest

from pytest_trainperf.grid import test_name as name_of

TEST = "def test_x():\n    pass\n"


@pytest.mark.parametrize(("args", "expected"), [
    (["--trainperf-json=baselines/out.json"],
     "*--trainperf-json (*/baselines/out.json) is inside the baselines directory of --trainperf-baselines "
     "(*/baselines): expected a file outside it*"),
    (["--trainperf-markdown=store/sub/report.md", "--trainperf-baselines=store"],
     "*--trainperf-markdown (*/store/sub/report.md) is inside the baselines directory of --trainperf-baselines "
     "(*/store)*"),
    (["--trainperf-json=out/r", "--trainperf-markdown=out/../out/r"],
     "*--trainperf-json and --trainperf-markdown both name */out/r: expected two different files*"),
])
def test_outputs_that_collide_are_a_usage_error_naming_both_options(pytester: pytest.Pytester, args: list[str],
                                                                    expected: str) -> None:
    pytester.makepyfile(test_work=TEST)

    result = pytester.runpytest(*args)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])
    assert not (pytester.path / "baselines").exists()


def test_an_ini_output_inside_the_baselines_is_refused_too(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_baselines = perf\ntrainperf_markdown = perf/summary.md\n")
    pytester.makepyfile(test_work=TEST)

    result = pytester.runpytest()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--trainperf-markdown (*/perf/summary.md) is inside the baselines directory*"])


def test_outputs_beside_the_baselines_are_fine(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=TEST)

    result = pytester.runpytest("--trainperf-json=baselines-report.json", "--trainperf-markdown=report.md")

    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(("nodeid", "originalname", "param_id", "expected"), [
    ("tests/test_s.py::test_s", "test_s", None, "test_s"),
    ("tests/test_s.py::TestA::test_s[batch_size=4]", "test_s", "batch_size=4", "TestA::test_s"),
    # a grid value holding "::" (the plugin stored the cell under "test_s[name=a::test_s")
    ("tests/test_s.py::test_s[name=a::b]", "test_s", "name=a::b", "test_s"),
    ("tests/test_s.py::test_s[name=a::b]", None, None, "test_s"),
    ("tests/test_s.py::TestA::test_s[name=a::b-x=[1]]", None, None, "TestA::test_s"),
    # a "[" in the file's path, and parameters that hold "[" and "::" together
    ("tests/[x]/test_s.py::test_s[name=[a::b]]", "test_s", "name=[a::b]", "test_s"),
    ("tests/[x]/test_s.py::test_s[name=[a::b]]", None, None, "test_s"),
])
def test_the_test_name_never_splits_the_parameters(nodeid: str, originalname: str | None, param_id: str | None,
                                                   expected: str) -> None:
    assert name_of(nodeid, originalname, param_id) == expected


BAD_CELL = """
import math
import torch
import pytest_trainperf as tp

@tp.grid(items=["4", "inf"])
@tp.tolerance(step_time=math.inf)  # what is stored and read back is under test, not a 1-round timing
def test_x(trainperf, items):
    w = torch.ones(4, 4, requires_grad=True)

    def step():
        loss = (w * 2).sum()
        loss.backward()
        return loss

    trainperf.train(step, steps=3, warmup=1, items_per_step=float(items))

def test_y(trainperf):
    trainperf.record("acc", 0.9)
"""


def test_one_non_finite_cell_costs_no_other_cell_its_baseline(pytester: pytest.Pytester) -> None:
    """An infinite throughput (items_per_step=inf) fails its own cell, named; the update writes every
    other cell and the JSON results, and exits non-zero."""
    import json

    pytester.makepyfile(test_work=BAD_CELL)

    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=1", "--trainperf-json=r.json")

    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_work.py::test_x[[]items=inf[]]: not stored in baselines/test_work.json: "
                                 "metrics.throughput*finite*"])
    doc = json.loads((pytester.path / "baselines" / "test_work.json").read_text())
    (env,) = doc["environments"].values()
    assert sorted(env["tests"]["test_x"]) == ["items=4"] and list(env["tests"]["test_y"]) == ["default"]
    assert json.loads((pytester.path / "r.json").read_text())["summary"]["cells"] == 3
    again = pytester.runpytest("--trainperf", "-k", "not inf")  # the file written reads back
    again.assert_outcomes(passed=2)


@pytest.mark.parametrize(("call", "expected"), [
    ('trainperf.record("acc", 0.9, unit=5)', "*trainperf.record('acc', ...): expected unit to be a string*got 5*"),
    ('trainperf.record("acc", 0.9, unit=None)', "*expected unit to be a string*got None*"),
    ('trainperf.record("acc", 10**400)', "*trainperf.record('acc', ...): expected a finite number or 0-d tensor*"),
    ('trainperf.record("acc", __import__("torch").tensor(1 + 2j))', "*expected a finite number or 0-d tensor*"),
])
def test_a_record_the_store_would_refuse_fails_its_cell_at_the_call(pytester: pytest.Pytester, call: str,
                                                                     expected: str) -> None:
    pytester.makepyfile(test_work=f"def test_r(trainperf):\n    {call}\n")

    result = pytester.runpytest("--trainperf-update-baselines")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([expected])
    assert "Traceback" not in result.stdout.str() and "AttributeError" not in result.stdout.str()
    assert not (pytester.path / "baselines" / "test_work.json").exists()
