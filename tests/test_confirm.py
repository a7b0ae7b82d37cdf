"""Screen, then confirm: a cell whose step time regressed against its stored baseline is measured again
side by side, in lockstep, with the commit that holds the code the baseline measured; only a confirmed
regression fails. Through pytester in a temporary git repository (the workers are real processes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch  # noqa: F401  (loaded before pytester's in-process runs, as conftest.py expects)
from gitrepo import WORKLOAD, git
from results_schema import validate_results

from pytest_trainperf import judge, vcs
from pytest_trainperf.records import Source
from pytest_trainperf.runners import lockstep
from pytest_trainperf.store import read

TEST = """
import pytest_trainperf as tp
from work import build


@tp.tolerance(step_time=0.5)  # tiny steps in a test suite: only a 10x slower step must fail
def test_w(trainperf):
    trainperf.train(build(), steps=3, warmup=1)
"""
INI = "[pytest]\ntrainperf_threads = 1\ntrainperf_pairs = 20\ntrainperf_rounds = 1\n"


@pytest.fixture
def repo(pytester: pytest.Pytester) -> Path:
    """Two commits: the parent (a fast step) and a 10x slower step (a sleep). Baselines are committed."""
    where = pytester.path
    pytester.makeini(INI)
    pytester.makepyfile(work=WORKLOAD.format(sleep=0), test_w=TEST)
    (where / ".gitignore").write_text("__pycache__/\nr.json\n")
    git(where, "init", "-q", "-b", "main")
    git(where, "config", "user.email", "t@example.com")
    git(where, "config", "user.name", "t")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "parent")
    return where


def slower_commit(pytester: pytest.Pytester, where: Path) -> None:
    pytester.makepyfile(work=WORKLOAD.format(sleep=0.005))
    git(where, "commit", "-qam", "slower")


def baseline(where: Path) -> dict:  # type: ignore[type-arg]
    (env,) = json.loads((where / "baselines" / "test_w.json").read_text())["environments"].values()
    return env["tests"]["test_w"]["default"]  # type: ignore[no-any-return]


def make_fast(where: Path, factor: float = 0.2) -> None:
    """Rewrite the stored step times as if a machine ``1 / factor`` times faster had measured them."""
    path = where / "baselines" / "test_w.json"
    doc = json.loads(path.read_text())
    for env in doc["environments"].values():
        step = env["tests"]["test_w"]["default"]["metrics"]["step_time"]
        step["value"] *= factor
        step["samples"] = [s * factor for s in step["samples"]]
    path.write_text(json.dumps(doc))


def no_worktree_left(where: Path) -> None:
    assert git(where, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not any((where / ".git" / "worktrees").glob("*"))


def test_an_update_records_the_code_it_measured(pytester: pytest.Pytester, repo: Path) -> None:
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    source = baseline(repo)["source"]
    head = git(repo, "rev-parse", "HEAD")
    assert source["commit"] == head
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baselines")  # the usual flow: the baselines committed after the update
    found = vcs.measured_commit(repo, Source(**source), repo / "baselines")
    assert found.commit == head and found.reason == ""  # the update measured HEAD's code as it was
    # uncommitted changes are part of what was measured: no commit holds them until they are committed
    (repo / "work.py").write_text((repo / "work.py").read_text() + "\n# changed\n")
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    dirty = Source(**baseline(repo)["source"])
    assert dirty.tree != source["tree"]
    assert vcs.measured_commit(repo, dirty, repo / "baselines").commit is None
    git(repo, "commit", "-qam", "the change and its baselines")
    assert vcs.measured_commit(repo, dirty, repo / "baselines").commit == git(repo, "rev-parse", "HEAD")


def test_a_baseline_from_a_faster_machine_is_confirmed_unchanged_and_passes(pytester: pytest.Pytester,
                                                                           repo: Path) -> None:
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baselines")
    make_fast(repo)  # the stored step times: 5x faster than this machine runs the code
    screen = pytester.runpytest("--trainperf", "--trainperf-confirm-against=none")
    screen.assert_outcomes(failed=1)  # the screen alone fails it
    result = pytester.runpytest("--trainperf", "--trainperf-json=r.json")
    result.assert_outcomes(passed=1)
    measured = git(repo, "rev-parse", "HEAD~1")[:vcs.SHORT_SHA]  # the update's HEAD holds the code it measured
    result.stdout.fnmatch_lines([f"trainperf: this runner ran 1 cell *% slower than their baselines (median; "
                                 f"interquartile *); 1 timing cell confirmed side by side against {measured}: "
                                 "0 regressed"])
    doc = json.loads((repo / "r.json").read_text())
    validate_results(doc)
    (cell,) = doc["cells"]
    assert cell["status"] == "unchanged" and cell["verdict"]["confirmed_against"] == measured
    assert 1 <= cell["verdict"]["confirmed_pairings"] <= judge.SIDE_BY_SIDE_PAIRINGS
    (screened,) = cell["verdict"]["screen"]
    assert screened["name"] == "step_time" and screened["status"] == "regressed"
    assert doc["summary"]["machine"]["confirmed"] == [{"against": measured, "cells": 1, "regressed": 0}]
    no_worktree_left(repo)


LOGGED = """
import os
from torch.utils._python_dispatch import _get_current_dispatch_mode
import pytest_trainperf as tp
from work import build


