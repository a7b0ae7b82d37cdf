"""A structural check of result files (docs/results-format.md), shared by the pure and the pytester tests.

Hand-written rather than a JSON Schema file, so the tests need no extra dependency; the required keys
of each record come from its dataclass, so a field added there must reach the file too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pytest_trainperf.records import BaselineChange, Direction, Fingerprint, Metric, MetricVerdict, Status


def _keys(obj: Any, cls: type, where: str) -> None:
    assert isinstance(obj, dict), where
    names = {f.name for f in dataclasses.fields(cls)}
    assert names == set(obj), f"{where}: {sorted(names ^ set(obj))} differ from the {cls.__name__} fields"


def _number(value: Any, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool) or value in ("inf", "-inf", "nan"), \
        f"{where}: {value!r}"


def _numbers(values: Any, where: str) -> None:
    assert isinstance(values, list), where
    for i, v in enumerate(values):
        _number(v, f"{where}[{i}]")


def validate_results(doc: Any) -> None:
    """Assert that ``doc`` is a result document of schema 1."""
    assert isinstance(doc, dict)
    assert doc["format"] == "pytest-trainperf results"
    assert doc["schema"] == 1
    assert set(doc) >= {"summary", "cells", "baseline_changes", "errors", "warnings"}
    assert doc["summary"]["cells"] == len(doc["cells"])
    assert all(isinstance(e, str) for e in doc["errors"] + doc["warnings"])
    assert isinstance(doc.get("against", ""), str)
    for i, change in enumerate(doc["baseline_changes"]):
        _keys(change, BaselineChange, f"baseline_changes[{i}]")
    statuses = [s.value for s in Status]
    directions = [d.value for d in Direction]
    for i, cell in enumerate(doc["cells"]):
        where = f"cells[{i}]"
        assert set(cell) >= {"nodeid", "test_file", "test", "cell", "axes", "verdict", "fingerprint", "elsewhere",
                             "status", "environment"}, where
        assert cell["nodeid"].startswith(cell["test_file"] + "::"), where
        assert cell["status"] in statuses
        _keys(cell["fingerprint"], Fingerprint, f"{where}.fingerprint")
        for name, values in cell["axes"]:
            assert isinstance(name, str) and isinstance(values, list)
        verdict = cell["verdict"]
        measurement = verdict["measurement"]
        assert measurement["cell"] == cell["cell"] and measurement["test"] == cell["test"]
        assert all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in measurement["params"])
        _numbers(measurement["loss_curve"], f"{where}.loss_curve")
        for j, metric in enumerate(measurement["metrics"]):
            _keys(metric, Metric, f"{where}.metrics[{j}]")
            _number(metric["value"], f"{where}.metrics[{j}].value")
            _numbers(metric["samples"], f"{where}.metrics[{j}].samples")
            assert metric["direction"] in directions
        names = [m["name"] for m in measurement["metrics"]]
        for j, mv in enumerate(verdict["metrics"]):
            _keys(mv, MetricVerdict, f"{where}.verdicts[{j}]")
            assert mv["name"] in [*names, "loss_curve"] and mv["status"] in statuses  # the curve: a verdict only
            assert mv["baseline"] is None or _number(mv["baseline"], where) is None
            assert mv["interval"] is None or len(mv["interval"]) == 2
