"""Session results as JSON: what ``--trainperf-json`` writes and ``python -m pytest_trainperf`` reads.

One document per session (or per merge of shards); the layout is documented in
``docs/results-format.md``::

    {
      "format": "pytest-trainperf results",
      "schema": 1,
      "summary": {"cells": 12, "regressed": 1, "unchanged": 11},
      "cells": [
        {"nodeid": ..., "test_file": ..., "test": ..., "cell": ..., "axes": [[name, [values]]],
         "status": "regressed", "environment": "<fingerprint key>",
         "fingerprint": {<Fingerprint fields>},
         "verdict": {"measurement": {<Measurement fields>, "metrics": [{<Metric fields>}]},
                     "metrics": [{<MetricVerdict fields>}], "missing": [...]},
         "elsewhere": [...]}],
      "baseline_changes": [{<BaselineChange fields>}],
      "errors": [...],
      "warnings": [...]
    }

Every record is written field by field from its dataclass (:func:`dataclasses.fields`) and read back
the same way from its type hints, so a field added to ``Metric``, ``MetricVerdict`` or ``Fingerprint``
travels without an edit here. Enums are written as their values, tuples as lists, infinities and NaN
as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (JSON has none). ``status``, ``environment`` and
``summary`` are derived, for readers such as ``jq``; they are ignored when read. A reader ignores
unknown keys; a change a reader of this schema would misread bumps :data:`SCHEMA_VERSION`.

The reader is total: whatever a file holds (a ``NaN`` literal, an overflowing ``1e400``, a
5000-digit integer, nesting 100,000 deep) or whatever the path is (a directory, a FIFO, a missing
file) gives a :class:`ResultsError` naming the file, never another exception and never a wait.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pytest_trainperf.records import BaselineChange, FigureVerdict, Scalar, Status, finite_number
from pytest_trainperf.records import CellResult as CellResult  # a result file's cell record, re-exported
from pytest_trainperf.store import UnreadableFile, dumps, load_json, read_text, write_atomic

FORMAT = "pytest-trainperf results"
"""The ``format`` marker that tells our result files from any other JSON."""
SCHEMA_VERSION = 1
"""The schema this version writes; files with a higher one are refused."""
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""How non-finite floats are written (JSON has no infinity)."""

Axes = tuple[tuple[str, tuple[Scalar, ...]], ...]
"""A grid's axes in declaration order."""

T = TypeVar("T")

NAMED_CELLS = 3
"""The cells a note names before it counts the rest (``a, b, c and 4 more``)."""


def name_cells(nodeids: Sequence[str], shown: int = NAMED_CELLS) -> str:
    """The cells a note is about, the first ``shown`` by node id and a count of the others:
    ``t.py::a, t.py::b, t.py::c and 4 more``."""
    named = ", ".join(nodeids[:shown])
    rest = len(nodeids) - shown
    return f"{named} and {rest} more" if rest > 0 else named


class ResultsError(Exception):
    """A result file that cannot be used: names the file and what is wrong with it."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class SessionResults:
    """Everything a session (or a merge of shards) concluded."""

    cells: tuple[CellResult, ...]
    """Every cell measured, in the order they concluded."""
    changes: tuple[BaselineChange, ...] = ()
    """Baseline values rewritten by ``--trainperf-update-baselines``."""
    errors: tuple[str, ...] = ()
    """Baseline files that could not be written."""
    warnings: tuple[str, ...] = ()
    """Things that make some metrics unsound (e.g. more busy threads than cores)."""
    figures: tuple[FigureVerdict, ...] = ()
    """Figures derived from whole grids (``tp.relative``, ``tp.scaling``) and their verdicts."""
    against: str = ""
    """What the cells were compared with when not their stored baselines: ``--trainperf-against``'s
    git revision, e.g. ``main (1a2b3c4d5e6f), in lockstep``; empty: the stored baselines."""

    @property
    def machine(self) -> MachineComparison | None:
        """How this runner's step times compared with the stored baselines', and what side-by-side
        confirmation found; None when no cell was timed against a stored baseline."""
        return None if self.against else compare_machine(self.cells)

    @property
    def counts(self) -> dict[Status, int]:
        """Cells per status, every status present."""
        counts = {status: 0 for status in Status}
        for c in self.cells:
            counts[c.verdict.status] += 1
        return counts


@dataclass(frozen=True)
class MachineComparison:
    """How a session's step times compared with their stored baselines: this runner against theirs."""

    cells: int
    """Cells timed against a stored baseline."""
    median: float
    """The median of their step-time changes (stored baseline -> now, relative; +0.24: 24% slower)."""
    quartiles: tuple[float, float]
    """The interquartile range of those changes."""
    confirmed: tuple[tuple[str, int, int], ...] = ()
    """Per revision confirmed against: ``(revision, timing cells confirmed side by side, regressed)``."""

    def describe(self) -> str:
        """``this runner ran 41 cells 24.0% slower than their baselines (median; interquartile +17.0% to
        +31.0%); 45 timing cells confirmed side by side against 0e20a21: 0 regressed``."""
        from pytest_trainperf.records import format_change

        way = "slower" if self.median > 0 else "faster"
        text = (f"this runner ran {self.cells} cell{'s' * (self.cells != 1)} {abs(self.median):.1%} {way} than their "
                f"baselines (median; interquartile {format_change(self.quartiles[0])} to "
                f"{format_change(self.quartiles[1])})")
        for revision, count, regressed in self.confirmed:
            text += (f"; {count} timing cell{'s' * (count != 1)} confirmed side by side against {revision}: "
                     f"{regressed} regressed")
        return text