@tp.tolerance(step_time=0.5)
def test_w(trainperf):
    inner = build()

    def step():
        with open({log!r}, "a") as log:  # which process, and whether a counting (dispatch) mode is on
            log.write(f"{{os.getpid()}} {{_get_current_dispatch_mode() is not None}}\\n")
        return inner()

    trainperf.train(step, steps=3, warmup=1)
"""


def test_a_confirmation_s_workers_measure_timings_only(pytester: pytest.Pytester, repo: Path, tmp_path: Path) -> None:
    """The pair's exact metrics are not used (the stored baseline judges those): its workers run no
    counting pass and no memory-tracked step, only the warm-up and the steps they take turns on."""
    log = tmp_path / "steps.log"
    pytester.makepyfile(test_w=LOGGED.format(log=str(log)))
    git(repo, "commit", "-qam", "logged")
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baselines")
    make_fast(repo)
    log.unlink()
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 timing cell confirmed side by side against *: 0 regressed"])
    counted: dict[str, set[bool]] = {}
    for line in log.read_text().split("\n"):
        if line:
            pid, mode = line.split()
            counted.setdefault(pid, set()).add(mode == "True")
    session = str(os.getpid())  # pytester runs the session in this process
    assert counted.pop(session) == {True, False}  # its own cell: the counting pass, then plain steps
    assert list(counted.values()) == [{False}, {False}]  # both workers: no counting pass
    no_worktree_left(repo)


def test_a_slower_commit_fails_confirmed_side_by_side(pytester: pytest.Pytester, repo: Path) -> None:
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baselines")
    measured = git(repo, "rev-parse", "HEAD~1")[:vcs.SHORT_SHA]  # the update's HEAD holds the code it measured
    slower_commit(pytester, repo)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"*trainperf regression: step_time +* (confirmed side by side with {measured})",
        f"test_w.py::test_w against its baseline in baselines/test_w.json, confirmed side by side with {measured} "
        "on this machine",
        "environment: *",
        "  stored: step_time: baseline *, now *, change +*",
        f"  side by side: step_time: at {measured} *, now *, change +*",
        f"  (timings side by side: the median of the balanced ratios (an A-first and a B-first pair each), "
        f"this tree / {measured}, pooled over 2 pairs of worker processes, *",
        f"trainperf: this runner ran 1 cell *% slower than their baselines*confirmed side by side against "
        f"{measured}: 1 regressed",
    ])
    no_worktree_left(repo)


def committed_with_baselines(pytester: pytest.Pytester, repo: Path, module: str, source: str, cells: int) -> str:
    """A test module committed, its baselines updated and committed: the commit they measured."""
    pytester.makepyfile(**{module: source})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", module)
    pytester.runpytest("--trainperf-update-baselines", f"{module}.py").assert_outcomes(passed=cells)
    measured = git(repo, "rev-parse", "HEAD")[:vcs.SHORT_SHA]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baselines")
    return measured


# Every process that runs the test appends its pid; the fourth and fifth to run it (after the session's own
# and the first pair of workers: the second pair of workers) exit without a result.
DYING = """
import os
import pytest_trainperf as tp
from work import build


