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
