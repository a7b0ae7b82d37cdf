"""Baseline files: one JSON file per test file, keyed by environment, written atomically.

Layout of ``baselines/<test file path>.json`` (``baselines/examples/test_batch_scan.json`` for
``examples/test_batch_scan.py``)::

    {
      "format": "pytest-trainperf baselines",
      "schema": 1,
      "environments": {
        "<fingerprint key>": {
          "fingerprint": {"device": ..., "torch": ..., "threads": ..., ...},
          "tests": {
            "<test name>": {
              "<cell id>": {
                "params": [["batch_size", 4], ["seq_len", 16]],
                "kind": "train", "steps": 20, "warmup": 3,
                "loss_curve": [...],
                "source": {"commit": "<HEAD at the update>", "tree": "<the measured tree>"},
                "metrics": {"step_time": {"value": ..., "unit": "s", "direction": "lower",
                                          "samples": [...], "rounds": [...]}, ...}}}}}}}

``rounds`` (optional) holds the median of each measurement round of an update: the noise band.

An environment may also hold ``"figures": {"<test name>": {"<figure key>": {...}}}``: the figures
derived from the whole grid (``tp.relative``, ``tp.scaling``), recomputed from the file's cells at
every update so that they always agree with them.

Keys are sorted and number lists sit on one line, so a review diff shows one line per changed curve.
A file that cannot be parsed, is not ours, or has a newer schema raises :class:`BaselineError` and is
never written over. So does anything a writer would not have written: a non-finite number (a ``NaN``
or ``Infinity`` literal anywhere, an overflowing ``1e400``), a step-time sample that is not positive,
an integer past Python's digit limit, nesting deeper than the JSON reader follows, and a path that is
not a regular file (a directory, a FIFO, a symbolic link: nothing is opened that could block).

A test file outside the rootdir keeps its baselines inside the directory too, under ``_outside/``
(see :func:`baseline_path`).
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from pytest_trainperf.records import (
    BaselineChange,
    Breakdown,
    Direction,
    Figure,
    FigureKind,
    Fingerprint,
    Measurement,
    Metric,
    Outcome,
    Source,
    check_figure,
    check_finite,
    finite_number,
)

FORMAT = "pytest-trainperf baselines"
"""The ``format`` marker that tells our files from any other JSON."""
SCHEMA_VERSION = 1
"""The schema this version writes; files with a higher one are refused."""


INFINITE = "inf"
"""How an infinite tolerance (a report-only metric) is written: JSON has no infinity."""
KINDS = ("train", "run", "record")
"""How a cell was measured: a training step, an inference call, or only recorded metrics."""
MAX_FILE_BYTES = 256 * 2**20
"""The largest file the readers read (baselines and result files): far beyond any real one, and a
bound on the time and memory a stray file can cost."""
TEMP_MARK = ".trainperf-tmp-"
"""What the name of a temporary file of :func:`write_atomic` holds: ``.test_x.json.trainperf-tmp-<random>``,
recognisable by the sweep of the next update (:func:`sweep_temp_files`)."""
SHOWN_CHARS = 200
"""How much of a refused value a message shows (a refusal is one line, whatever the file holds)."""
OUTSIDE = "_outside"
"""The folder of the baselines directory that holds the baselines of test files outside the rootdir."""
UP = "_up"
"""How a leading ``..`` of such a test file's path is written under :data:`OUTSIDE`."""
ROOT = "_root"
"""How the root of an absolute test file path is written under :data:`OUTSIDE`."""