def compare_machine(cells: Sequence[CellResult]) -> MachineComparison | None:
    """The :class:`MachineComparison` of cells judged against stored baselines."""
    import statistics

    changes: list[float] = []
    confirmed: dict[str, list[bool]] = {}
    for c in cells:
        verdict = c.verdict
        stored = {m.name: m for m in verdict.metrics}
        stored.update({m.name: m for m in verdict.screen})
        step = stored.get("step_time")
        if step is not None and step.change is not None and step.baseline is not None:
            changes.append(step.change)
        if verdict.confirmed_against:
            confirmed.setdefault(verdict.confirmed_against, []).append(bool(verdict.regressions))
    if not changes:
        return None
    q1, _, q3 = statistics.quantiles(changes, n=4) if len(changes) > 1 else (changes[0],) * 3
    return MachineComparison(cells=len(changes), median=statistics.median(changes), quartiles=(q1, q3),
                             confirmed=tuple((r, len(v), sum(v)) for r, v in confirmed.items()))


class Ledger:
    """What a session has concluded so far: the one mutable collection of its results.

    The session adds to it as cells conclude; the consumers of results (the outputs, the xdist
    integration, an isolated child's report to its parent) read it with :meth:`snapshot` and, on an
    xdist controller or a parent, add what a worker or a child concluded with :meth:`absorb`.
    """

    def __init__(self) -> None:
        self.cells: list[CellResult] = []
        self.changes: list[BaselineChange] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.figures: list[FigureVerdict] = []
        self.notes: dict[str, list[str]] = {}
        """One-line notes (no NVML, no peak FLOP/s for the device), each printed once, in order, with
        the cells each one concerns (:meth:`note_lines`)."""
        self.against = ""
        """What the cells were compared with when not their stored baselines (see :class:`SessionResults`)."""

    def note(self, text: str, cells: Sequence[str] = ()) -> None:
        """Keep a one-line note (once), about ``cells`` (node ids): the same note from several cells
        is one line naming them all."""
        named = self.notes.setdefault(text, [])
        named += [c for c in cells if c not in named and c not in text]  # a cell the text names is named

    def note_lines(self) -> list[str]:
        """The notes as printed: each once, naming its cells (the first few and a count)."""
        return [f"{text} ({len(cells)} cell{'s' * (len(cells) != 1)}: {name_cells(cells)})" if cells else text
                for text, cells in self.notes.items()]

    def warn(self, text: str) -> None:
        """Keep a warning (once)."""
        if text not in self.warnings:
            self.warnings.append(text)

    def snapshot(self, warnings: Sequence[str] = ()) -> SessionResults:
        """The results so far as a plain record; ``warnings`` go before the ledger's own."""
        return SessionResults(cells=tuple(self.cells), changes=tuple(self.changes), errors=tuple(self.errors),
                              warnings=_unique([*warnings, *self.warnings]), figures=tuple(self.figures),
                              against=self.against)

    def absorb(self, other: SessionResults) -> None:
        """Add what another process (an xdist worker, an isolated child) concluded."""
        self.cells += other.cells
        self.changes += other.changes
        self.errors += other.errors
        self.figures += other.figures
        for warning in other.warnings:
            self.warn(warning)

    def clear(self) -> None:
        """Forget everything concluded (a worker whose results now belong to its controller)."""
        self.cells.clear()
        self.changes.clear()
        self.errors.clear()
        self.warnings.clear()
        self.figures.clear()


