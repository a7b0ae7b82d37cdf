"""Progress of an update's noise rounds (report/progress.py): the lines, the live line, the estimate, and
what ``-q`` shows; record-only cells are not re-run for noise rounds."""

from __future__ import annotations

import pytest

from pytest_trainperf.report.progress import FRESH_START_S, RoundsProgress, duration


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (42.4, "42 s"), (185, "3 min 05 s"),
                                               (3725, "1 h 02 min"), (-3, "0 s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_lines_give_each_cell_an_estimate_learned_from_the_rounds_that_ran() -> None:
    lines: list[str] = []
    clock = Clock()
    # first rounds took 10 s and 30 s (with the FLOP and memory steps); round 3 runs in a fresh process
    progress = RoundsProgress([2, 3], 3, {"a": 10.0, "b": 30.0}, lines.append, fresh_rounds=[3], clock=clock)
    progress.round(2, ["a", "b"], fresh=False)
    progress.cell("a")  # nothing learned yet: round 2 (40 s) + round 3 (40 s + start-up)
    clock.now += 5.0
    progress.cell_done("a", 5.0)  # half its first round: b is expected at half of its own too
    progress.cell("b")
    clock.now += 15.0
    progress.cell_done("b", 15.0)
    progress.round_done()
    progress.round(3, ["a", "b"], fresh=True)
    clock.now += 26.0  # 20 s of cells, 6 s of start-up
    progress.round_done()
    progress.finish()
    assert lines == [
        "trainperf: noise round 2 of 3 (2 cells)",
        f"trainperf:   round 2 of 3, cell 1 of 2, about {duration(80 + FRESH_START_S)} left: a",
        f"trainperf:   round 2 of 3, cell 2 of 2, about {duration(15 + 20 + FRESH_START_S)} left: b",
        "trainperf: noise round 3 of 3 (2 cells, in a fresh process)",
        f"trainperf:   round 3 of 3, about {duration(20 + FRESH_START_S)} left: 2 cells in a fresh process",
        "trainperf: noise rounds done in 46 s",
    ]
    assert progress.estimate("a") == 5.0 and progress.left(3, ["a", "b"], fresh=True) == pytest.approx(26.0)


def test_live_rewrites_one_line_and_erases_it_keeping_the_round_lines() -> None:
    lines: list[str] = []
    live: list[str] = []
    progress = RoundsProgress([2], 2, {"a": 1.0}, lines.append, live.append, clock=Clock())
    progress.round(2, ["a"], fresh=False)
    progress.cell("a")
    progress.cell_done("a", 1.0)
    progress.round_done()
    progress.finish()
    assert lines == ["trainperf: noise round 2 of 2 (1 cell)", "trainperf: noise rounds done in 0 s"]
    assert live == ["trainperf:   round 2 of 2, cell 1 of 1, about 1 s left: a", ""]  # then erased


def test_no_round_ran_no_closing_line() -> None:
    lines: list[str] = []
    RoundsProgress([2, 3], 3, {}, lines.append, clock=Clock()).finish()
    assert lines == []


CELLS = """
import torch

def test_timed(trainperf):
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    trainperf.run(lambda: layer(x), iters=6, warmup=1)

def test_recorded(trainperf):
    with open("recorded.log", "a") as fh:
        fh.write("called\\n")
    trainperf.record("accuracy", 0.9, higher_is_better=True)
"""


def test_quiet_update_prints_full_lines_after_the_dots_and_runs_no_record_only_cell_again(
        pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_threads = 1\n")
    pytester.makepyfile(test_quiet=CELLS)
    result = pytester.runpytest("-q", "--trainperf-update-baselines", "--trainperf-rounds=2")
    result.assert_outcomes(passed=2)
    out = result.stdout.lines
    assert ".." in out  # the dots line ended before trainperf's lines (it was glued to the first one)
    result.stdout.fnmatch_lines(["..",
                                 "trainperf: noise round 2 of 2 (1 cell)",
                                 "trainperf:   round 2 of 2, cell 1 of 1, about * left: test_quiet.py::test_timed",
                                 "trainperf: noise rounds done in * s"])
    assert (pytester.path / "recorded.log").read_text() == "called\n"  # record-only: measured in round 1 only