class BaselineError(Exception):
    """A baseline file that cannot be used: names the path and what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Environment:
    """The baselines of one environment inside one file."""

    fingerprint: Fingerprint
    """The environment."""
    cells: Mapping[tuple[str, str], Measurement] = field(default_factory=dict)
    """``(test, cell) -> measurement``."""
    figures: Mapping[str, tuple[Figure, ...]] = field(default_factory=dict)
    """``test -> the figures derived from its grid`` (``tp.relative``, ``tp.scaling``)."""


@dataclass(frozen=True)
class BaselineFile:
    """A parsed baseline file (empty when the file does not exist yet)."""

    path: Path
    """Where the file lives."""
    environments: Mapping[str, Environment] = field(default_factory=dict)
    """Fingerprint key -> that environment's baselines."""

    def lookup(self, env_key: str, test: str, cell: str) -> Measurement | None:
        """The stored measurement of one cell in one environment, or None."""
        env = self.environments.get(env_key)
        return None if env is None else env.cells.get((test, cell))

    def across_hosts(self, fingerprint: Fingerprint, test: str, cell: str) -> tuple[Fingerprint, Measurement] | None:
        """The stored measurement of one cell in an environment that differs from ``fingerprint`` only in
        the host's CPU model (:attr:`Fingerprint.across_hosts_key`), with that environment; the first by
        key when several do; None when none does."""
        wanted = fingerprint.across_hosts_key
        for key in sorted(self.environments):
            env = self.environments[key]
            if key != fingerprint.key and env.fingerprint.across_hosts_key == wanted and (test, cell) in env.cells:
                return env.fingerprint, env.cells[(test, cell)]
        return None

    def figures(self, env_key: str, test: str) -> tuple[Figure, ...]:
        """The stored figures of one test in one environment (empty when none)."""
        env = self.environments.get(env_key)
        return () if env is None else env.figures.get(test, ())


def baseline_path(baselines_dir: Path, test_file: str) -> Path:
    """The baseline file of a test file given relative to the rootdir (``a/test_x.py``): always
    inside ``baselines_dir``.

    A test file outside the rootdir (given as ``../other/test_o.py`` or as an absolute path) is kept
    under :data:`OUTSIDE`, each leading ``..`` written :data:`UP` and an absolute path's root
    :data:`ROOT`: ``../other/test_o.py`` -> ``_outside/_up/other/test_o.json``,
    ``/srv/t/test_o.py`` -> ``_outside/_root/srv/t/test_o.json``. Raises ValueError for a path that
    names no file (empty, ``.``, ``..``).
    """
    rel = PurePosixPath(os.path.normpath(test_file))
    parts = list(rel.parts)
    if rel.is_absolute():
        parts = [OUTSIDE, ROOT, *parts[1:]]
    elif parts and parts[0] == "..":
        up = 0
        while up < len(parts) and parts[up] == "..":
            up += 1
        parts = [OUTSIDE, *[UP] * up, *parts[up:]]
    if not parts or parts[-1] in (".", "..", UP, ROOT, OUTSIDE):
        raise ValueError(f"expected the path of a test file, got {test_file!r}")
    return baselines_dir.joinpath(*parts).with_suffix(".json")


# --------------------------------------------------------------------------- reading


def _expect(cond: bool, path: Path, where: str, expected: str, got: object) -> None:
    if not cond:
        raise BaselineError(path, f"at {where}: expected {expected}, got {got!r:.{SHOWN_CHARS}}")


class UnreadableFile(Exception):
    """What :func:`read_text` refuses to read: the reason, to be named with the path by the caller."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"  # pragma: no cover - every POSIX kind is listed


def read_text(path: Path, *, follow_symlinks: bool = False) -> str:
    """The UTF-8 text of the regular file at ``path``, read without ever blocking.

    Raises FileNotFoundError when nothing is there, and :class:`UnreadableFile` (with the reason)
    for anything else that is not a regular UTF-8 file of at most :data:`MAX_FILE_BYTES`: a
    directory, a FIFO (never opened, so never waited on), a device, a symbolic link (unless
    ``follow_symlinks``), a file that cannot be opened.
    """
    try:
        info = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise UnreadableFile(f"cannot be read ({exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile(f"is a {_kind(info.st_mode)}, not a regular file"
                     + ("; expected the file itself, not a link to it" if stat.S_ISLNK(info.st_mode) else ""))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UnreadableFile(f"cannot be read ({exc})") from None
    try:
        info = os.fstat(fd)  # what was opened, should the path have changed since the stat
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"is a {_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise UnreadableFile(f"is {info.st_size} bytes; expected at most {MAX_FILE_BYTES} bytes")
        chunks = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise UnreadableFile(f"grew past {MAX_FILE_BYTES} bytes while read")
    except OSError as exc:
        raise UnreadableFile(f"cannot be read ({exc})") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"cannot be read: not UTF-8 text ({exc})") from None


class NonFiniteLiteral:
    """A ``NaN``, ``Infinity`` or ``-Infinity`` literal met by :func:`load_json` (JSON has none: no
    writer of ours writes one). It is no number, so a field that expects one refuses it by name."""

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


def load_json(text: str) -> tuple[object, list[str]]:
    """The JSON document in ``text`` and the non-finite literals it holds (each read as a
    :class:`NonFiniteLiteral`). Raises ValueError with a reason for text that is not JSON, nests
    deeper than the reader follows, or holds an integer past Python's digit limit."""
    seen: list[str] = []

    def constant(literal: str) -> NonFiniteLiteral:
        seen.append(literal)
        return NonFiniteLiteral(literal)

    try:
        return json.loads(text, parse_constant=constant), seen
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("not usable JSON: nested deeper than the reader follows") from None
    except ValueError as exc:  # Python's limit on the digits of an integer (4300 by default)
        raise ValueError(f"not usable JSON: a number too long to read ({exc})") from None