@tp.tolerance(step_time=0.5)
def test_w(trainperf):
    with open({log!r}, "a") as log:
        log.write(f"{{os.getpid()}}\\n")
    with open({log!r}) as log:
        order = list(dict.fromkeys(log.read().split()))
    if order.index(str(os.getpid())) >= 3:
        os._exit(3)
    trainperf.train(build(), steps=3, warmup=1)
"""


def test_a_further_pair_of_processes_that_dies_leaves_the_verdict_to_the_pairs_before_it(
        pytester: pytest.Pytester, repo: Path, tmp_path: Path) -> None:
    """The first pair of workers finds the slower commit regressed; the second pair, which would pool its
    pairs with theirs, dies: the first pair's verdict judges the cell, not the stored one."""
    log = tmp_path / "processes.log"
    measured = committed_with_baselines(pytester, repo, "test_w", DYING.format(log=str(log)), cells=1)
    slower_commit(pytester, repo)
    log.unlink()
    result = pytester.runpytest("--trainperf", "--trainperf-json=r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*trainperf regression: step_time +* (confirmed side by side with {measured})",
                                 f"  side by side: step_time: at {measured} *, now *, change +*"])
    result.stdout.fnmatch_lines([f"*test_w.py::test_w: pair of worker processes 2 failed (*exited with status 3*); "
                                 f"judged side by side with {measured} on the first pair of processes"])
    assert "pooled over" not in result.stdout.str() and "the stored verdict stands" not in result.stdout.str()
    assert len(set(log.read_text().split())) == 5  # the session's, then two pairs of workers
    (cell,) = json.loads((repo / "r.json").read_text())["cells"]
    assert cell["verdict"]["confirmed_pairings"] == 1
    no_worktree_left(repo)


# A relative timing figure of two sleep-dominated cells: heavy / plain is about +100% (4 ms against 2 ms).
# The cells' own step-time gates are off, so only the figure can fail; heavy.py holds what a commit changes.
FIGURE = """
import math
import time

import torch
import pytest_trainperf as tp
from heavy import HEAVY_S


@tp.grid(variant=["plain", "heavy"])
@tp.relative(variant="plain", metrics=["step_time"], tolerance=0.5)
@tp.tolerance(step_time=math.inf)
def test_fig(trainperf, variant):
    x = torch.ones(4)

    def step():
        time.sleep(HEAVY_S if variant == "heavy" else 0.002)
        return x.sum()

    trainperf.train(step, steps=3, warmup=1)
"""


def figure_repo(pytester: pytest.Pytester, repo: Path) -> str:
    (repo / "heavy.py").write_text("HEAVY_S = 0.004\n")
    return committed_with_baselines(pytester, repo, "test_fig", FIGURE, cells=2)


