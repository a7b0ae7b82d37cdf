"""``python -m pytest_trainperf``: join shard results, show stored baselines, compare two result files.

* ``merge a.json b.json ... -o all.json``: one result file from the shards of a pipeline; refuses a
  cell that two shards both measured in one environment, and files that are not ours or newer.
* ``show baselines/test_x.json ...``: each environment's stored cells as the session's heatmaps
  (values only: a baseline has nothing to compare with).
* ``diff old.json new.json``: judge every cell of ``new`` against the same cell (test file, test, cell
  id, environment) of ``old`` with the session's statistics (timings on their samples), render it like
  a session and exit 1 when a cell regressed.

Exit status: 0 success, 1 regressions (``diff``), 2 a file that cannot be used (read or written) or a
usage error, with a one-line reason naming the file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from pytest_trainperf import results, store
from pytest_trainperf.records import CellVerdict, Measurement, MetricVerdict, Scalar, Status
from pytest_trainperf.report.heatmap import render_heatmaps
from pytest_trainperf.report.summary import render_session

PROG = "python -m pytest_trainperf"
"""How the command is invoked, for messages."""
DIFF_SHOW = ("step_time", "peak_memory")
"""The metrics ``diff`` renders as heatmaps unless ``--show`` says otherwise (as the plugin does)."""
DIFF_HINT = "use the newer result file as the one to compare against"
"""How to accept an improvement that ``diff`` found (there are no baselines to update)."""
EXIT_OK, EXIT_REGRESSED, EXIT_UNUSABLE = 0, 1, 2
"""Exit statuses."""


class _Unusable(Exception):
    """A file the command cannot use; its message names the file."""


def _metrics(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of metric names, got {value!r}")
    return names


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


# --------------------------------------------------------------------------- merge


def merge(files: Sequence[Path], output: Path) -> int:
    """Join the result files into ``output``."""
    parts = [(str(path), _read_results(path)) for path in files]
    try:
        merged = results.merge(parts)
    except results.ResultsError as exc:
        raise _Unusable(str(exc)) from None
    _write(output, lambda: results.write(output, merged))
    print(f"{output}: {len(merged.cells)} cells from {len(files)} file{'s' * (len(files) != 1)}")
    return EXIT_OK


# --------------------------------------------------------------------------- show


def _sort_key(value: Scalar) -> tuple[int, float, str]:
    if isinstance(value, bool):
        return (0, float(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, value)


def _axes(cells: Sequence[Measurement]) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    """The grid axes of stored cells: their params in order, each axis's values sorted."""
    names: dict[str, list[Scalar]] = {}
    for m in cells:
        for name, value in m.params:
            values = names.setdefault(name, [])
            if value not in values or not any(type(v) is type(value) for v in values if v == value):
                values.append(value)
    return tuple((name, tuple(sorted(values, key=_sort_key))) for name, values in names.items())


def _as_shown(m: Measurement) -> CellVerdict:
    """A stored measurement as a verdict with nothing to compare: the heatmaps show values only."""
    metrics = tuple(MetricVerdict(name=metric.name, status=Status.UNCHANGED, current=metric.value, baseline=None,
                                  tolerance=math.nan, unit=metric.unit, direction=metric.direction)
                    for metric in m.metrics)
    return CellVerdict(measurement=m, metrics=metrics)


def show(files: Sequence[Path], metrics: Sequence[str] | None) -> int:
    """Render each stored environment's cells as heatmaps."""
    console = _console()
    for path in files:
        if not os.path.lexists(path):
            raise _Unusable(f"{path}: no such baseline file")
        try:
            baselines = store.read(path)
        except store.BaselineError as exc:
            raise _Unusable(str(exc)) from None
        if not baselines.environments:
            console.print(Text(f"{path}: no baselines", style="yellow"))
        for key, env in baselines.environments.items():
            console.print(Text(f"{path}", style="bold"))
            console.print(Text(f"environment: {key}", style="dim"))
            console.print()
            tests: dict[str, list[Measurement]] = {}
            for (test, _), m in env.cells.items():
                tests.setdefault(test, []).append(m)
            for test, cells in tests.items():
                present = list(dict.fromkeys(metric.name for m in cells for metric in m.metrics))
                chosen = present if metrics is None else [n for n in metrics if n in present]
                if not chosen:
                    console.print(Text(f"{test}: --show: no stored metric {', '.join(metrics or ())} "
                                       f"(stored: {', '.join(present) or 'none'})", style="yellow"))
                    continue
                render_heatmaps(console, test=test, axes=_axes(cells), cells=[_as_shown(m) for m in cells],
                                metrics=chosen)
                console.print()
    return EXIT_OK


# --------------------------------------------------------------------------- diff


def _tolerances(verdict: CellVerdict) -> dict[str, float]:
    """The tolerances the new session configured for each metric (before any noise band widened them)."""
    out = {}
    for m in verdict.metrics:
        configured = getattr(m, "configured_tolerance", None)
        out[m.name] = configured if configured is not None else m.tolerance
    return out