def _number(value: object) -> bool:
    return finite_number(value)


def _checked(path: Path, where: str, problems: list[str]) -> None:
    """Refuse what a writer would not have written (:func:`check_finite`), naming the first problem."""
    if problems:
        field_where, _, reason = problems[0].partition(": ")
        raise BaselineError(path, f"at {where}.{field_where}: {reason}")


def _parse_metric(path: Path, where: str, name: str, raw: object) -> Metric:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    value = raw.get("value")
    _expect(_number(value), path, f"{where}.value", "a finite number", value)
    samples = raw.get("samples", [])
    _expect(isinstance(samples, list) and all(_number(s) for s in samples), path,
            f"{where}.samples", "a list of finite numbers", samples)
    rounds = raw.get("rounds", [])
    _expect(isinstance(rounds, list) and all(_number(r) for r in rounds), path,
            f"{where}.rounds", "a list of finite numbers", rounds)
    direction = raw.get("direction", "lower")
    valid = [d.value for d in Direction]
    _expect(direction in valid, path, f"{where}.direction", f"one of {valid}", direction)
    tolerance = raw.get("tolerance")
    _expect(tolerance is None or tolerance == INFINITE or (_number(tolerance) and tolerance >= 0), path,
            f"{where}.tolerance", f'a non-negative number, "{INFINITE}" or null', tolerance)
    if tolerance == INFINITE:
        tolerance = math.inf
    unit = raw.get("unit", "")
    _expect(isinstance(unit, str), path, f"{where}.unit", "a string", unit)
    assert isinstance(value, (int, float))
    return Metric(name=name, value=float(value), unit=unit, direction=Direction(direction),
                  samples=tuple(float(s) for s in samples), rounds=tuple(float(r) for r in rounds),
                  tolerance=None if tolerance is None else float(tolerance))


