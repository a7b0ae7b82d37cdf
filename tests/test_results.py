"""Result files, the Markdown report and the pure parts of the xdist integration, without pytest runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from results_schema import validate_results

from pytest_trainperf import results
from pytest_trainperf.cli import compare
from pytest_trainperf.distributed import oversubscription, worker_device
from pytest_trainperf.records import (
    BaselineChange,
    CellVerdict,
    Direction,
    Fingerprint,
    Measurement,
    Metric,
    MetricVerdict,
    Outcome,
    Status,
)
from pytest_trainperf.report.markdown import render_markdown
from pytest_trainperf.stats import judge

CPU = Fingerprint(device="Test CPU", device_type="cpu", torch="2.4.0", cuda=None, threads=1, cpu="Test CPU",
                  malloc="glibc-fixed", python="3.12.1", platform="linux-x86_64")
GPU = dataclasses.replace(CPU, device="H100", device_type="cuda", cuda="12.4")
AXES = (("batch_size", (4, 8)), ("name", ("tiny", "a|b")))
BASE = (0.010, 0.0101, 0.0099, 0.0100, 0.0102, 0.0098)


def measurement(batch_size: int, name: str, scale: float = 1.0, memory: float = 2.0**20) -> Measurement:
    samples = tuple(s * scale for s in BASE)
    return Measurement(
        test="test_mlp", cell=f"batch_size={batch_size}-name={name}",
        params=(("batch_size", batch_size), ("name", name)),
        metrics=(Metric("step_time", sorted(samples)[3], "s", Direction.LOWER_IS_BETTER, samples),
                 Metric("peak_memory", memory, "B"),
                 Metric("loss", 0.5, "", Direction.EXACT),
                 Metric("reserved_memory", memory, "B", tolerance=math.inf)),
        loss_curve=(1.0, 0.75, 0.5), steps=6, warmup=1)


def record(m: Measurement, verdict: CellVerdict, fingerprint: Fingerprint = CPU) -> results.CellResult:
    return results.CellResult(nodeid=f"tests/test_x.py::test_mlp[{m.cell}]", test_file="tests/test_x.py",
                              test="test_mlp", cell=m.cell, axes=AXES, verdict=verdict, fingerprint=fingerprint)


def session(scale: float = 1.0, memory: float = 2.0**20, fingerprint: Fingerprint = CPU) -> results.SessionResults:
    cells = []
    for b, n in [(4, "tiny"), (4, "a|b"), (8, "tiny")]:
        now = measurement(b, n, scale if b == 8 else 1.0, memory)
        cells.append(record(now, judge(now, measurement(b, n)), fingerprint))
    return results.SessionResults(
        cells=tuple(cells), changes=(BaselineChange("baselines/test_x.json", "test_mlp", "batch_size=4-name=tiny",
                                                    "loss", None, 0.5),),
        warnings=("a warning",))


# ------------------------------------------------------------------ the JSON schema


def test_a_session_round_trips_through_its_json() -> None:
    original = session(scale=3.0)
    text = results.dump(original)
    validate_results(json.loads(text))
    assert results.loads("r.json", text) == original


def test_every_field_of_the_records_is_written_generically() -> None:
    doc = results.to_json(session(scale=3.0))
    cell = doc["cells"][2]
    assert set(cell["verdict"]["metrics"][0]) == {f.name for f in dataclasses.fields(MetricVerdict)}
    assert set(cell["verdict"]["measurement"]["metrics"][0]) == {f.name for f in dataclasses.fields(Metric)}
    assert cell["status"] == "regressed" and cell["environment"] == CPU.key
    step = cell["verdict"]["metrics"][0]
    assert step["name"] == "step_time" and step["status"] == "regressed" and len(step["interval"]) == 2
    assert cell["verdict"]["measurement"]["metrics"][0]["samples"] == pytest.approx([s * 3 for s in BASE])
    assert cell["verdict"]["metrics"][3]["tolerance"] == "inf"  # JSON has no infinity
    assert doc["summary"] == {"cells": 3, "regressed": 1, "unchanged": 2}


def test_a_field_added_to_a_record_flows_through_without_an_edit() -> None:
    @dataclasses.dataclass(frozen=True)
    class Extended:
        name: str
        status: Status
        detectable: float | None = None
        rounds: tuple[float, ...] = ()

    value = Extended("step_time", Status.IMPROVED, 0.05, (1.0, math.inf))
    doc = results._plain(value)
    assert doc == {"name": "step_time", "status": "improved", "detectable": 0.05, "rounds": [1.0, "inf"]}
    assert results._convert(Extended, doc, "x") == value
    assert results._convert(Extended, {"name": "x", "status": "new"}, "x") == Extended("x", Status.NEW)


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda d: d.update(format="other"), 'not a pytest-trainperf result file (no "format"'),
    (lambda d: d.update(schema=2), "written by a newer pytest-trainperf (schema 2, this version reads up to 1)"),
    (lambda d: d["cells"][0]["verdict"]["metrics"][0].update(status="worse"),
     "at cells[0].verdict.metrics[0].status: expected one of ['regressed', 'improved', 'unchanged', 'new'], "
     "got 'worse'"),
    (lambda d: d["cells"][0]["verdict"]["measurement"]["metrics"][0].update(samples="fast"),
     "at cells[0].verdict.measurement.metrics[0].samples: expected a list, got 'fast'"),
    (lambda d: d["cells"][0]["fingerprint"].pop("torch"), "at cells[0].fingerprint: expected a field 'torch'"),
])
def test_an_unusable_result_file_is_refused_naming_where(edit, reason: str) -> None:  # type: ignore[no-untyped-def]
    doc = results.to_json(session())
    edit(doc)
    with pytest.raises(results.ResultsError) as info:
        results.from_json("shard.json", doc)
    assert str(info.value).startswith("shard.json: ")
    assert reason in info.value.reason


def test_merge_joins_shards_and_refuses_a_cell_measured_twice() -> None:
    cpu, gpu = session(), session(fingerprint=GPU)
    merged = results.merge([("cpu.json", cpu), ("gpu.json", gpu)])
    assert merged.cells == cpu.cells + gpu.cells
    assert merged.warnings == ("a warning",) and len(merged.changes) == 2
    with pytest.raises(results.ResultsError, match=r"again\.json: tests/test_x.py::test_mlp\[batch_size=4-name=tiny\] "
                                                   r"\(environment cpu \| .*\) is also in cpu\.json"):
        results.merge([("cpu.json", cpu), ("again.json", cpu)])


def test_diff_judges_new_cells_against_the_same_cells_of_old() -> None:
    old, new = session(), session(scale=3.0, memory=2.0**21)
    compared = compare(old, new)
    statuses = [c.verdict.status for c in compared.cells]
    assert statuses == [Status.REGRESSED] * 3  # peak memory doubled everywhere
    step = compared.cells[2].verdict.metric("step_time")
    assert step is not None and step.status is Status.REGRESSED and step.change == pytest.approx(2.0)
    elsewhere = compare(old, session(fingerprint=GPU))
    assert {c.verdict.status for c in elsewhere.cells} == {Status.NEW}


# ------------------------------------------------------------------ Markdown


def test_markdown_legend_names_the_outcomes_present() -> None:
    plain = render_markdown(session(), show=("step_time",))
    assert "OOM*" not in plain.splitlines()[-1]
    over = dataclasses.replace(measurement(8, "a|b"), outcome=Outcome.OOM_EMULATED, detail="over the budget")
    found = session()
    found = dataclasses.replace(found, cells=(*found.cells, record(over, judge(over, None))))
    legend = render_markdown(found, show=("step_time",)).splitlines()[-1]
    assert legend.endswith("n/a not measured. OOM* over the memory budget (emulated).")


def test_markdown_puts_regressions_first_and_lays_out_the_grid() -> None:
    text = render_markdown(session(scale=3.0), show=("step_time",), hint="pytest --trainperf-update-baselines")
    lines = text.splitlines()
    assert lines[:3] == ["## pytest-trainperf", "", "**3 cells measured**: 1 regressed, 2 unchanged"]
    assert text.index("### Regressions") < text.index("#### `tests/test_x.py::test_mlp` · step_time (ms)")
    assert "- `tests/test_x.py::test_mlp[batch_size=8-name=tiny]` on `cpu | Test CPU | torch 2.4.0" in text
    assert "  - step_time: baseline 10.0 ms, now 30.0 ms, change +200%" in text
    table = lines[lines.index("#### `tests/test_x.py::test_mlp` · step_time (ms)") + 2:][:4]
    assert table == ["| batch_size \\\\ name | tiny | a\\|b |",
                     "| --- | ---: | ---: |",
                     "| 4 | 10.0 +0.0% <br>[-2,+3] ≥+14% | 10.0 +0.0% <br>[-2,+3] ≥+14% |",
                     "| 8 | 30.0 +200% **REGR** <br>[+194,+207] ≥+14% | — |"]
    assert "> **Warning:** a warning" in text
    assert "| baselines/test_x.json | test_mlp | batch_size=4-name=tiny | loss | — | 0.5 | new |" in text


# ------------------------------------------------------------------ workers


@pytest.mark.parametrize(("worker", "expected"), [
    (None, "cuda:0"), ("gw0", "cuda:0"), ("gw1", "cuda:1"), ("gw2", "cuda:2"), ("gw3", "cuda:0"), ("main", "cuda:0"),
])
def test_worker_n_gets_the_nth_device_modulo_the_list(worker: str | None, expected: str) -> None:
    assert worker_device(("cuda:0", "cuda:1", "cuda:2"), worker) == expected


def test_oversubscription_names_the_unsound_and_the_sound_metrics() -> None:
    assert oversubscription(2, 1, 4) is None
    assert oversubscription(1, 2, 2) is None  # one process using every core: the plugin's own choice at most
    assert oversubscription(4, 1, None) is None
    assert oversubscription(2, 1, 2) is not None  # two workers and no core left free
    warning = oversubscription(4, 1, 2)
    assert warning is not None and warning.startswith("4 pytest-xdist workers x 1 measuring thread on 2 CPU cores")
    assert "step_time and throughput are unsound" in warning and "flops, peak_memory, loss" in warning


def test_a_written_result_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "out" / "r.json"
    results.write(path, session())
    assert results.read(path) == session()
    with pytest.raises(results.ResultsError, match="cannot be read"):
        results.read(tmp_path / "missing.json")
