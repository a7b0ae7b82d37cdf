"""pytest-benchmark parity and the update's report (issue 17): ``trainperf.info`` metadata, the CSV export,
the first update's summary, the pooled value shown, notes that name their cells."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pytest_trainperf import results
from pytest_trainperf.records import (
    CellResult,
    CellVerdict,
    Direction,
    Fingerprint,
    Measurement,
    Metric,
    MetricVerdict,
    Status,
)

ONE_THREAD = "[pytest]\ntrainperf_threads = 1\n"

# A cheap timed cell with metadata, and a record-only cell with metadata.
CELLS = """
import math
import torch
import pytest_trainperf as tp

@tp.grid(width=[4, 8])
@tp.tolerance(step_time=math.inf)  # what is shown is under test, not a 1-round timing of a microsecond step
def test_step(trainperf, width):
    layer = torch.nn.Linear(width, width)
    x = torch.randn(2, width)
    trainperf.info(model="linear", width_given=width, deterministic=True)
    trainperf.info(note="a | pipe")  # given again: added; Markdown escapes the pipe
    trainperf.run(lambda: layer(x), iters=6, warmup=1)

def test_recorded(trainperf):
    trainperf.record("accuracy", 0.9, higher_is_better=True)
    trainperf.info(dataset="toy", rows=128, fraction=0.25)