def _parse_cell(path: Path, where: str, test: str, cell: str, raw: object) -> Measurement:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    metrics_raw = raw.get("metrics")
    _expect(isinstance(metrics_raw, dict), path, f"{where}.metrics", "an object", metrics_raw)
    assert isinstance(metrics_raw, dict)
    order = raw.get("order", sorted(metrics_raw))
    _expect(isinstance(order, list) and all(isinstance(n, str) for n in order)
            and sorted(order) == sorted(metrics_raw), path, f"{where}.order",
            f"the metric names {sorted(metrics_raw)}", order)
    metrics = tuple(_parse_metric(path, f"{where}.metrics.{n}", n, metrics_raw[n]) for n in order)
    params_raw = raw.get("params", [])
    _expect(isinstance(params_raw, list)
            and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in params_raw),
            path, f"{where}.params", "a list of [name, value] pairs", params_raw)
    curve = raw.get("loss_curve", [])
    _expect(isinstance(curve, list) and all(_number(v) for v in curve), path,
            f"{where}.loss_curve", "a list of finite numbers", curve)
    kind = raw.get("kind", "train")
    steps = raw.get("steps", 0)
    warmup = raw.get("warmup", 0)
    _expect(kind in KINDS, path, f"{where}.kind", f"one of {list(KINDS)}", kind)
    _expect(all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in (steps, warmup)),
            path, f"{where}.steps", "non-negative integers steps and warmup", (steps, warmup))
    outcome = raw.get("outcome", Outcome.MEASURED.value)
    stored = [o.value for o in Outcome if not o.died]
    _expect(outcome in stored, path, f"{where}.outcome", f"one of {stored}", outcome)
    detail = raw.get("detail", "")
    _expect(isinstance(detail, str), path, f"{where}.detail", "a string", detail)
    items = raw.get("items_per_step")
    _expect(items is None or (_number(items) and items > 0), path, f"{where}.items_per_step",
            "a positive number or null", items)
    source = raw.get("source")
    _expect(source is None or (isinstance(source, dict) and all(isinstance(source.get(k), str) and source[k]
                                                               for k in ("commit", "tree"))),
            path, f"{where}.source", 'an object {"commit": "<sha>", "tree": "<sha>"}', source)
    breakdowns = _parse_breakdowns(path, f"{where}.breakdowns", raw.get("breakdowns", {}))
    measurement = Measurement(test=test, cell=cell, params=tuple((p[0], p[1]) for p in params_raw),
                              metrics=metrics, loss_curve=tuple(float(v) for v in curve), kind=kind,
                              steps=steps, warmup=warmup, outcome=Outcome(outcome), detail=detail,
                              items_per_step=None if items is None else float(items),
                              source=None if source is None else Source(commit=source["commit"], tree=source["tree"]),
                              breakdowns=breakdowns)
    _checked(path, where, check_finite(measurement))
    return measurement


def _parse_breakdowns(path: Path, where: str, raw: object) -> tuple[Breakdown, ...]:
    """A cell's ``breakdowns``: ``{metric: {"unit": str, "label": str, "parts": [[name, amount], ...]}}``
    (absent in files written before they were measured). Amounts and duplicates are checked with the
    rest of the cell (:func:`check_finite`)."""
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    out = []
    for metric, body in raw.items():
        at = f"{where}.{metric}"
        _expect(isinstance(body, dict) and set(body) <= {"unit", "label", "parts"}, path, at,
                'an object {"unit": ..., "label": ..., "parts": [...]}', body)
        parts = body.get("parts", [])
        _expect(isinstance(parts, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                and _number(p[1]) for p in parts),
                path, f"{at}.parts", "a list of [name, number] pairs", parts)
        unit, label = body.get("unit", ""), body.get("label", "")
        _expect(isinstance(unit, str) and isinstance(label, str), path, at, "string unit and label", (unit, label))
        out.append(Breakdown(metric=metric, parts=tuple((p[0], float(p[1])) for p in parts), unit=unit, label=label))
    return tuple(out)


def _numbers(path: Path, where: str, raw: object) -> tuple[float, ...]:
    _expect(isinstance(raw, list) and all(_number(v) for v in raw), path, where, "a list of finite numbers", raw)
    assert isinstance(raw, list)
    return tuple(float(v) for v in raw)