# --------------------------------------------------------------------------- writing


def _plain(value: object) -> Any:
    """A value as JSON: dataclasses field by field, enums by value, tuples as lists, inf as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def to_json(results: SessionResults) -> dict[str, Any]:
    """The JSON document of a session's results."""
    cells = []
    for c in results.cells:
        doc = _plain(c)
        doc["status"] = c.verdict.status.value
        doc["environment"] = c.fingerprint.key
        cells.append(doc)
    summary: dict[str, Any] = {"cells": len(results.cells)}
    summary.update({s.value: n for s, n in results.counts.items() if n})
    machine = results.machine
    if machine is not None:
        summary["machine"] = {"cells": machine.cells, "median_change": machine.median,
                              "quartiles": list(machine.quartiles), "text": machine.describe(),
                              "confirmed": [{"against": r, "cells": n, "regressed": k}
                                            for r, n, k in machine.confirmed]}
    return {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "summary": summary,
        "cells": cells,
        "baseline_changes": _plain(results.changes),
        "errors": list(results.errors),
        "warnings": list(results.warnings),
        "figures": _plain(results.figures),
        "against": results.against,
    }


def dump(results: SessionResults) -> str:
    """The text of a result file: stable key order, number lists on one line."""
    return dumps(to_json(results)) + "\n"


def write(path: Path, results: SessionResults) -> None:
    """Write a result file atomically. Raises OSError when the file cannot be written (``path`` is a
    directory, its folder is not writable) and :class:`ResultsError` when a value has no JSON form."""
    try:
        text = dump(results)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ResultsError(str(path), f"not written: a value has no JSON form ({exc})") from None
    write_atomic(path, text)


# --------------------------------------------------------------------------- CSV

CSV_COLUMNS = ("nodeid", "test_file", "test", "cell", "environment", "cell_status", "outcome", "metric",
               "unit", "direction", "value", "baseline", "change", "interval_low", "interval_high",
               "tolerance", "status", "info")
"""The header of ``--trainperf-csv``: one row per cell and metric (docs/results-format.md)."""


def _csv_number(value: float | None) -> str:
    """A number as CSV text: ``repr`` (round-trips exactly), ``inf``/``-inf``/``nan``, empty for None."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))


def csv_rows(results: SessionResults) -> list[tuple[str, ...]]:
    """The rows of ``--trainperf-csv``, header first: one per cell and metric verdict (``loss_curve``
    included), in the order the cells concluded; a cell with no metric (out of memory before anything
    was measured) has one row with an empty ``metric``. ``info`` is the cell's metadata
    (``trainperf.info``) as a JSON object, empty when it gave none."""
    import json

    rows: list[tuple[str, ...]] = [CSV_COLUMNS]
    for c in results.cells:
        verdict = c.verdict
        m = verdict.measurement
        info = json.dumps(dict(m.info), sort_keys=False) if m.info else ""
        head = (c.nodeid, c.test_file, c.test, c.cell, c.fingerprint.key, verdict.status.value, m.outcome.value)
        if not verdict.metrics:
            rows.append((*head, *([""] * (len(CSV_COLUMNS) - len(head) - 1)), info))
        for v in verdict.metrics:
            low, high = v.interval if v.interval is not None else (None, None)
            rows.append((*head, v.name, v.unit, v.direction.value, _csv_number(v.current), _csv_number(v.baseline),
                         _csv_number(v.change), _csv_number(low), _csv_number(high), _csv_number(v.tolerance),
                         v.status.value, info))
    return rows


def write_csv(path: Path, results: SessionResults) -> None:
    """Write ``--trainperf-csv`` atomically (:func:`csv_rows`). Raises OSError when it cannot be written."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(csv_rows(results))
    write_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------- reading


class _Mismatch(Exception):
    """A value that does not have its field's type: where, what was expected, what came."""

    def __init__(self, where: str, expected: str, got: object) -> None:
        super().__init__(f"at {where}: expected {expected}, got {got!r:.120}")


