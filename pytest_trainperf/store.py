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
never written over.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_trainperf.records import (
    BaselineChange,
    Direction,
    Figure,
    FigureKind,
    Fingerprint,
    Measurement,
    Metric,
    Outcome,
    Source,
)

FORMAT = "pytest-trainperf baselines"
"""The ``format`` marker that tells our files from any other JSON."""
SCHEMA_VERSION = 1
"""The schema this version writes; files with a higher one are refused."""


INFINITE = "inf"
"""How an infinite tolerance (a report-only metric) is written: JSON has no infinity."""
KINDS = ("train", "run", "record")
"""How a cell was measured: a training step, an inference call, or only recorded metrics."""


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

    def figures(self, env_key: str, test: str) -> tuple[Figure, ...]:
        """The stored figures of one test in one environment (empty when none)."""
        env = self.environments.get(env_key)
        return () if env is None else env.figures.get(test, ())


def baseline_path(baselines_dir: Path, test_file: str) -> Path:
    """The baseline file of a test file given relative to the rootdir (``a/test_x.py``)."""
    rel = Path(test_file)
    return baselines_dir / rel.with_suffix(".json")


# --------------------------------------------------------------------------- reading


def _expect(cond: bool, path: Path, where: str, expected: str, got: object) -> None:
    if not cond:
        raise BaselineError(path, f"at {where}: expected {expected}, got {got!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_metric(path: Path, where: str, name: str, raw: object) -> Metric:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    value = raw.get("value")
    _expect(_number(value), path, f"{where}.value", "a number", value)
    samples = raw.get("samples", [])
    _expect(isinstance(samples, list) and all(_number(s) for s in samples), path,
            f"{where}.samples", "a list of numbers", samples)
    rounds = raw.get("rounds", [])
    _expect(isinstance(rounds, list) and all(_number(r) for r in rounds), path,
            f"{where}.rounds", "a list of numbers", rounds)
    direction = raw.get("direction", "lower")
    valid = [d.value for d in Direction]
    _expect(direction in valid, path, f"{where}.direction", f"one of {valid}", direction)
    tolerance = raw.get("tolerance")
    if tolerance == INFINITE:
        tolerance = math.inf
    _expect(tolerance is None or _number(tolerance), path, f"{where}.tolerance",
            f'a number, "{INFINITE}" or null', tolerance)
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
    _expect(isinstance(order, list) and sorted(order) == sorted(metrics_raw), path, f"{where}.order",
            f"the metric names {sorted(metrics_raw)}", order)
    metrics = tuple(_parse_metric(path, f"{where}.metrics.{n}", n, metrics_raw[n]) for n in order)
    params_raw = raw.get("params", [])
    _expect(isinstance(params_raw, list)
            and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in params_raw),
            path, f"{where}.params", "a list of [name, value] pairs", params_raw)
    curve = raw.get("loss_curve", [])
    _expect(isinstance(curve, list) and all(_number(v) for v in curve), path,
            f"{where}.loss_curve", "a list of numbers", curve)
    kind = raw.get("kind", "train")
    steps = raw.get("steps", 0)
    warmup = raw.get("warmup", 0)
    _expect(kind in KINDS, path, f"{where}.kind", f"one of {list(KINDS)}", kind)
    _expect(isinstance(steps, int) and isinstance(warmup, int), path, f"{where}.steps",
            "integers steps and warmup", (steps, warmup))
    outcome = raw.get("outcome", Outcome.MEASURED.value)
    stored = [o.value for o in Outcome if o is not Outcome.CRASHED]
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
    return Measurement(test=test, cell=cell, params=tuple((p[0], p[1]) for p in params_raw),
                       metrics=metrics, loss_curve=tuple(float(v) for v in curve), kind=kind,
                       steps=steps, warmup=warmup, outcome=Outcome(outcome), detail=detail,
                       items_per_step=None if items is None else float(items),
                       source=None if source is None else Source(commit=source["commit"], tree=source["tree"]))


def _numbers(path: Path, where: str, raw: object) -> tuple[float, ...]:
    _expect(isinstance(raw, list) and all(_number(v) for v in raw), path, where, "a list of numbers", raw)
    assert isinstance(raw, list)
    return tuple(float(v) for v in raw)