def test_a_timing_figure_from_another_machine_is_confirmed_unchanged_side_by_side(
        pytester: pytest.Pytester, repo: Path) -> None:
    """The stored heavy cell made five times faster, as a machine where the variant costs little would
    measure it: the stored figure reads -60%, this machine +100%. The re-measurement agrees with this
    machine, so only the side-by-side comparison (the same code both sides) clears it."""
    measured = figure_repo(pytester, repo)
    path = repo / "baselines" / "test_fig.json"
    doc = json.loads(path.read_text())
    for env in doc["environments"].values():
        step = env["tests"]["test_fig"]["variant=heavy"]["metrics"]["step_time"]
        step["value"] *= 0.2
        step["samples"] = [s * 0.2 for s in step["samples"]]
    path.write_text(json.dumps(doc))
    result = pytester.runpytest("--trainperf", "--trainperf-json=r.json", "test_fig.py")
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "*re-measuring 2 cells of test_fig.py::test_fig to confirm 1 regressed figure*",
        f"*measuring 2 cells of test_fig.py::test_fig side by side with {measured} to confirm 1 regressed figure*",
        f"*test_fig.py::test_fig: 1 timing figure confirmed side by side against {measured}: 0 regressed*",
    ])
    result.stdout.re_match_lines([r"\s*side by side [+-]\d+(\.\d)?%\s*$"])  # the table says what decided it
    (figure,) = json.loads((repo / "r.json").read_text())["figures"]
    assert figure["status"] == "unchanged" and figure["confirmed_against"] == measured
    assert figure["change"] > 0.5  # the stored comparison, kept
    low, high = figure["side_interval"]
    assert low < figure["side_change"] < high and abs(figure["side_change"]) < 0.5
    no_worktree_left(repo)


def test_a_slower_variant_fails_its_timing_figure_side_by_side(pytester: pytest.Pytester, repo: Path) -> None:
    measured = figure_repo(pytester, repo)
    (repo / "heavy.py").write_text("HEAVY_S = 0.02\n")  # the variant 5x slower: the figure +100% -> +900%
    git(repo, "commit", "-qam", "a slower variant")
    result = pytester.runpytest("--trainperf", "--trainperf-json=r.json", "test_fig.py")
    result.assert_outcomes(passed=2)  # no cell regressed on its own: the figure fails the session
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*trainperf regression: step_time of variant=heavy relative to variant=plain +*% -> +*%",
        f"*step_time of variant=heavy relative to variant=plain: baseline +*, now +*; side by side with "
        f"{measured}: the ratio moved +*% (95% CI +*% to +*%)",
        f"*(confirmed side by side with {measured} on this machine: the cells they come from measured in "
        "lockstep with the commit the baseline measured)",
    ])
    (figure,) = json.loads((repo / "r.json").read_text())["figures"]
    assert figure["status"] == "regressed" and figure["confirmed_against"] == measured
    assert figure["side_interval"][0] > 0.5
    no_worktree_left(repo)


SCALING = """
import math
import time

import torch
import pytest_trainperf as tp


@tp.grid(n=[1, 2, 4])
@tp.scaling(x="n", metrics=["step_time"])
@tp.tolerance(step_time=math.inf)
def test_fit(trainperf, n):
    x = torch.ones(4)

    def step():
        time.sleep(0.002 * n)  # the step time grows as n^1
        return x.sum()

    trainperf.train(step, steps=3, warmup=1)
"""


def test_a_timing_fit_from_another_machine_is_confirmed_unchanged_side_by_side(
        pytester: pytest.Pytester, repo: Path) -> None:
    """The stored cells all made as fast as the first, as a machine where the step does not grow would
    measure them: the stored exponent reads 0, this machine's 1. Side by side (the same code both sides)
    every cell reads about 0, and so does the slope."""
    measured = committed_with_baselines(pytester, repo, "test_fit", SCALING, cells=3)
    path = repo / "baselines" / "test_fit.json"
    doc = json.loads(path.read_text())
    for env in doc["environments"].values():
        cells = env["tests"]["test_fit"]
        first = cells["n=1"]["metrics"]["step_time"]
        for cell in cells.values():
            cell["metrics"]["step_time"].update(value=first["value"], samples=first["samples"])
    path.write_text(json.dumps(doc))
    result = pytester.runpytest("--trainperf", "--trainperf-json=r.json", "test_fit.py")
    result.assert_outcomes(passed=3)
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        f"*measuring 3 cells of test_fit.py::test_fit side by side with {measured} to confirm 1 regressed figure*",
        f"*test_fit.py::test_fit: 1 timing figure confirmed side by side against {measured}: 0 regressed*",
    ])
    result.stdout.re_match_lines([r".*step_time +n +all .* [+-]\d\.\d\d \(side by side [+-]\d\.\d\d\)"])
    (figure,) = json.loads((repo / "r.json").read_text())["figures"]
    assert figure["status"] == "unchanged" and figure["confirmed_against"] == measured
    assert figure["change"] > 0.5 and abs(figure["side_change"]) < 0.25
    no_worktree_left(repo)