def compare(old: results.SessionResults, new: results.SessionResults) -> results.SessionResults:
    """Every cell of ``new`` judged against the same cell of ``old`` (new where ``old`` lacks it)."""
    from pytest_trainperf import stats  # numpy and scipy: only diff needs them

    before = {c.key: c for c in old.cells}
    cells = []
    for c in new.cells:
        base = before.get(c.key)
        verdict = stats.judge(c.verdict.measurement, base.verdict.measurement if base is not None else None,
                              _tolerances(c.verdict))
        cells.append(results.CellResult(nodeid=c.nodeid, test_file=c.test_file, test=c.test, cell=c.cell,
                                        axes=c.axes, verdict=verdict, fingerprint=c.fingerprint))
    return results.SessionResults(cells=tuple(cells), warnings=new.warnings)


def diff(old_path: Path, new_path: Path, metrics: Sequence[str] | None, markdown: Path | None) -> int:
    """Compare two result files; exit 1 when a cell regressed."""
    old, new = _read_results(old_path), _read_results(new_path)
    compared = compare(old, new)
    console = _console()
    render_session(console, results=[(c.test_file, c.test, c.axes, c.verdict) for c in compared.cells],
                   fingerprints=sorted({c.fingerprint.key for c in compared.cells}),
                   show=metrics or DIFF_SHOW, changes=(), update=False, errors=(), hint=DIFF_HINT)
    for c in compared.cells:
        if c.verdict.status is Status.REGRESSED:
            console.print(Text(f"regressed: {c.nodeid}", style="bold red"))
            if c.verdict.outcome is Status.REGRESSED:
                console.print(Text(f"  {c.verdict.measurement.outcome.label}: {c.verdict.measurement.detail}"))
            for m in c.verdict.regressions:
                console.print(Text(f"  {m.describe()}"))
    keys = {c.key for c in new.cells}
    gone = [c.nodeid for c in old.cells if c.key not in keys]
    if gone:
        console.print(Text(f"note: {len(gone)} cell{'s' * (len(gone) != 1)} of {old_path} not in {new_path}: "
                           + ", ".join(gone[:5]) + (", ..." if len(gone) > 5 else ""), style="yellow"))
    if markdown is not None:
        from pytest_trainperf.report.markdown import render_markdown

        text = render_markdown(compared, show=metrics or DIFF_SHOW, hint=DIFF_HINT,
                               title=f"pytest-trainperf: {new_path.name} against {old_path.name}")
        _write(markdown, lambda: store.write_atomic(markdown, text))
    regressed = any(c.verdict.status is Status.REGRESSED for c in compared.cells)
    return EXIT_REGRESSED if regressed else EXIT_OK


# --------------------------------------------------------------------------- main


def _write(path: Path, write: Callable[[], None]) -> None:
    """Run ``write`` (which writes ``path``); a path that cannot be written is unusable, named."""
    if path.is_dir():
        raise _Unusable(f"{path}: is a directory; expected the path of a file to write")
    try:
        write()
    except OSError as exc:
        raise _Unusable(f"{path}: cannot be written ({exc.strerror or exc})") from None
    except results.ResultsError as exc:
        raise _Unusable(str(exc)) from None


def _read_results(path: Path) -> results.SessionResults:
    try:
        return results.read(path)
    except results.ResultsError as exc:
        raise _Unusable(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog=PROG, description="pytest-trainperf result files and baselines")
    sub = top.add_subparsers(dest="command", required=True, metavar="{merge,show,diff}")
    p = sub.add_parser("merge", help="join the result files (--trainperf-json) of shards into one")
    p.add_argument("files", nargs="+", type=Path, metavar="RESULTS.json")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="ALL.json", help="the joined file")
    p = sub.add_parser("show", help="render stored baselines as heatmaps")
    p.add_argument("files", nargs="+", type=Path, metavar="BASELINES.json")
    p.add_argument("--show", type=_metrics, default=None, metavar="METRICS",
                   help="comma-separated metrics to render (default: every stored metric)")
    p = sub.add_parser("diff", help="compare two result files with the session's statistics; exit 1 on "
                                    "regressions")
    p.add_argument("old", type=Path, metavar="OLD.json")
    p.add_argument("new", type=Path, metavar="NEW.json")
    p.add_argument("--show", type=_metrics, default=None, metavar="METRICS",
                   help=f"comma-separated metrics to render (default: {','.join(DIFF_SHOW)} and any regressed)")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the report as Markdown")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit status."""
    args = parser().parse_args(argv)
    try:
        if args.command == "merge":
            return merge(args.files, args.output)
        if args.command == "show":
            return show(args.files, args.show)
        return diff(args.old, args.new, args.show, args.markdown)
    except _Unusable as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