def _parse_figure(path: Path, where: str, raw: object) -> Figure:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    kinds = [k.value for k in FigureKind]
    _expect(raw.get("kind") in kinds, path, f"{where}.kind", f"one of {kinds}", raw.get("kind"))
    for name in ("metric", "axis", "cell", "reference", "unit"):
        _expect(isinstance(raw.get(name, ""), str), path, f"{where}.{name}", "a string", raw.get(name))
    _expect(_number(raw.get("value")), path, f"{where}.value", "a number", raw.get("value"))
    interval = raw.get("interval")
    if interval is not None:
        interval = _numbers(path, f"{where}.interval", interval)
        _expect(len(interval) == 2, path, f"{where}.interval", "two numbers", interval)
    points = raw.get("points", [])
    _expect(isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p)
                                             for p in points), path, f"{where}.points", "a list of [x, y] pairs",
            points)
    coefficient = raw.get("coefficient")
    _expect(coefficient is None or _number(coefficient), path, f"{where}.coefficient", "a number or null",
            coefficient)
    params = raw.get("params", [])
    _expect(isinstance(params, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                             for p in params), path, f"{where}.params",
            "a list of [name, value] pairs", params)
    direction = raw.get("direction", "lower")
    valid = [d.value for d in Direction]
    _expect(direction in valid, path, f"{where}.direction", f"one of {valid}", direction)
    return Figure(kind=FigureKind(raw["kind"]), metric=raw["metric"], axis=raw["axis"], cell=raw["cell"],
                  reference=raw["reference"], value=float(raw["value"]),
                  params=tuple((p[0], p[1]) for p in params),
                  interval=None if interval is None else (interval[0], interval[1]),
                  rounds=_numbers(path, f"{where}.rounds", raw.get("rounds", [])),
                  points=tuple((float(a), float(b)) for a, b in points),
                  coefficient=None if coefficient is None else float(coefficient),
                  unit=raw.get("unit", ""), direction=Direction(direction))


def _parse_fingerprint(path: Path, where: str, raw: object) -> Fingerprint:
    _expect(isinstance(raw, dict), path, where, "an object", raw)
    assert isinstance(raw, dict)
    try:
        return Fingerprint(**raw)
    except TypeError as exc:
        raise BaselineError(path, f"at {where}: {exc}") from None


def parse(path: Path, text: str) -> BaselineFile:
    """Parse the text of a baseline file; raise :class:`BaselineError` naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(path, f"not valid JSON ({exc})") from None
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
    """Read a baseline file; a missing file is an empty one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return BaselineFile(path=path)
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(path, f"cannot be read ({exc})") from None
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
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


Derive = Callable[[Mapping[tuple[str, str], Measurement]], Mapping[str, Sequence[Figure]]]
"""Computes the figures of some tests from an environment's cells (``(test, cell) -> measurement``)."""


def update(path: Path, fingerprint: Fingerprint, measurements: Iterable[Measurement],
           display_path: str | None = None, derive: Derive | None = None) -> list[BaselineChange]:
    """Replace the given cells of one environment in ``path``; keep everything else as it was.

    Reads the current file first, under :func:`locked`: a file that cannot be parsed raises
    :class:`BaselineError` and is left untouched. ``derive``, when given, recomputes the figures of
    the tests it returns from the environment's cells after the merge (other tests keep theirs).
    Returns what changed, metric by metric (and figure by figure).
    """
    with locked(path):
        return _update(path, fingerprint, measurements, display_path, derive)


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
            display_path: str | None, derive: Derive | None = None) -> list[BaselineChange]:
    current = read(path)
    rel = display_path or str(path)
    env = current.environments.get(fingerprint.key)
    cells = dict(env.cells) if env is not None else {}
    changes: list[BaselineChange] = []
    for m in measurements:
        if m.outcome is Outcome.CRASHED:  # a crash is no baseline (and no reader would accept it)
            continue
        changes += _changes(rel, cells.get((m.test, m.cell)), m)
        cells[(m.test, m.cell)] = m
    figures = dict(env.figures) if env is not None else {}
    for test, derived in (derive(cells) if derive is not None else {}).items():
        changes += _figure_changes(rel, test, figures.get(test, ()), derived)
        figures[test] = tuple(derived)
    envs = dict(current.environments)
    envs[fingerprint.key] = Environment(fingerprint=fingerprint, cells=cells, figures=figures)
    write_atomic(path, dumps(to_json(BaselineFile(path=path, environments=envs))) + "\n")
    return changes
