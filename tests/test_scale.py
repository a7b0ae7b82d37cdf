"""What a cheap cell does not pay (issue 18, scale): a test that can only ``record`` takes no memory
snapshot (a scan of every object of the process), and an update's noise rounds re-run timed cells only.
The cost itself is measured in ``benchmarks/scale.py``, not here."""

from __future__ import annotations

import json

import pytest
import torch  # noqa: F401  (loaded before pytester's in-process runs, as conftest.py expects)

from pytest_trainperf.fixture import records_only


def only_records(trainperf, n):  # type: ignore[no-untyped-def]
    for k in range(n):
        trainperf.record(f"m{k}", k)


def trains(trainperf):  # type: ignore[no-untyped-def]
    trainperf.train(lambda: None, steps=3)


def hands_it_on(trainperf):  # type: ignore[no-untyped-def]
    print(trainperf)


def captures_it(trainperf):  # type: ignore[no-untyped-def]
    return lambda: trainperf.record("x", 1)


def renames_it(trainperf):  # type: ignore[no-untyped-def]
    other = trainperf
    other.train(lambda: None, steps=3)


def reads_its_frame(trainperf):  # type: ignore[no-untyped-def]
    locals()["trainperf"].train(lambda: None, steps=3)


def by_name(trainperf):  # type: ignore[no-untyped-def]
    getattr(trainperf, "train")(lambda: None, steps=3)  # noqa: B009  (the point: no attribute access)


def no_fixture(request):  # type: ignore[no-untyped-def]
    pass


class TestA:
    def test_m(self, trainperf):  # type: ignore[no-untyped-def]
        trainperf.record("a", 1)


@pytest.mark.parametrize(("function", "expected"), [
    (only_records, True), (TestA().test_m, True),
    (trains, False), (hands_it_on, False), (captures_it, False), (renames_it, False), (reads_its_frame, False),
    (by_name, False), (no_fixture, False), (len, False),
])
def test_only_a_test_that_can_do_nothing_but_record_skips_the_snapshot(function: object, expected: bool) -> None:
    assert records_only(function, "trainperf") is expected


MIXED = """
import torch
import pytest_trainperf as tp

KEPT = torch.zeros(1 << 16)  # 256 KiB alive before every cell: never part of a cell's peak


@tp.grid(kind=["record", "train"])
def test_mixed(trainperf, kind):
    if kind == "record":
        trainperf.record("accuracy", 0.5)
        return
    x = torch.ones(1024)  # 4 KiB, made by the test before its step: part of the peak

    def step():
        return (x * 2).sum()

    trainperf.train(step, steps=3, warmup=1)


def test_record_only(trainperf):
    trainperf.record("accuracy", 0.25)
"""


def test_an_update_re_runs_timed_cells_only_and_peaks_leave_out_what_was_alive_before(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_work=MIXED)
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=2", "--trainperf-json=r.json")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*trainperf: noise round 2 of 2 (1 cell)*"])
    cells = {c["cell"]: c for c in json.loads((pytester.path / "r.json").read_text())["cells"]}
    metrics = {m["name"]: m["value"] for m in cells["kind=train"]["verdict"]["measurement"]["metrics"]}
    assert 4096 <= metrics["peak_memory"] < 1 << 16  # x counted, KEPT (alive before the cell) not
    assert {m["name"] for m in cells["default"]["verdict"]["measurement"]["metrics"]} == {"accuracy"}
