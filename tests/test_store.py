"""Baseline files on disk: round trips, the stable text, refusals and atomic writes."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_trainperf import store
from pytest_trainperf.records import (
    BaselineChange,
    Direction,
    Figure,
    FigureKind,
    Fingerprint,
    Measurement,
    Metric,
    check_finite,
)
from pytest_trainperf.store import BaselineError, baseline_path, read, update

CPU = Fingerprint(device="Test CPU 9000", device_type="cpu", torch="2.4.0", cuda=None, threads=4,
                  cpu="Test CPU 9000", python="3.12.1", platform="linux-x86_64")
CPU_8 = Fingerprint(device="Test CPU 9000", device_type="cpu", torch="2.4.0", cuda=None, threads=8,
                    cpu="Test CPU 9000", python="3.12.1", platform="linux-x86_64")

LOCK_WAIT_POLLS = 2400
"""Polls, 50 ms apart, for the concurrent writers to block on the lock (a bound for a slow start)."""

STEP_SAMPLES = (0.0123, 0.0125, 0.0121, 0.0130, 0.0124)
CURVE = (2.302585, 2.1, 1.875, 1.5000001)


def train_cell(step_time: float = 0.0124, cell: str = "batch_size=4-lr=0.001-name=tiny-amp=True") -> Measurement:
    """A trained cell."""
    return Measurement(
        test="TestLM::test_step",
        cell=cell,
        params=(("batch_size", 4), ("lr", 0.001), ("name", "tiny"), ("amp", True)),
        metrics=(
            Metric("flops", 1.5e9, "FLOP"),
            Metric("loss", 1.5000001, "", Direction.EXACT),
            Metric("peak_memory", 12.0 * 2**20, "B"),
            Metric("step_time", step_time, "s", Direction.LOWER_IS_BETTER, STEP_SAMPLES),
            Metric("throughput", 4 / step_time, "items/s", Direction.HIGHER_IS_BETTER,
                   tuple(4 / s for s in STEP_SAMPLES)),
        ),
        loss_curve=CURVE,
        kind="train",
        steps=5,
        warmup=2,
    )


def run_cell() -> Measurement:
    return Measurement(
        test="test_infer",
        cell="default",
        params=(),
        metrics=(Metric("flops", 3e6, "FLOP"), Metric("step_time", 0.002, "s", samples=(0.002, 0.0021, 0.0019))),
        kind="run",
        steps=3,
        warmup=1,
    )


def record_cell() -> Measurement:
    return Measurement(
        test="test_eval",
        cell="split=val",
        params=(("split", "val"),),
        metrics=(Metric("accuracy", 0.875, "", Direction.HIGHER_IS_BETTER, tolerance=0.02),
                 Metric("val.loss", 0.4, "nats")),
        kind="record",
    )


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_sorted_keys(text: str) -> None:
    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys)
        return dict(pairs)

    json.loads(text, object_pairs_hook=check)


# --------------------------------------------------------------------------- round trip


def test_round_trip_gives_back_equal_measurements(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    cells = [train_cell(), run_cell(), record_cell()]

    update(path, CPU, cells)
    baselines = read(path)

    for m in cells:
        assert baselines.lookup(CPU.key, m.test, m.cell) == m
    assert baselines.environments[CPU.key].fingerprint == CPU
    assert baselines.lookup(CPU_8.key, "test_infer", "default") is None
    assert baselines.lookup(CPU.key, "test_infer", "nope") is None


def test_round_trip_keeps_param_types(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [train_cell()])

    stored = read(path).lookup(CPU.key, "TestLM::test_step", train_cell().cell)

    assert stored is not None
    assert [(k, type(v)) for k, v in stored.params] == [("batch_size", int), ("lr", float), ("name", str),
                                                         ("amp", bool)]


def test_round_trip_keeps_measurement_order(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    measured = Measurement(test="test_a", cell="default", params=(),
                           metrics=(Metric("step_time", 0.01, "s"), Metric("peak_memory", 1024.0, "B"),
                                    Metric("flops", 1e6, "FLOP")))
    update(path, CPU, [measured])

    stored = read(path).lookup(CPU.key, "test_a", "default")

    assert stored is not None
    assert stored.names == ("step_time", "peak_memory", "flops")
    assert stored == measured


def test_an_infinite_recorded_tolerance_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "test_eval.json"
    measured = Measurement(test="test_eval", cell="default", params=(),
                           metrics=(Metric("accuracy", 0.9, tolerance=math.inf),), kind="record")

    update(path, CPU, [measured])

    assert read(path).lookup(CPU.key, "test_eval", "default") == measured


def test_a_missing_file_reads_as_empty(tmp_path: Path) -> None:
    baselines = read(tmp_path / "absent.json")

    assert baselines.environments == {}
    assert baselines.lookup(CPU.key, "test_a", "default") is None


# --------------------------------------------------------------------------- the file text


def test_file_text_is_stable_and_reviewable(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [train_cell(), run_cell()])
    text = path.read_text(encoding="utf-8")

    assert_sorted_keys(text)
    assert text.startswith('{\n  "environments": {\n'
                           f'    {json.dumps(CPU.key)}: {{\n'
                           '      "fingerprint": {\n        "compute_capability": "",\n'
                           '        "cpu": "Test CPU 9000",\n')
    assert text.endswith("\n}\n")
    assert all((len(line) - len(line.lstrip(" "))) % 2 == 0 for line in text.splitlines())
    assert f'"samples": {json.dumps(list(STEP_SAMPLES))},\n' in text
    assert f'"loss_curve": {json.dumps(list(CURVE))},\n' in text
    assert '"params": [["batch_size", 4], ["lr", 0.001], ["name", "tiny"], ["amp", true]],\n' in text


def test_writing_the_same_content_twice_is_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [train_cell(), run_cell()])
    first = path.read_bytes()

    changes = update(path, CPU, [run_cell(), train_cell()])

    assert path.read_bytes() == first
    assert changes == []


def test_two_environments_live_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [train_cell(), run_cell()])
    before = read(path)

    update(path, CPU_8, [train_cell(step_time=0.02)])
    after = read(path)

    assert set(after.environments) == {CPU.key, CPU_8.key}
    assert after.environments[CPU.key] == before.environments[CPU.key]
    assert after.environments[CPU_8.key].fingerprint == CPU_8
    assert after.lookup(CPU_8.key, "TestLM::test_step", train_cell().cell) == train_cell(step_time=0.02)
    assert after.lookup(CPU_8.key, "test_infer", "default") is None


def test_updating_a_subset_of_cells_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    other = train_cell(cell="batch_size=8")
    update(path, CPU, [train_cell(), other, run_cell()])

    update(path, CPU, [train_cell(step_time=0.015)])
    after = read(path)

    assert after.lookup(CPU.key, "TestLM::test_step", train_cell().cell) == train_cell(step_time=0.015)
    assert after.lookup(CPU.key, "TestLM::test_step", "batch_size=8") == other
    assert after.lookup(CPU.key, "test_infer", "default") == run_cell()


def test_update_reports_changed_metrics_only(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"

    first = update(path, CPU, [run_cell()], display_path="baselines/test_lm.json")

    assert first == [
        BaselineChange(path="baselines/test_lm.json", test="test_infer", cell="default", metric="flops",
                       old=None, new=3e6, unit="FLOP"),
        BaselineChange(path="baselines/test_lm.json", test="test_infer", cell="default", metric="step_time",
                       old=None, new=0.002, unit="s"),
    ]

    changed = Measurement(test="test_infer", cell="default", params=(),
                          metrics=(Metric("flops", 3e6, "FLOP"), Metric("step_time", 0.003, "s"),
                                   Metric("peak_memory", 4096.0, "B")),
                          kind="run")
    second = update(path, CPU, [changed])

    assert second == [
        BaselineChange(path=str(path), test="test_infer", cell="default", metric="step_time",
                       old=0.002, new=0.003, unit="s"),
        BaselineChange(path=str(path), test="test_infer", cell="default", metric="peak_memory",
                       old=None, new=4096.0, unit="B"),
    ]


def test_a_missing_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "baselines" / "examples" / "test_lm.json"

    update(path, CPU, [run_cell()])

    assert read(path).lookup(CPU.key, "test_infer", "default") == run_cell()
    assert files_in(path.parent) == ["test_lm.json"]


def test_baseline_path_mirrors_the_test_file(tmp_path: Path) -> None:
    assert baseline_path(tmp_path, "examples/test_lm.py") == tmp_path / "examples" / "test_lm.json"
    assert baseline_path(tmp_path, "test_top.py") == tmp_path / "test_top.json"


# --------------------------------------------------------------------------- refusals


def _ours(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": store.FORMAT, "schema": store.SCHEMA_VERSION, "environments": {}}
    doc.update(overrides)
    return doc


def _with_cell(cell: dict[str, Any]) -> str:
    env = {"fingerprint": {"device": "d", "device_type": "cpu", "torch": "2.4.0", "cuda": None, "threads": 1,
                           "cpu": "c"},
           "tests": {"test_a": {"default": cell}}}
    return json.dumps(_ours(environments={"k": env}))


BAD_FILES = {
    "invalid-json": ("{\"format\": ", "not valid JSON"),
    "no-format-marker": (json.dumps({"schema": 1, "environments": {}}), "not a pytest-trainperf baseline file"),
    "foreign-format": (json.dumps(_ours(format="something else")), "not a pytest-trainperf baseline file"),
    "a-list": ("[1, 2, 3]", "not a pytest-trainperf baseline file"),
    "newer-schema": (json.dumps(_ours(schema=store.SCHEMA_VERSION + 1)),
                     f"newer pytest-trainperf (schema {store.SCHEMA_VERSION + 1}"),
    "schema-not-int": (json.dumps(_ours(schema="1")), "at schema: expected an integer, got '1'"),
    "string-in-samples": (
        _with_cell({"metrics": {"step_time": {"value": 0.01, "samples": [0.01, "fast"]}}}),
        "at environments['k'].tests.test_a.default.metrics.step_time.samples: expected a list of finite numbers, "
        "got [0.01, 'fast']",
    ),
    "bad-direction": (
        _with_cell({"metrics": {"flops": {"value": 1.0, "direction": "sideways"}}}),
        "at environments['k'].tests.test_a.default.metrics.flops.direction: expected one of",
    ),
    "bool-value": (
        _with_cell({"metrics": {"flops": {"value": True}}}),
        "at environments['k'].tests.test_a.default.metrics.flops.value: expected a finite number, got True",
    ),
    "bad-kind": (
        _with_cell({"metrics": {}, "kind": "bench"}),
        "at environments['k'].tests.test_a.default.kind: expected one of ['train', 'run', 'record'], got 'bench'",
    ),
    "null-in-loss-curve": (
        _with_cell({"metrics": {}, "loss_curve": [1.0, None]}),
        "at environments['k'].tests.test_a.default.loss_curve: expected a list of finite numbers",
    ),
    "bad-outcome": (
        _with_cell({"metrics": {}, "outcome": "exploded"}),
        "at environments['k'].tests.test_a.default.outcome: expected one of ['measured', 'oom', 'oom-emulated', "
        "'oom-killed', 'oom-forecast'], got 'exploded'",
    ),
    "bad-fingerprint": (
        json.dumps(_ours(environments={"k": {"fingerprint": {"device": "d"}, "tests": {}}})),
        "at environments['k'].fingerprint:",
    ),
    # ---- what no writer of ours writes (issue 18): named by file, environment, cell and field
    "nan-flops": (
        _with_cell({"metrics": {"flops": {"value": math.nan}}}),
        "at environments['k'].tests.test_a.default.metrics.flops.value: expected a finite number, got NaN",
    ),
    "infinity-literal": (
        _with_cell({"metrics": {"flops": {"value": math.inf}}}),
        "metrics.flops.value: expected a finite number, got Infinity",
    ),
    "overflowing-number": (
        _with_cell({"metrics": {"flops": {"value": 1.0}}}).replace('"value": 1.0', '"value": 1e400'),
        "metrics.flops.value: expected a finite number, got inf",
    ),
    "huge-integer": (
        _with_cell({"metrics": {"flops": {"value": 10**400}}}),
        "metrics.flops.value: expected a finite number",
    ),
    "nan-sample": (
        _with_cell({"metrics": {"step_time": {"value": 0.01, "samples": [0.01, math.nan]}}}),
        "at environments['k'].tests.test_a.default.metrics.step_time.samples: expected a list of finite numbers, "
        "got [0.01, NaN]",
    ),
    "negative-sample": (
        _with_cell({"metrics": {"step_time": {"value": 0.01, "samples": [0.01, -0.01]}}}),
        "at environments['k'].tests.test_a.default.metrics.step_time.samples[1]: expected a finite positive "
        "number, got -0.01",
    ),
    "zero-sample": (
        _with_cell({"metrics": {"step_time": {"value": 0.01, "samples": [0.0, 0.01]}}}),
        "metrics.step_time.samples[0]: expected a finite positive number, got 0.0",
    ),
    "zero-round": (
        _with_cell({"metrics": {"step_time": {"value": 0.01, "rounds": [0.01, 0.0]}}}),
        "metrics.step_time.rounds[1]: expected a finite positive number, got 0.0",
    ),
    "negative-tolerance": (
        _with_cell({"metrics": {"acc": {"value": 0.5, "tolerance": -0.1}}}),
        "metrics.acc.tolerance: expected a non-negative number",
    ),
    "nan-in-loss-curve": (
        _with_cell({"metrics": {}, "loss_curve": [1.0, math.nan]}),
        "at environments['k'].tests.test_a.default.loss_curve: expected a list of finite numbers",
    ),
    "unit-not-a-string": (
        _with_cell({"metrics": {"acc": {"value": 0.5, "unit": 5}}}),
        "metrics.acc.unit: expected a string, got 5",
    ),
    "list-valued-param": (
        _with_cell({"metrics": {}, "params": [["shape", [1, 2]]]}),
        "at environments['k'].tests.test_a.default.params[0] (shape): expected a string, a bool or a finite "
        "number, got [1, 2]",
    ),
    "nan-param": (
        _with_cell({"metrics": {}, "params": [["lr", math.nan]]}),
        "params[0] (lr): expected a string, a bool or a finite number, got NaN",
    ),
    "order-of-numbers": (
        _with_cell({"metrics": {"a": {"value": 1.0}}, "order": [1, "a"]}),
        "at environments['k'].tests.test_a.default.order: expected the metric names",
    ),
    "nan-threads": (
        json.dumps(_ours(environments={"k": {"fingerprint": {"device": "d", "device_type": "cpu", "torch": "t",
                                                             "cuda": None, "threads": math.nan, "cpu": "c"},
                                             "tests": {}}})),
        "at environments['k'].fingerprint.threads: expected a non-negative integer, got NaN",
    ),
    "nan-in-an-ignored-key": (json.dumps(_ours(note=math.nan)), "holds the literal NaN"),
    "nan-figure": (
        json.dumps(_ours(environments={"k": {
            "fingerprint": {"device": "d", "device_type": "cpu", "torch": "t", "cuda": None, "threads": 1,
                            "cpu": "c"},
            "tests": {},
            "figures": {"test_a": {"f": {"kind": "scaling", "value": 1.0, "points": [[1, math.nan]]}}}}})),
        "at environments['k'].figures.test_a.f.points: expected a list of [x, y] pairs",
    ),
    "figure-without-its-names": (
        json.dumps(_ours(environments={"k": {
            "fingerprint": {"device": "d", "device_type": "cpu", "torch": "t", "cuda": None, "threads": 1,
                            "cpu": "c"},
            "tests": {}, "figures": {"test_a": {"f": {"kind": "scaling", "value": 1.0, "coefficient": 1e400}}}}})),
        "at environments['k'].figures.test_a.f.coefficient: expected a finite number or null, got Infinity",
    ),
    "nested-100000-deep": ("[" * 100_000 + "]" * 100_000, "nested deeper than the reader follows"),
    "a-5000-digit-integer": ('{"schema": ' + "9" * 5000 + "}", "a number too long to read"),
}


@pytest.mark.parametrize(("text", "reason"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_an_unusable_file_raises_baseline_error_naming_path_and_place(tmp_path: Path, text: str,
                                                                      reason: str) -> None:
    path = tmp_path / "test_lm.json"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(BaselineError) as info:
        read(path)

    assert str(info.value).startswith(f"{path}: ")
    assert reason in str(info.value)
    assert info.value.path == path


@pytest.mark.parametrize("text", [text for text, _ in BAD_FILES.values()], ids=list(BAD_FILES))
def test_update_never_writes_over_an_unusable_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "test_lm.json"
    path.write_text(text, encoding="utf-8")
    original = path.read_bytes()

    with pytest.raises(BaselineError):
        update(path, CPU, [run_cell()])

    assert path.read_bytes() == original
    assert files_in(tmp_path) == ["test_lm.json"]


def test_a_file_that_is_not_utf8_raises_baseline_error(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    path.write_bytes(b"\xff\xfe{}")

    with pytest.raises(BaselineError, match="cannot be read"):
        read(path)


# --------------------------------------------------------------------------- atomicity


def test_a_failed_replace_leaves_the_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [run_cell()])
    original = path.read_bytes()

    def refuse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pytest_trainperf.store.os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        update(path, CPU, [train_cell()])

    assert path.read_bytes() == original
    assert files_in(tmp_path) == ["test_lm.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "test_lm.json"

    def refuse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr("pytest_trainperf.store.os.replace", refuse)
    with pytest.raises(OSError, match="read-only"):
        update(path, CPU, [run_cell()])

    assert files_in(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o644, 0o664, 0o600])
def test_an_update_keeps_the_file_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [run_cell()])
    path.chmod(mode)

    update(path, CPU, [train_cell()])

    assert path.stat().st_mode & 0o777 == mode


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_new_file_gets_the_umask_mode_not_the_temp_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    umask = os.umask(0o022)
    try:
        update(path, CPU, [run_cell()])
    finally:
        os.umask(umask)

    assert path.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- no pytest, no torch


PURE_MODULES = [
    "pytest_trainperf.records",
    "pytest_trainperf.units",
    "pytest_trainperf.stats",
    "pytest_trainperf.paired",
    "pytest_trainperf.derived",
    "pytest_trainperf.judge",
    "pytest_trainperf.store",
    "pytest_trainperf.results",
    "pytest_trainperf.report.heatmap",
    "pytest_trainperf.report.figures",
    "pytest_trainperf.report.summary",
    "pytest_trainperf.report.markdown",
    "pytest_trainperf.report.plots",
    "pytest_trainperf.cli",
]


def _imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_neither_pytest_nor_torch(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text(encoding="utf-8")

    assert _imported_roots(source).isdisjoint({"pytest", "_pytest", "torch"})


def test_pure_modules_load_neither_pytest_nor_torch_in_a_fresh_interpreter() -> None:
    """What the source check cannot see: what importing each module loads (its package's ``__init__``
    and every module it imports in turn), in a fresh interpreter, one module after the other."""
    import subprocess
    import sys

    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    importlib.import_module(name)\n"
              "    loaded = sorted(m for m in ('pytest', '_pytest', 'torch') if m in sys.modules)\n"
              "    print(name, *loaded)\n")
    done = subprocess.run([sys.executable, "-c", script, *PURE_MODULES], capture_output=True, text=True,
                          check=True)

    assert done.stdout.splitlines() == PURE_MODULES  # each line: the module, then nothing it should not load


def test_the_plugin_loads_no_heavy_library() -> None:
    """The plugin loads in every pytest run of an environment, and in every side-by-side worker: loading
    it must not load torch, scipy (1.1 s of the 1.7 s it once took), rich or matplotlib."""
    import subprocess
    import sys

    script = ("import sys\nimport pytest_trainperf.plugin\n"
              "print(*sorted(m for m in ('torch', 'scipy', 'rich', 'matplotlib') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert done.stdout.strip() == ""


def test_the_import_check_sees_nested_imports() -> None:
    source = "def f():\n    import torch.nn\n    from _pytest import fixtures\n"

    assert _imported_roots(source) == {"torch", "_pytest"}


def _lock_waiters(directory: Path) -> int:
    """Processes blocked in ``flock`` on ``directory`` right now (Linux's ``/proc/locks``: ``->`` lines)."""
    inode = f":{os.stat(directory).st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if " -> " in line and "FLOCK" in line and inode in line)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see the writers wait")
