"""``--trainperf-isolate`` through pytester: every isolated cell is a real child process (``python -m
pytest <node id>``), killed or crashed for real; the parent session runs in-process, which is enough
to show that it goes on, and quicker."""

from __future__ import annotations

import json
import math
import signal
import textwrap
from pathlib import Path

import pytest
import torch  # noqa: F401  (loaded before pytester's in-process runs, as conftest.py expects)
from results_schema import validate_results

from pytest_trainperf import results
from pytest_trainperf.records import Outcome
from pytest_trainperf.runners import children as isolate
from pytest_trainperf.settings import OPTIONS, Settings

# Two tiny cells; with KILL the second one's process sends itself SIGKILL inside its step, as the
# kernel's OOM killer would.
WORKLOAD = """
import os
import signal
import torch
from torch import nn
import pytest_trainperf as tp

KILL = {kill}

@tp.grid(n=[8, 16])
@tp.tolerance(step_time=100.0)  # fresh processes against an in-process baseline: timings are not the point
def test_mlp(trainperf, n):
    torch.manual_seed(0)
    model = nn.Linear(n, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1))

    def step():
        if KILL and n == 16:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=3, warmup=1)
"""
INI = "[pytest]\ntrainperf_threads = 1\ntrainperf_rounds = 1\n"
EXACT = ("flops", "loss", "peak_memory")
"""Metrics that do not depend on the process they are measured in."""


@pytest.fixture(autouse=True)
def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)


def cells(pytester: pytest.Pytester, name: str = "r.json") -> dict[str, dict]:
    doc = json.loads((pytester.path / name).read_text())
    validate_results(doc)
    return {c["cell"]: c for c in doc["cells"]}


def metric(cell: dict, name: str) -> float:
    (value,) = [m["value"] for m in cell["verdict"]["measurement"]["metrics"] if m["name"] == name]
    return float(value)


def stored(pytester: pytest.Pytester) -> dict[str, dict]:
    doc = json.loads((pytester.path / "baselines" / "test_work.json").read_text())
    (env,) = doc["environments"].values()
    return env["tests"]["test_mlp"]


# ------------------------------------------------------------------ the option


def test_help_lists_the_option_and_its_ini_twin(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--trainperf-isolate*run each trainperf cell in a fresh*"])
    assert "trainperf_isolate" in result.stdout.str()


def test_ini_twin_runs_trainperf_tests_in_a_child_and_others_here(pytester: pytest.Pytester) -> None:
    # the ini twins of the options a child does not get are switched off there with -o: it starts
    pytester.makeini(INI + "trainperf_isolate = true\ntrainperf_strict = true\ntrainperf_show = flops\n"
                     "trainperf_markdown = report.md\ntrainperf_devices = cpu\n")
    pytester.makepyfile(test_where=f"""
        import os

        def test_cell(trainperf):
            assert os.environ.get("{isolate.CHILD_ENV}")

        def test_plain():
            assert not os.environ.get("{isolate.CHILD_ENV}")
    """)
    pytester.runpytest().assert_outcomes(passed=2)


def test_every_option_is_forwarded_to_the_child_or_deliberately_not() -> None:
    forwarded = {arg.split("=")[0].removeprefix("--").replace("-", "_")
                 for arg in isolate.child_args(Settings(enabled=True, update=True, baselines=Path("b"),
                                                        device="cpu", strict=False, show=(), threads=2,
                                                        memory_budget=2**30))}
    every = {opt.dest for opt in OPTIONS}
    assert forwarded | isolate.NOT_FORWARDED | {"trainperf"} == every
    assert not forwarded & isolate.NOT_FORWARDED


def test_child_environment_repeats_no_session_work() -> None:
    env = isolate.child_env({"PATH": "/bin", "PYTEST_ADDOPTS": "-n 4", "GITHUB_STEP_SUMMARY": "/s.md"})
    assert env == {"PATH": "/bin"}


def test_plugins_warnings_and_ini_overrides_pass_through() -> None:
    args = ["-q", "-p", "no:randomly", "-pxdist", "tests/", "-W", "error", "--override-ini=a=1", "-o", "b=2",
            "--import-mode=importlib", "-k", "mlp", "--trainperf-json=x.json"]
    assert isolate.passed_through(args) == ["-p", "no:randomly", "-pxdist", "-W", "error", "--override-ini=a=1",
                                            "-o", "b=2", "--import-mode=importlib"]


@pytest.mark.parametrize(("code", "outcome", "detail"), [
    (-signal.SIGKILL, Outcome.OOM_KILLED, "killed by SIGKILL (the kernel's OOM killer or another process)"),
    (-signal.SIGSEGV, Outcome.CRASHED, "crashed: died of SIGSEGV"),
    (3, Outcome.CRASHED, "crashed: exited with status 3 without a result"),
])
def test_how_a_child_died(code: int, outcome: Outcome, detail: str) -> None:
    assert isolate.death(code) == (outcome, detail)


@pytest.mark.parametrize(("text", "expected"), [
    ("{", "unreadable (JSONDecodeError"),
    ('{"format": "other"}', "not an isolated cell's outcome"),
    (json.dumps({"format": isolate.FORMAT, "reports": [{"when": "call"}], "results": ""}), "unreadable (KeyError"),
    (json.dumps({"format": isolate.FORMAT, "reports": [], "results": "{}"}), "not a pytest-trainperf result file"),
])
def test_unusable_child_outcome_is_named(text: str, expected: str) -> None:
    with pytest.raises(isolate.ChildError, match=r"^child\.json.*" + expected.replace("(", r"\(")):
        isolate.load_outcome("child.json", text)


def test_child_outcome_round_trips() -> None:
    outcome = isolate.ChildOutcome(
        reports=(isolate.PhaseReport("t.py::x", "call", "failed", "assert 1 == 2"),
                 isolate.PhaseReport("t.py::y", "call", "skipped", "why", xfail="known")),
        results=results.SessionResults(cells=(), errors=("e",)))
    assert isolate.load_outcome("c", isolate.dump_outcome(outcome)) == outcome


# ------------------------------------------------------------------ cells in children


def test_isolated_cells_measure_what_in_process_cells_measure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=WORKLOAD.format(kill=False))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=2)
    here = stored(pytester)
    assert all("peak_rss" not in here[c]["metrics"] for c in here)

    result = pytester.runpytest("--trainperf", "--trainperf-isolate", "--trainperf-json=r.json")
    result.assert_outcomes(passed=2)
    isolated = cells(pytester)
    assert set(isolated) == {"n=8", "n=16"}
    for name, cell in isolated.items():
        for exact in EXACT:
            assert metric(cell, exact) == here[name]["metrics"][exact]["value"]  # identical, not close
        assert metric(cell, "peak_rss") > 2**20  # a Python process with torch loaded
        # the report-only peak_rss, absent from the in-process baseline, does not make the cell new
        assert cell["status"] == "unchanged"

    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-isolate")
    result.assert_outcomes(passed=2)
    written = stored(pytester)
    for name in here:
        assert written[name]["metrics"]["peak_rss"]["value"] > 2**20
        assert written[name]["metrics"]["flops"] == here[name]["metrics"]["flops"]
    # the children's baseline changes reach the parent's summary
    result.stdout.fnmatch_lines(["*baselines updated*", "*peak_rss*"])