def _convert(hint: Any, value: object, where: str) -> Any:
    """``value`` read from JSON as the type ``hint`` (a dataclass, enum, tuple, union or scalar)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        exact = [a for a in args if a is type(value)]
        for arg in exact + [a for a in args if a is not type(None) and a not in exact]:
            try:
                return _convert(arg, value, where)
            except _Mismatch:
                continue
        raise _Mismatch(where, " or ".join(getattr(a, "__name__", str(a)) for a in args), value)
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch(where, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch(where, f"a list of {len(args)}", value)
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise _Mismatch(where, f"one of {[e.value for e in hint]}", value) from None
    if hint is float:
        if finite_number(value):
            return float(value)  # type: ignore[arg-type]
        if isinstance(value, str) and value in NON_FINITE:
            return NON_FINITE[value]
        raise _Mismatch(where, 'a finite number, "inf", "-inf" or "nan"', value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(where, "an integer", value)
    if hint in (str, bool):
        if type(value) is hint:
            return value
        raise _Mismatch(where, f"a {hint.__name__}", value)
    raise _Mismatch(where, f"a value of type {hint}", value)  # pragma: no cover - a field type not handled


def _build(cls: type[T], raw: object, where: str) -> T:
    """An instance of the dataclass ``cls`` from its JSON object, field by field."""
    if not isinstance(raw, dict):
        raise _Mismatch(where, "an object", raw)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Mismatch(where, f"a field {f.name!r}", sorted(raw))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise _Mismatch(where, f"a valid {cls.__name__} ({exc})", raw) from None


def from_json(source: str, doc: object) -> SessionResults:
    """Read a result document; raise :class:`ResultsError` naming ``source`` and what is wrong."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ResultsError(source, f'not a pytest-trainperf result file (no "format": "{FORMAT}")')
    schema = doc.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise ResultsError(source, f"at schema: expected an integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise ResultsError(source, f"written by a newer pytest-trainperf (schema {schema}, this version "
                                   f"reads up to {SCHEMA_VERSION}); upgrade pytest-trainperf")
    try:
        cells = _convert(tuple[CellResult, ...], doc.get("cells"), "cells")
        changes = _convert(tuple[BaselineChange, ...], doc.get("baseline_changes", []), "baseline_changes")
        errors = _convert(tuple[str, ...], doc.get("errors", []), "errors")
        warnings = _convert(tuple[str, ...], doc.get("warnings", []), "warnings")
        figures = _convert(tuple[FigureVerdict, ...], doc.get("figures", []), "figures")
        against = _convert(str, doc.get("against", ""), "against")
    except _Mismatch as exc:
        raise ResultsError(source, str(exc)) from None
    return SessionResults(cells=cells, changes=changes, errors=errors, warnings=warnings, figures=figures,
                          against=against)


def loads(source: str, text: str) -> SessionResults:
    """Parse the text of a result file."""
    try:
        doc, literals = load_json(text)
    except ValueError as exc:
        raise ResultsError(source, str(exc)) from None
    parsed = from_json(source, doc)
    if literals:  # in a place the reader ignores (the others were refused there, by name)
        raise ResultsError(source, f'holds the literal {literals[0]}, which JSON does not have; result files '
                                   'write non-finite numbers as the strings "inf", "-inf" and "nan"')
    return parsed


def read(path: Path) -> SessionResults:
    """Read a result file (a symbolic link to one is followed)."""
    try:
        text = read_text(path, follow_symlinks=True)
    except FileNotFoundError:
        raise ResultsError(str(path), "cannot be read (no such file)") from None
    except UnreadableFile as exc:
        raise ResultsError(str(path), str(exc)) from None
    return loads(str(path), text)


# --------------------------------------------------------------------------- joining


def merge(parts: Sequence[tuple[str, SessionResults]]) -> SessionResults:
    """Join the results of shards, in order; raise :class:`ResultsError` when one cell of one
    environment comes twice (the shards overlap: which result holds is not ours to pick)."""
    seen: dict[tuple[str, str, str, str], str] = {}
    cells: list[CellResult] = []
    for source, part in parts:
        for c in part.cells:
            if c.key in seen:
                raise ResultsError(source, f"{c.nodeid} (environment {c.fingerprint.key}) is also in "
                                           f"{seen[c.key]}; expected shards with distinct cells")
            seen[c.key] = source
            cells.append(c)
    return SessionResults(
        cells=tuple(cells),
        changes=tuple(ch for _, part in parts for ch in part.changes),
        errors=_unique(e for _, part in parts for e in part.errors),
        warnings=_unique(w for _, part in parts for w in part.warnings),
        figures=tuple(f for _, part in parts for f in part.figures),
        against="; ".join(_unique(part.against for _, part in parts if part.against)),
    )


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