def _parse_figure(path: Path, where: str, raw: object) -> Figure:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    kinds = [k.value for k in FigureKind]
    _expect(raw.get("kind") in kinds, path, f"{where}.kind", f"one of {kinds}", raw.get("kind"))
    for name in ("metric", "axis", "cell", "reference", "unit"):
        _expect(isinstance(raw.get(name, ""), str), path, f"{where}.{name}", "a string", raw.get(name))
    _expect(_number(raw.get("value")), path, f"{where}.value", "a finite number", raw.get("value"))
    interval = raw.get("interval")
    if interval is not None:
        interval = _numbers(path, f"{where}.interval", interval)
        _expect(len(interval) == 2, path, f"{where}.interval", "two numbers", interval)
    points = raw.get("points", [])
    _expect(isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p)
                                             for p in points), path, f"{where}.points", "a list of [x, y] pairs",
            points)
    coefficient = raw.get("coefficient")
    _expect(coefficient is None or _number(coefficient), path, f"{where}.coefficient", "a finite number or null",
            coefficient)
    params = raw.get("params", [])
    _expect(isinstance(params, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                             for p in params), path, f"{where}.params",
            "a list of [name, value] pairs", params)
    direction = raw.get("direction", "lower")
    valid = [d.value for d in Direction]
    _expect(direction in valid, path, f"{where}.direction", f"one of {valid}", direction)
    figure = Figure(kind=FigureKind(raw["kind"]), metric=raw.get("metric", ""), axis=raw.get("axis", ""),
                    cell=raw.get("cell", ""), reference=raw.get("reference", ""), value=float(raw["value"]),
                    params=tuple((p[0], p[1]) for p in params),
                    interval=None if interval is None else (interval[0], interval[1]),
                    rounds=_numbers(path, f"{where}.rounds", raw.get("rounds", [])),
                    points=tuple((float(a), float(b)) for a, b in points),
                    coefficient=None if coefficient is None else float(coefficient),
                    unit=raw.get("unit", ""), direction=Direction(direction))
    _checked(path, where, check_figure(figure, where=""))
    return figure


FINGERPRINT_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "int": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str | None": ("a string or null", lambda v: v is None or isinstance(v, str)),
}
"""What the fields of a stored fingerprint may hold, by their annotation: what to say, and the check."""


def _parse_fingerprint(path: Path, where: str, raw: object) -> Fingerprint:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    for f in fields(Fingerprint):
        expected, ok = FINGERPRINT_TYPES.get(str(f.type), ("", lambda v: True))
        if f.name in raw:
            _expect(ok(raw[f.name]), path, f"{where}.{f.name}", expected, raw[f.name])
    try:
        return Fingerprint(**raw)
    except TypeError as exc:
        raise BaselineError(path, f"at {where}: {exc}") from None


def parse(path: Path, text: str) -> BaselineFile:
    """Parse the text of a baseline file; raise :class:`BaselineError` naming what is wrong (and for a
    field, where: environment, test, cell, metric, field)."""
    try:
        data, literals = load_json(text)
    except ValueError as exc:
        raise BaselineError(path, str(exc)) from None
    parsed = _parse(path, data)
    if literals:  # in a place the parse ignores (the others were refused there, by name)
        raise BaselineError(path, f"holds the literal {literals[0]}: JSON has no non-finite numbers and "
                                  "pytest-trainperf never writes one")
    return parsed


def _parse(path: Path, data: object) -> BaselineFile:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BaselineError(path, f"not a pytest-trainperf baseline file (no \"format\": \"{FORMAT}\")")
    schema = data.get("schema")
    _expect(isinstance(schema, int), path, "schema", "an integer", schema)
    assert isinstance(schema, int)
    if schema > SCHEMA_VERSION:
        raise BaselineError(path, f"written by a newer pytest-trainperf (schema {schema}, this version "
                                  f"reads up to {SCHEMA_VERSION}); upgrade pytest-trainperf")
    envs_raw = data.get("environments", {})
    _expect(isinstance(envs_raw, dict), path, "environments", "an object", envs_raw)
    environments = {}
    for key, env_raw in envs_raw.items():
        where = f"environments[{key!r}]"
        _expect(isinstance(env_raw, dict), path, where, "an object", env_raw)
        fingerprint = _parse_fingerprint(path, f"{where}.fingerprint", env_raw.get("fingerprint"))
        tests = env_raw.get("tests", {})
        _expect(isinstance(tests, dict), path, f"{where}.tests", "an object", tests)
        cells: dict[tuple[str, str], Measurement] = {}
        for test, test_cells in tests.items():
            _expect(isinstance(test_cells, dict), path, f"{where}.tests.{test}", "an object", test_cells)
            for cell, raw in test_cells.items():
                cells[(test, cell)] = _parse_cell(path, f"{where}.tests.{test}.{cell}", test, cell, raw)
        figures_raw = env_raw.get("figures", {})
        _expect(isinstance(figures_raw, dict), path, f"{where}.figures", "an object", figures_raw)
        figures: dict[str, tuple[Figure, ...]] = {}
        for test, by_key in figures_raw.items():
            _expect(isinstance(by_key, dict), path, f"{where}.figures.{test}", "an object", by_key)
            figures[test] = tuple(_parse_figure(path, f"{where}.figures.{test}.{k}", v) for k, v in by_key.items())
        environments[key] = Environment(fingerprint=fingerprint, cells=cells, figures=figures)
    return BaselineFile(path=path, environments=environments)