"""


def rows_of(path: object) -> list[dict[str, str]]:
    with open(str(path), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_info_is_shown_in_json_csv_and_markdown_never_judged_nor_stored(pytester: pytest.Pytester) -> None:
    pytester.makeini(ONE_THREAD)
    pytester.makepyfile(test_meta=CELLS)
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=1").assert_outcomes(passed=3)
    stored = (pytester.path / "baselines" / "test_meta.json").read_text()
    assert "linear" not in stored and "toy" not in stored  # metadata is not stored with the baseline

    pytester.makepyfile(test_meta=CELLS.replace('dataset="toy"', 'dataset="other"'))  # changed: no verdict moves
    result = pytester.runpytest("--trainperf", "--trainperf-confirm-against=none", "--trainperf-json=out/r.json",
                                "--trainperf-csv=out/r.csv", "--trainperf-markdown=out/r.md")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["trainperf: CSV results: out/r.csv"])

    doc = json.loads((pytester.path / "out" / "r.json").read_text())
    info = {c["nodeid"]: c["verdict"]["measurement"]["info"] for c in doc["cells"]}
    assert info["test_meta.py::test_recorded"] == [["dataset", "other"], ["rows", 128], ["fraction", 0.25]]
    assert info["test_meta.py::test_step[width=4]"] == [["model", "linear"], ["width_given", 4],
                                                        ["deterministic", True], ["note", "a | pipe"]]
    read = results.read(pytester.path / "out" / "r.json")  # and read back, types kept
    assert dict(read.cells[0].verdict.measurement.info)["deterministic"] is True

    rows = rows_of(pytester.path / "out" / "r.csv")
    assert list(rows[0]) == list(results.CSV_COLUMNS)
    by = {(r["nodeid"], r["metric"]): r for r in rows}
    accuracy = by["test_meta.py::test_recorded", "accuracy"]
    assert (accuracy["value"], accuracy["baseline"], accuracy["change"], accuracy["status"]) == \
        ("0.9", "0.9", "0.0", "unchanged")
    assert accuracy["direction"] == "higher" and accuracy["cell_status"] == "unchanged"
    assert json.loads(accuracy["info"]) == {"dataset": "other", "rows": 128, "fraction": 0.25}
    step = by["test_meta.py::test_step[width=8]", "step_time"]
    assert step["unit"] == "s" and float(step["value"]) > 0 and float(step["baseline"]) > 0
    low, high = float(step["interval_low"]), float(step["interval_high"])
    assert low <= float(step["change"]) <= high
    assert float(step["tolerance"]) > 0 and step["environment"] == doc["cells"][0]["environment"]
    metrics = {r["metric"] for r in rows if r["nodeid"] == "test_meta.py::test_step[width=8]"}
    assert {"step_time", "peak_memory", "flops", "ops"} <= metrics

    markdown = (pytester.path / "out" / "r.md").read_text()
    assert "### Cell metadata" in markdown
    assert ("| `test_meta.py::test_recorded` | dataset=`other`, rows=`128`, fraction=`0.25` |") in markdown
    assert "note=`a \\| pipe`" in markdown


@pytest.mark.parametrize(("call", "expected"), [
    ("trainperf.info(loss=float('nan'))", "*trainperf.info(loss=...): expected a string, a boolean, an integer or "
                                          "a finite float, got nan*"),
    ("trainperf.info(shape=[2, 3])", "*trainperf.info(shape=...): expected a string*got [[]2, 3[]]*"),
])
def test_info_refuses_what_it_cannot_show(pytester: pytest.Pytester, call: str, expected: str) -> None:
    pytester.makepyfile(test_bad_info=f"""
        def test_it(trainperf):
            {call}
    """)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([expected])


@pytest.mark.parametrize(("args", "ini", "expected"), [
    (["--trainperf-csv=results.txt"], "",
     "*--trainperf-csv*expected a file path ending in .csv such as results/trainperf.csv, got 'results.txt'*"),
    (["--trainperf-csv=out/"], "", "*--trainperf-csv*expected a file path ending in .csv*got 'out/'*"),
    ([], "trainperf_csv = table.tsv\n", "*ini option trainperf_csv (twin of --trainperf-csv): expected a file path "
                                        "ending in .csv*got 'table.tsv'*"),
    (["--trainperf-csv=same.csv", "--trainperf-markdown=same.csv"], "",
     "*--trainperf-markdown and --trainperf-csv both name *same.csv: expected two different files*"),
    (["--trainperf-csv=baselines/r.csv"], "", "*--trainperf-csv (*r.csv) is inside the baselines directory*"),
])
def test_a_bad_csv_path_is_refused_at_parse_time(pytester: pytest.Pytester, args: list[str], ini: str,
                                                 expected: str) -> None:
    pytester.makeini("[pytest]\n" + ini)
    pytester.makepyfile(test_nothing="def test_it():\n    pass\n")
    result = pytester.runpytest("--trainperf", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_csv_rows_keep_every_number_exactly_and_a_cell_without_metrics() -> None:
    env = Fingerprint(device="cpu", device_type="cpu", torch="2.13", cuda=None, threads=1, cpu="EPYC")
    timed = MetricVerdict("step_time", Status.REGRESSED, current=0.1 + 0.2, baseline=1 / 3, tolerance=0.1,
                          unit="s", change=-0.1, interval=(-0.2, 0.05))
    new = MetricVerdict("loss", Status.NEW, current=float("inf"), baseline=None, tolerance=0.002,
                        direction=Direction.EXACT)
    measured = Measurement(test="test_a", cell="default", params=(), metrics=(Metric("step_time", 0.3, "s"),),
                           info=(("run", "r1"),))
    empty = Measurement(test="test_b", cell="default", params=(), metrics=())
    session = results.SessionResults(cells=(
        CellResult("t.py::test_a", "t.py", "test_a", "default", (), CellVerdict(measured, (timed, new)), env),
        CellResult("t.py::test_b", "t.py", "test_b", "default", (), CellVerdict(empty, ()), env)))
    rows = list(csv.reader(io.StringIO("\n".join(",".join(r) for r in results.csv_rows(session)))))
    header, first, second, third = rows
    assert header == list(results.CSV_COLUMNS)
    row = dict(zip(header, first, strict=True))
    assert float(row["value"]) == 0.1 + 0.2 and float(row["baseline"]) == 1 / 3  # repr: exact round trip
    assert (row["interval_low"], row["interval_high"], row["status"]) == ("-0.2", "0.05", "regressed")
    assert json.loads(row["info"]) == {"run": "r1"}
    row = dict(zip(header, second, strict=True))
    assert (row["metric"], row["value"], row["baseline"], row["change"], row["status"]) == ("loss", "inf", "", "",
                                                                                           "new")
    row = dict(zip(header, third, strict=True))
    assert row["nodeid"] == "t.py::test_b" and row["metric"] == "" and row["outcome"] == "measured"


RECORDS = """
import pytest_trainperf as tp