def test_a_baseline_never_committed_as_measured_keeps_the_screen_verdict(pytester: pytest.Pytester,
                                                                        repo: Path) -> None:
    (repo / "work.py").write_text((repo / "work.py").read_text() + "\n# an experiment, never committed\n")
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    git(repo, "checkout", "-q", "--", "work.py")
    make_fast(repo)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*trainperf regression: step_time +*",
                                 "trainperf note: test_w.py::test_w: not confirmed side by side (no commit holds "
                                 "the code the baseline measured: it was updated from * with changes never "
                                 "committed as they were measured*); the stored verdict stands"])
    assert "confirmed side by side with" not in result.stdout.str()
    no_worktree_left(repo)


def test_a_shallow_clone_keeps_the_screen_verdict_and_names_the_fix(pytester: pytest.Pytester, repo: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    make_fast(repo)
    (repo / "notes.txt").write_text("a later commit\n")
    git(repo, "add", "notes.txt", "work.py")
    git(repo, "commit", "-qm", "later")
    clone = repo / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(clone)], check=True)
    (clone / "baselines").mkdir()
    (clone / "baselines" / "test_w.json").write_text((repo / "baselines" / "test_w.json").read_text())
    monkeypatch.chdir(clone)
    result = pytester.runpytest("--trainperf", f"--rootdir={clone}", "-c", str(clone / "tox.ini"))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["trainperf note: test_w.py::test_w: not confirmed side by side (this is a shallow "
                                 "clone without *, the commit the baseline was updated at (fetch the history: "
                                 "actions/checkout with fetch-depth: 0*); the stored verdict stands"])


def test_ctrl_c_during_a_confirmation_ends_the_workers_and_removes_the_worktree(
        pytester: pytest.Pytester, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.runpytest("--trainperf-update-baselines").assert_outcomes(passed=1)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baselines")
    slower_commit(pytester, repo)
    started: list[lockstep.Worker] = []

    def interrupted(a: lockstep.Worker, b: lockstep.Worker, pairs: int, **_: object) -> None:
        started.extend((a, b))
        assert (repo / ".git" / "worktrees").is_dir()  # the baseline's commit is checked out meanwhile
        raise KeyboardInterrupt

    monkeypatch.setattr(lockstep, "lockstep", interrupted)
    result = pytester.runpytest("--trainperf", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert len(started) == 2 and all(w.proc.poll() is not None for w in started)
    no_worktree_left(repo)


def test_the_stored_source_round_trips_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    from pytest_trainperf.records import Fingerprint, Measurement, Metric
    from pytest_trainperf.store import BaselineError, update

    path = tmp_path / "test_x.json"
    fp = Fingerprint(device="cpu", device_type="cpu", torch="2", cuda=None, threads=1, cpu="cpu")
    cell = Measurement(test="test_x", cell="default", params=(), metrics=(Metric("flops", 1.0),),
                       source=Source(commit="a" * 40, tree="b" * 40))
    update(path, fp, [cell])
    assert read(path).lookup(fp.key, "test_x", "default") == cell
    doc = json.loads(path.read_text())
    doc["environments"][fp.key]["tests"]["test_x"]["default"]["source"] = {"commit": 5}
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError, match=r"source.*expected an object \{\"commit\""):
        read(path)