def read(path: Path) -> BaselineFile:
    """Read a baseline file; a missing file is an empty one. Anything else that is not a regular
    file holding a baseline document (a directory, a FIFO, a symbolic link, ...) raises
    :class:`BaselineError`."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return BaselineFile(path=path)
    except UnreadableFile as exc:
        raise BaselineError(path, str(exc)) from None
    return parse(path, text)


# --------------------------------------------------------------------------- writing


def _metric_json(metric: Metric) -> dict[str, Any]:
    out: dict[str, Any] = {"value": metric.value, "unit": metric.unit,
                           "direction": metric.direction.value}
    if metric.samples:
        out["samples"] = list(metric.samples)
    if metric.rounds:
        out["rounds"] = list(metric.rounds)
    if metric.tolerance is not None:
        out["tolerance"] = INFINITE if math.isinf(metric.tolerance) else metric.tolerance
    return out


def _cell_json(m: Measurement) -> dict[str, Any]:
    out: dict[str, Any] = {
        "params": [[k, v] for k, v in m.params],
        "kind": m.kind,
        "steps": m.steps,
        "warmup": m.warmup,
        "metrics": {metric.name: _metric_json(metric) for metric in m.metrics},
        "order": list(m.names),
    }
    if m.loss_curve:
        out["loss_curve"] = list(m.loss_curve)
    if m.items_per_step is not None:
        out["items_per_step"] = m.items_per_step
    if m.source is not None:
        out["source"] = {"commit": m.source.commit, "tree": m.source.tree}
    if m.outcome is not Outcome.MEASURED:
        out["outcome"] = m.outcome.value
        out["detail"] = m.detail
    if m.breakdowns:
        out["breakdowns"] = {b.metric: {"unit": b.unit, "label": b.label, "parts": [[k, v] for k, v in b.parts]}
                             for b in m.breakdowns}
    return out


def _figure_json(f: Figure) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": f.kind.value, "metric": f.metric, "axis": f.axis, "cell": f.cell,
                           "reference": f.reference, "value": f.value, "params": [[k, v] for k, v in f.params],
                           "unit": f.unit, "direction": f.direction.value,
                           "points": [list(p) for p in f.points]}
    if f.interval is not None:
        out["interval"] = list(f.interval)
    if f.rounds:
        out["rounds"] = list(f.rounds)
    if f.coefficient is not None:
        out["coefficient"] = f.coefficient
    return out


def to_json(baselines: BaselineFile) -> dict[str, Any]:
    """The JSON document of a baseline file."""
    envs: dict[str, Any] = {}
    for key, env in baselines.environments.items():
        tests: dict[str, dict[str, Any]] = {}
        for (test, cell), m in env.cells.items():
            tests.setdefault(test, {})[cell] = _cell_json(m)
        envs[key] = {"fingerprint": asdict(env.fingerprint), "tests": tests}
        if any(env.figures.values()):
            envs[key]["figures"] = {test: {f.key: _figure_json(f) for f in figures}
                                    for test, figures in env.figures.items() if figures}
    return {"format": FORMAT, "schema": SCHEMA_VERSION, "environments": envs}


def dumps(doc: object, indent: int = 0) -> str:
    """Stable JSON: sorted keys, two-space indent, lists without objects on one line."""
    pad = "  " * indent
    if isinstance(doc, dict):
        if not doc:
            return "{}"
        items = [f'{pad}  {json.dumps(str(k))}: {dumps(v, indent + 1)}' for k, v in sorted(doc.items())]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(doc, list) and any(isinstance(v, dict) for v in doc):
        items = [f"{pad}  {dumps(v, indent + 1)}" for v in doc]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(doc, allow_nan=False)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The text goes to ``.<name>.trainperf-tmp-<random>`` beside ``path`` first (:data:`TEMP_MARK`),
    renamed over ``path`` once complete and fsynced. A writer killed (SIGKILL) before the rename
    leaves that file behind; the next update of ``path`` removes it (:func:`sweep_temp_files`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix="", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; keep the file's mode, or the umask's for a new one
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_files(path: Path) -> list[Path]:
    """The temporary files :func:`write_atomic` made for ``path`` that are still there (regular files
    only, symbolic links are never followed)."""
    prefix = f".{path.name}{TEMP_MARK}"
    try:
        names = sorted(n for n in os.listdir(path.parent) if n.startswith(prefix))
    except OSError:
        return []
    found = []
    for name in names:
        try:
            if stat.S_ISREG(os.lstat(path.parent / name).st_mode):
                found.append(path.parent / name)
        except OSError:
            continue
    return found


def sweep_temp_files(path: Path, before: float, shown: str | None = None) -> str | None:
    """Remove the temporary files of ``path`` last modified before ``before`` (a ``time.time()``):
    left by a writer killed mid-write. Call it holding :func:`locked`, with the time the lock was
    taken: every writer of ``path`` holds the lock, so such a file has no live writer. Returns a one-line
    note naming what was removed (None when nothing was)."""
    removed = []
    for tmp in temp_files(path):
        try:
            if os.lstat(tmp).st_mtime < before:
                tmp.unlink()
                removed.append(tmp.name)
        except OSError:
            continue
    if not removed:
        return None
    n = len(removed)
    return (f"{shown or path}: removed {n} temporary file{'s' * (n != 1)} left by an interrupted update "
            f"({', '.join(removed)})")


def _changes(rel: str, old: Measurement | None, new: Measurement) -> list[BaselineChange]:
    out = []
    for metric in new.metrics:
        before = old.metric(metric.name) if old is not None else None
        old_value = before.value if before is not None else None
        if old_value != metric.value:
            out.append(BaselineChange(path=rel, test=new.test, cell=new.cell, metric=metric.name,
                                      old=old_value, new=metric.value, unit=metric.unit))
    return out


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file's directory (POSIX ``flock``; no lock file is left behind),
    so that processes updating baseline files at once (pytest-xdist workers, parallel jobs)
    read-merge-write them in turn and no update is lost. Where ``fcntl`` does not exist the body runs
    unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@dataclass(frozen=True)
class FileUpdate:
    """What :func:`update_file` did to one baseline file."""

    changes: tuple[BaselineChange, ...] = ()
    """What changed, metric by metric (and figure by figure)."""
    refused: tuple[str, ...] = ()
    """One line per cell (or figure) not stored because a reader would refuse it, naming the file,
    the test, the cell and the field (a NaN loss, an infinite FLOP count): the other cells were
    written. The caller fails those cells."""
    refused_cells: tuple[tuple[str, str], ...] = ()
    """``(test, cell)`` of every cell in :attr:`refused`, for the caller to fail them."""
    notes: tuple[str, ...] = ()
    """One line per thing done besides, e.g. temporary files of an interrupted update removed."""


class CellsRefused(BaselineError):
    """Raised by :func:`update` after writing the good cells when some could not be stored; carries
    the :class:`FileUpdate` (the changes written, and the lines naming each refused cell)."""

    def __init__(self, path: Path, done: FileUpdate) -> None:
        n = len(done.refused)
        super().__init__(path, f"{n} cell{'s' * (n != 1)} not stored (the other cells were): "
                               + "; ".join(done.refused))
        self.done = done


Derive = Callable[[Mapping[tuple[str, str], Measurement]], Mapping[str, Sequence[Figure]]]
"""Computes the figures of some tests from an environment's cells (``(test, cell) -> measurement``)."""


