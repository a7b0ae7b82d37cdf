"""``python -m pytest_trainperf`` on bad input: exit 2 with a one-line reason naming the file, never a
traceback (issue 18), and NaN values rendered as the result format documents them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_results import session
from test_store import CPU, train_cell

from pytest_trainperf import results, store
from pytest_trainperf.cli import EXIT_REGRESSED, EXIT_UNUSABLE, main


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "a.json"
    results.write(path, session())
    return path


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run the command; check it exits 2 with one line on stderr holding ``expected``."""
    assert main(argv) == EXIT_UNUSABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_merge_into_a_directory_is_refused(tmp_path: Path, shard: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()

    refused(capsys, ["merge", str(shard), "-o", str(out)],
            f"python -m pytest_trainperf merge: error: {out}: is a directory; expected the path of a file")
    assert os.listdir(out) == []


def test_merge_into_an_unwritable_path_is_refused(tmp_path: Path, shard: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a path under a regular file cannot be made, even by root

    refused(capsys, ["merge", str(shard), "-o", str(blocker / "all.json")],
            f"{blocker / 'all.json'}: cannot be written (")


def test_diff_markdown_to_an_unwritable_path_is_refused(tmp_path: Path, shard: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    refused(capsys, ["diff", str(shard), str(shard), "--markdown", str(blocker / "d.md")],
            "python -m pytest_trainperf diff: error: ", f"{blocker / 'd.md'}: cannot be written (")


UNREADABLE = {
    "nested-100000-deep": ("[" * 100_000 + "]" * 100_000, "not usable JSON: nested deeper than the reader follows"),
    "5000-digit-integer": ('{"format": "pytest-trainperf results", "schema": ' + "9" * 5000 + "}",
                           "not usable JSON: a number too long to read"),
    "nan-literal": (None, 'holds the literal NaN, which JSON does not have; result files write non-finite numbers '
                          'as the strings "inf", "-inf" and "nan"'),
    "nan-literal-in-a-field": (None, "at cells[0].verdict.measurement.metrics[0].value: expected a finite number, "
                                     '"inf", "-inf" or "nan", got NaN'),
    "overflowing-number": (None, "at cells[0].verdict.measurement.metrics[0].value: expected a finite number"),
}


def _unreadable(kind: str, good: str) -> str:
    text, _ = UNREADABLE[kind]
    if text is not None:
        return text
    doc = json.loads(good)
    if kind == "nan-literal":
        doc["unknown"] = float("nan")
    elif kind == "nan-literal-in-a-field":
        doc["cells"][0]["verdict"]["measurement"]["metrics"][0]["value"] = float("nan")
    else:
        doc["cells"][0]["verdict"]["measurement"]["metrics"][0]["value"] = "HUGE"
        return json.dumps(doc).replace('"HUGE"', "1e400")
    return json.dumps(doc)


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_a_result_file_that_no_writer_writes_is_refused_in_one_line(tmp_path: Path, shard: Path, kind: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(_unreadable(kind, shard.read_text()))

    refused(capsys, ["diff", str(bad), str(shard)], f"error: {bad}: {UNREADABLE[kind][1]}")
    refused(capsys, ["merge", str(shard), str(bad), "-o", str(tmp_path / "all.json")], f"{bad}: ")
    assert not (tmp_path / "all.json").exists()


@pytest.mark.parametrize(("kind", "reason"), [("fifo", "is a FIFO (named pipe), not a regular file"),
                                              ("directory", "is a directory, not a regular file")])
def test_a_result_path_that_is_no_file_is_refused_without_waiting(tmp_path: Path, shard: Path, kind: str, reason: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    os.mkfifo(bad) if kind == "fifo" else bad.mkdir()

    refused(capsys, ["diff", str(shard), str(bad)], f"{bad}: {reason}")


def _with_nan_samples(path: Path, out: Path) -> Path:
    """The documented way NaN is written in a result file: the string ``"nan"``."""
    doc = json.loads(path.read_text())
    for cell in doc["cells"]:
        for metric in cell["verdict"]["measurement"]["metrics"]:
            if metric["name"] in ("step_time", "loss"):
                metric["value"] = "nan"
                metric["samples"] = ["nan"] * len(metric["samples"])
    out.write_text(json.dumps(doc))
    return out


def test_diff_renders_nan_values_and_a_value_that_became_nan_regresses(tmp_path: Path, shard: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    nan = _with_nan_samples(shard, tmp_path / "nan.json")

    assert main(["diff", str(shard), str(nan), "--show", "step_time,loss"]) == EXIT_REGRESSED
    out = capsys.readouterr().out
    assert "3 cells measured: 3 regressed" in out
    assert "step_time: baseline 10.0 ms, now nan, change nan% (tolerance 10.0%)" in out
    assert "loss: baseline 0.5, now nan, change nan%" in out

    assert main(["diff", str(nan), str(nan)]) == 0
    assert "3 cells measured: 3 unchanged" in capsys.readouterr().out
    assert main(["diff", str(nan), str(shard)]) == 0
    assert "3 cells measured: 3 improved" in capsys.readouterr().out


def test_show_refuses_a_list_valued_parameter_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "test_lm.json"
    store.update(path, CPU, [train_cell()])
    path.write_text(path.read_text().replace('["batch_size", 4]', '["batch_size", [4, 8]]'))

    refused(capsys, ["show", str(path)], f"{path}: at environments[", ".params[0] (batch_size): expected a string, "
                                                                     "a bool or a finite number, got [4, 8]")


def test_show_of_a_fifo_is_refused_not_waited_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "test_lm.json"
    os.mkfifo(path)

    refused(capsys, ["show", str(path)], f"{path}: is a FIFO (named pipe), not a regular file")


def test_no_traceback_from_the_command_itself(tmp_path: Path, shard: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "pytest_trainperf", "merge", str(shard), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == EXIT_UNUSABLE
    assert done.stderr.splitlines() == [f"python -m pytest_trainperf merge: error: {out}: is a directory; "
                                        "expected the path of a file to write"]