def test_killed_cell_is_out_of_memory_and_the_session_goes_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=WORKLOAD.format(kill=True))
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-isolate", "--trainperf-json=r.json")
    result.assert_outcomes(passed=2)  # no baseline: a cell that runs out of memory is new
    found = cells(pytester)
    killed = found["n=16"]["verdict"]["measurement"]
    assert killed["outcome"] == "oom-killed" and "killed by SIGKILL" in killed["detail"]
    assert metric(found["n=16"], "peak_rss") > 2**20
    assert found["n=8"]["verdict"]["measurement"]["outcome"] == "measured"
    written = stored(pytester)
    assert written["n=16"]["outcome"] == "oom-killed" and "outcome" not in written["n=8"]

    pytester.makepyfile(test_work=WORKLOAD.format(kill=False))
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=2)
    pytester.makepyfile(test_work=WORKLOAD.format(kill=True))
    result = pytester.runpytest("--trainperf", "--trainperf-isolate")
    result.assert_outcomes(passed=1, failed=1)  # killed where its baseline was measured: regressed
    result.stdout.fnmatch_lines(["*trainperf regression:*oom-killed*where the baseline was measured*",
                                 "*killed by SIGKILL*"])
    result.stdout.fnmatch_lines(["FAILED test_work.py::test_mlp[[]n=16[]]*"])


def test_crash_and_failure_in_children_fail_their_items(pytester: pytest.Pytester,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_work=textwrap.dedent("""
        import os

        def test_abort(trainperf):
            trainperf.train(lambda: os.abort(), steps=2)

        def test_assert(trainperf):
            x = 1
            assert x == 2, "the isolated test's own message"

        def test_ok(trainperf):
            trainperf.record("answer", 42.0)
    """))
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = pytester.runpytest("--trainperf", "--trainperf-isolate", "--trainperf-json=r.json")
    result.assert_outcomes(passed=1, failed=2)
    # one report, the session's: the children append none
    assert sum(line.startswith("## ") for line in summary.read_text().splitlines()) == 1
    result.stdout.fnmatch_lines(["*crashed: died of SIGABRT*"])
    result.stdout.fnmatch_lines(["*the isolated test's own message*"])
    result.stdout.fnmatch_lines(["*in the isolated run of test_work.py::test_assert: call failed*"])
    doc = json.loads((pytester.path / "r.json").read_text())
    by_test = {c["test"]: c for c in doc["cells"]}
    assert by_test["test_abort"]["verdict"]["measurement"]["outcome"] == "crashed"
    assert by_test["test_abort"]["status"] == "regressed"
    assert "test_assert" not in by_test  # a failing test measured nothing
    assert metric(by_test["test_ok"], "answer") == 42.0
    assert math.isfinite(metric(by_test["test_ok"], "peak_rss"))


def test_a_child_dies_with_its_session_even_when_the_session_is_killed(tmp_path: Path) -> None:
    """A session SIGKILLed while its child runs takes the child with it (Linux: PR_SET_PDEATHSIG), so
    no child measures on or writes a baseline after its session is gone."""
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")

    def alive(pid: int) -> bool:  # a zombie waiting for a reaper that never comes counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from pytest_trainperf.runners.children import start_child
        child = start_child([sys.executable, "-c", "import time; time.sleep(600)"], Path("."), dict(os.environ),
                            Path({str(tmp_path)!r}))
        Path({str(pidfile)!r}).write_text(str(child.pid))
        time.sleep(600)
    """)])
    for _ in range(600):  # a bound for a slow start, not a timing
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    for _ in range(200):
        if not alive(child):
            break
        time.sleep(0.05)
    assert not alive(child)


def test_a_node_id_that_looks_like_an_option_reaches_the_child_as_a_path(pytester: pytest.Pytester) -> None:
    pytester.mkdir("-x")
    (pytester.path / "-x" / "test_a.py").write_text("def test_a(trainperf):\n    trainperf.record('acc', 0.5)\n")

    result = pytester.runpytest("--trainperf", "--trainperf-isolate", "./-x/test_a.py")

    result.assert_outcomes(passed=1)
    assert "CRASH" not in result.stdout.str()