def update(path: Path, fingerprint: Fingerprint, measurements: Iterable[Measurement],
           display_path: str | None = None, derive: Derive | None = None) -> list[BaselineChange]:
    """:func:`update_file`, returning what changed; raises :class:`CellsRefused` (a
    :class:`BaselineError`) after writing the other cells when some cells could not be stored."""
    done = update_file(path, fingerprint, measurements, display_path, derive)
    if done.refused:
        raise CellsRefused(path, done)
    return list(done.changes)


def update_file(path: Path, fingerprint: Fingerprint, measurements: Iterable[Measurement],
                display_path: str | None = None, derive: Derive | None = None) -> FileUpdate:
    """Replace the given cells of one environment in ``path``; keep everything else as it was.

    Reads the current file first, under :func:`locked`: a file that cannot be parsed raises
    :class:`BaselineError` and is left untouched. A cell that a reader would refuse (a non-finite
    number, a unit that is no string: :func:`~pytest_trainperf.records.check_finite`) is not stored
    and named in :attr:`FileUpdate.refused`; the other cells are written. ``derive``, when given,
    recomputes the figures of the tests it returns from the environment's cells after the merge
    (other tests keep theirs). Temporary files of an interrupted earlier write are removed
    (:func:`sweep_temp_files`).
    """
    with locked(path):
        taken = time.time()
        note = sweep_temp_files(path, taken, display_path)
        done = _update(path, fingerprint, measurements, display_path, derive)
    return FileUpdate(changes=done.changes, refused=done.refused, refused_cells=done.refused_cells,
                      notes=done.notes + ((note,) if note else ()))