@tp.grid(n=list(range(6)))
def test_rec(trainperf, n):
    trainperf.record("value", float(n))
    trainperf.record("other", 1.0)
"""


def test_the_first_update_counts_its_new_values_and_v_lists_them(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_first=RECORDS, test_second=RECORDS)
    result = pytester.runpytest("--trainperf-update-baselines")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["baselines updated: 24 values in 2 files, all new (-v lists them)",
                                 "baselines/test_first.json: 12 values in 6 cells, new",
                                 "baselines/test_second.json: 12 values in 6 cells, new"])
    assert "— ->" not in result.stdout.str()

    pytester.makepyfile(test_first=RECORDS.replace("float(n)", "float(n) + 1"))  # 6 changed values, a new cell
    second = RECORDS.replace("range(6)", "range(7)").replace('"other", 1.0', '"other", 1.0 + (n == 0)')
    pytester.makepyfile(test_second=second)  # 1 changed value, a new cell
    result = pytester.runpytest("--trainperf-update-baselines")
    result.assert_outcomes(passed=13)
    result.stdout.fnmatch_lines(["baselines updated: 9 values in 2 files (2 of new cells, counted: -v lists them)",
                                 "baselines/test_first.json", "  test_rec[[]n=1[]]", "    value  1 -> 2 *+100%",
                                 "baselines/test_second.json", "  test_rec[[]n=0[]]", "    other  1 -> 2 *+100%",
                                 "  test_rec[[]n=6[]]: 2 values, new"])

    (pytester.path / "baselines" / "test_second.json").unlink()
    result = pytester.runpytest("--trainperf-update-baselines", "-v")
    result.stdout.fnmatch_lines(["baselines updated: 14 values in 1 file, all new", "baselines/test_second.json",
                                 "  test_rec[[]n=0[]]", "    other  — -> 2  new", "    value  — -> 0  new"])


TIMED = """
import torch

def test_timed(trainperf):
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    trainperf.run(lambda: layer(x), iters=8, warmup=1)
"""


def test_an_update_reports_the_pooled_value_it_stores(pytester: pytest.Pytester) -> None:
    """The heatmap and the update table read the same value: the rounds pooled, as stored."""
    pytester.makeini(ONE_THREAD)
    pytester.makepyfile(test_pooled=TIMED)
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=2", "--trainperf-json=r.json")
    result.assert_outcomes(passed=1)
    (env,) = json.loads((pytester.path / "baselines" / "test_pooled.json").read_text())["environments"].values()
    stored = env["tests"]["test_timed"]["default"]["metrics"]["step_time"]
    assert len(stored["rounds"]) == 2
    (cell,) = json.loads((pytester.path / "r.json").read_text())["cells"]
    shown = {m["name"]: m for m in cell["verdict"]["metrics"]}["step_time"]
    assert shown["current"] == stored["value"]
    measured = {m["name"]: m for m in cell["verdict"]["measurement"]["metrics"]}["step_time"]
    assert measured["samples"] == stored["samples"] and measured["rounds"] == stored["rounds"]


def test_a_note_names_its_cells(pytester: pytest.Pytester) -> None:
    pytester.makeini(ONE_THREAD)
    pytester.makepyfile(test_short=TIMED + TIMED.replace("test_timed", "test_other"))
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=4", "--trainperf-max-time=1e-6")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["trainperf note: 2 cells got fewer than 4 measurement rounds (--trainperf-max-time="
                                 "1e-06 s per cell): * single round: test_short.py::test_timed, "
                                 "test_short.py::test_other"])


def test_the_same_note_from_many_cells_is_one_line_naming_the_first_few() -> None:
    ledger = results.Ledger()
    for n in range(5):
        ledger.note("no NVML: utilization not measured", [f"t.py::test[{n}]"])
    ledger.note("no NVML: utilization not measured", ["t.py::test[0]"])  # named once
    ledger.note("t.py::test[9]: measured alone", ["t.py::test[9]"])  # its text names it already
    ledger.note("a session-wide note")
    assert ledger.note_lines() == [
        "no NVML: utilization not measured (5 cells: t.py::test[0], t.py::test[1], t.py::test[2] and 2 more)",
        "t.py::test[9]: measured alone",
        "a session-wide note"]