def test_concurrent_updates_of_one_file_lose_no_cell(tmp_path: Path) -> None:
    """Four processes each write their own cells into one file: while the test holds the file's lock,
    all four are seen blocked on it (so their updates certainly overlap) and none has written; once
    it is released, every cell of every writer survives."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "baselines" / "test_x.json"
    path.parent.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from pytest_trainperf.records import Fingerprint, Measurement, Metric
        from pytest_trainperf.store import update
        worker = int(sys.argv[1])
        fp = Fingerprint(device="cpu", device_type="cpu", torch="2", cuda=None, threads=1, cpu="cpu")
        for i in range(10):
            cell = Measurement(test="test_x", cell=f"w{{worker}}-{{i}}", params=(),
                               metrics=(Metric("flops", float(i)),))
            update(Path({str(path)!r}), fp, [cell])
    """)
    procs = []
    try:
        with store.locked(path):
            procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in range(4)]
            for _ in range(LOCK_WAIT_POLLS):  # a bound, not a timing: the writers import, then block
                if _lock_waiters(path.parent) == 4 or any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.05)
            assert _lock_waiters(path.parent) == 4  # all four wait for the lock this test holds
            assert not path.exists()  # and none of them wrote past it
        assert all(p.wait(timeout=120) == 0 for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    (env,) = read(path).environments.values()
    assert sorted(cell for _, cell in env.cells) == sorted(f"w{w}-{i}" for w in range(4) for i in range(10))
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_x.json"]


def test_an_out_of_memory_cell_round_trips_with_its_outcome(tmp_path: Path) -> None:
    from pytest_trainperf.records import Outcome

    path = tmp_path / "test_lm.json"
    oom = Measurement(test="test_train", cell="batch_size=64", params=(("batch_size", 64),), metrics=(),
                      outcome=Outcome.OOM, detail="OutOfMemoryError: CUDA out of memory")
    emulated = Measurement(test="test_train", cell="batch_size=32", params=(("batch_size", 32),),
                           metrics=(Metric("peak_memory", 3.0 * 2**30, "B"),), outcome=Outcome.OOM_EMULATED,
                           detail="peak memory 3.00 GiB exceeds the memory budget of 2.00 GiB")

    update(path, CPU, [oom, emulated, train_cell()])

    baselines = read(path)
    assert baselines.lookup(CPU.key, "test_train", "batch_size=64") == oom
    assert baselines.lookup(CPU.key, "test_train", "batch_size=32") == emulated
    assert '"outcome": "oom"' in path.read_text() and '"outcome": "measured"' not in path.read_text()


def test_a_crashed_cell_is_never_written(tmp_path: Path) -> None:
    from pytest_trainperf.records import Outcome

    path = tmp_path / "test_lm.json"
    crashed = Measurement(test="test_train", cell="default", params=(), metrics=(), outcome=Outcome.CRASHED,
                          detail="crashed: died of SIGSEGV")

    update(path, CPU, [crashed, train_cell()])

    assert read(path).lookup(CPU.key, "test_train", "default") is None
    assert '"crashed"' not in path.read_text()


# --------------------------------------------------------------------------- bad input (issue 18)


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "test_lm.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "elsewhere.json").write_text(store.dumps(store.to_json(store.BaselineFile(path))))
        path.symlink_to(tmp_path / "elsewhere.json")
    return path


@pytest.mark.parametrize(("kind", "reason"), [("fifo", "is a FIFO (named pipe), not a regular file"),
                                              ("directory", "is a directory, not a regular file"),
                                              ("symlink", "is a symbolic link, not a regular file")])
def test_what_is_no_regular_file_is_refused_by_name_and_never_waited_on(tmp_path: Path, kind: str,
                                                                        reason: str) -> None:
    path = _special(tmp_path, kind)

    with pytest.raises(BaselineError, match=f"^{re.escape(f'{path}: {reason}')}"):
        read(path)  # a FIFO with no writer would block a plain open() forever
    with pytest.raises(BaselineError, match=re.escape(reason)):
        update(path, CPU, [run_cell()])

    assert files_in(tmp_path) == sorted(["test_lm.json"] + (["elsewhere.json"] if kind == "symlink" else []))


def test_check_finite_names_each_field_that_json_cannot_hold() -> None:
    bad = dataclasses.replace(
        train_cell(),
        params=(("lr", math.inf),),
        metrics=(Metric("loss", math.nan, "", Direction.EXACT),
                 Metric("step_time", 0.01, "s", samples=(0.01, math.nan, -1.0), rounds=(0.0,)),
                 Metric("acc", 0.5, tolerance=math.nan)),
        loss_curve=(2.0, math.inf),
        items_per_step=math.nan,
    )

    assert check_finite(bad) == [
        "params[0] (lr): expected a string, a bool or a finite number, got inf",
        "metrics.loss.value: expected a finite number, got nan",
        "metrics.step_time.samples[1]: expected a finite positive number, got nan",
        "metrics.step_time.rounds[0]: expected a finite positive number, got 0.0",
        "metrics.acc.tolerance: expected a non-negative number, infinity or None, got nan",
        "loss_curve[1]: expected a finite number, got inf",
        "items_per_step: expected a finite positive number or None, got nan",
    ]
    assert check_finite(train_cell()) == []
    assert check_finite(record_cell()) == []  # an infinite tolerance is stored as "inf"
    assert check_finite(dataclasses.replace(record_cell(), metrics=(Metric("x", 1.0, tolerance=math.inf),))) == []


@pytest.mark.parametrize("unit", [5, None, b"s"])
def test_a_metric_unit_that_is_not_a_string_is_refused_when_the_metric_is_made(unit: object) -> None:
    with pytest.raises(TypeError, match=r"metric 'x': expected the unit to be a string such as 's' or '', got"):
        Metric("x", 1.0, unit)  # type: ignore[arg-type]


def test_one_non_finite_cell_costs_no_other_cell_its_baseline(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    diverged = dataclasses.replace(train_cell(cell="lr=1"), metrics=(Metric("loss", math.nan, "", Direction.EXACT),),
                                   loss_curve=(2.0, math.nan))

    done = store.update_file(path, CPU, [train_cell(), diverged, run_cell()], "baselines/test_lm.json")

    assert done.refused == ("baselines/test_lm.json: TestLM::test_step [lr=1]: not stored: "
                            "metrics.loss.value: expected a finite number, got nan; "
                            "loss_curve[1]: expected a finite number, got nan",)
    assert done.refused_cells == (("TestLM::test_step", "lr=1"),)
    stored = read(path)
    assert stored.lookup(CPU.key, "TestLM::test_step", train_cell().cell) == train_cell()
    assert stored.lookup(CPU.key, "test_infer", "default") == run_cell()
    assert stored.lookup(CPU.key, "TestLM::test_step", "lr=1") is None
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_update_raises_a_named_error_after_writing_the_good_cells(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    infinite = dataclasses.replace(run_cell(), cell="big", metrics=(Metric("flops", math.inf, "FLOP"),))

    with pytest.raises(store.CellsRefused, match=r"1 cell not stored \(the other cells were\): .*test_infer \[big\]: "
                                                 r"not stored: metrics.flops.value: expected a finite number, got inf"
                       ) as info:
        update(path, CPU, [train_cell(), infinite])

    assert isinstance(info.value, BaselineError)
    assert [c.cell for c in info.value.done.changes if c.metric == "flops"] == [train_cell().cell]
    assert read(path).lookup(CPU.key, "TestLM::test_step", train_cell().cell) == train_cell()


def test_a_non_finite_derived_figure_is_not_stored_and_named(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    good = Figure(kind=FigureKind.SCALING, metric="step_time", axis="n", cell="default", reference="n",
                  value=1.0, points=((1.0, 1.0), (2.0, 2.0)))
    bad = dataclasses.replace(good, metric="flops", value=math.nan)

    done = store.update_file(path, CPU, [run_cell()], derive=lambda cells: {"test_infer": [good, bad]})

    assert read(path).figures(CPU.key, "test_infer") == (good,)
    assert len(done.refused) == 1
    assert "test_infer: figure flops ~ n^b: not stored: value: expected a finite number, got nan" in done.refused[0]
    assert done.refused_cells == ()


def test_a_killed_writer_leaves_a_recognisable_temp_file_that_the_next_update_removes(tmp_path: Path) -> None:
    path = tmp_path / "test_lm.json"
    update(path, CPU, [run_cell()])
    stale = tmp_path / f".test_lm.json{store.TEMP_MARK}abc123"  # what write_atomic names its temp file
    stale.write_text('{"half": ')
    old = os.stat(path).st_mtime - 60
    os.utime(stale, (old, old))
    other = tmp_path / f".test_other.json{store.TEMP_MARK}abc123"  # another file's: not ours to remove
    other.write_text("{")
    os.utime(other, (old, old))

    done = store.update_file(path, CPU, [train_cell()], "baselines/test_lm.json")

    assert done.notes == (f"baselines/test_lm.json: removed 1 temporary file left by an interrupted update "
                          f"({stale.name})",)
    assert files_in(tmp_path) == sorted(["test_lm.json", other.name])
    assert store.update_file(path, CPU, [train_cell()]).notes == ()


def test_write_atomic_names_its_temp_file_after_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def stop(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(os.path.basename(src))
        raise OSError("killed")

    monkeypatch.setattr("pytest_trainperf.store.os.replace", stop)
    with pytest.raises(OSError):
        store.write_atomic(tmp_path / "test_lm.json", "{}")

    assert len(seen) == 1 and seen[0].startswith(f".test_lm.json{store.TEMP_MARK}")
    assert store.temp_files(tmp_path / "test_lm.json") == []


@pytest.mark.parametrize(("test_file", "expected"), [
    ("examples/test_lm.py", "examples/test_lm.json"),
    ("./a/../test_top.py", "test_top.json"),
    ("../other/test_o.py", "_outside/_up/other/test_o.json"),
    ("../../other/test_o.py", "_outside/_up/_up/other/test_o.json"),
    ("a/../../other/test_o.py", "_outside/_up/other/test_o.json"),
    ("/srv/suite/test_o.py", "_outside/_root/srv/suite/test_o.json"),
])
def test_a_baseline_path_always_stays_inside_the_baselines_directory(tmp_path: Path, test_file: str,
                                                                     expected: str) -> None:
    path = baseline_path(tmp_path / "baselines", test_file)

    assert path == tmp_path / "baselines" / expected
    assert os.path.normpath(path).startswith(str(tmp_path / "baselines") + os.sep)


@pytest.mark.parametrize("test_file", ["", ".", "..", "a/.."])
def test_a_baseline_path_of_no_file_is_refused(tmp_path: Path, test_file: str) -> None:
    with pytest.raises(ValueError, match="expected the path of a test file"):
        baseline_path(tmp_path, test_file)