def _figure_changes(rel: str, test: str, old: Sequence[Figure], new: Sequence[Figure]) -> list[BaselineChange]:
    """Figures rewritten, as changes: a relative figure in percent, an exponent as it is."""
    before = {f.key: f for f in old}
    out = []
    for f in new:
        was = before.get(f.key)
        scale = 1.0 if f.kind is FigureKind.SCALING else 100.0
        if was is None or was.value != f.value:
            what = (f"exponent of {f.metric} ~ {f.reference}" if f.kind is FigureKind.SCALING
                    else f"{f.metric} relative to {f.axis}={f.reference}")
            out.append(BaselineChange(path=rel, test=test, cell=f.cell, metric=what,
                                      old=None if was is None else was.value * scale, new=f.value * scale,
                                      unit="" if f.kind is FigureKind.SCALING else "%"))
    return out


def _update(path: Path, fingerprint: Fingerprint, measurements: Iterable[Measurement],
            display_path: str | None, derive: Derive | None = None) -> FileUpdate:
    current = read(path)
    rel = display_path or str(path)
    env = current.environments.get(fingerprint.key)
    cells = dict(env.cells) if env is not None else {}
    changes: list[BaselineChange] = []
    refused: list[str] = []
    refused_cells: list[tuple[str, str]] = []
    for m in measurements:
        if m.outcome.died:  # a crash or a timeout is no baseline (and no reader would accept it)
            continue
        problems = check_finite(m)
        if problems:
            refused.append(f"{rel}: {m.test} [{m.cell}]: not stored: {'; '.join(problems)}")
            refused_cells.append((m.test, m.cell))
            continue
        changes += _changes(rel, cells.get((m.test, m.cell)), m)
        cells[(m.test, m.cell)] = m
    figures = dict(env.figures) if env is not None else {}
    for test, derived in (derive(cells) if derive is not None else {}).items():
        kept = []
        for f in derived:
            problems = check_figure(f, where="")
            if problems:
                refused.append(f"{rel}: {test}: figure {f.title()}: not stored: {'; '.join(problems)}")
            else:
                kept.append(f)
        changes += _figure_changes(rel, test, figures.get(test, ()), kept)
        figures[test] = tuple(kept)
    envs = dict(current.environments)
    envs[fingerprint.key] = Environment(fingerprint=fingerprint, cells=cells, figures=figures)
    try:
        text = dumps(to_json(BaselineFile(path=path, environments=envs))) + "\n"
    except (ValueError, TypeError) as exc:  # pragma: no cover - every value was checked above
        raise BaselineError(path, f"not written: {exc}") from None
    write_atomic(path, text)
    return FileUpdate(changes=tuple(changes), refused=tuple(refused), refused_cells=tuple(refused_cells))
