"""Command-line options and their ini twins, resolved once into a frozen :class:`Settings`.

Every option is ``--trainperf-*`` in the ``trainperf`` group with an ini twin ``trainperf_*``; the
command line wins over the ini file. Values are checked by the argparse ``type=`` at parse time (the
ini value by the same function at configure time), with a message naming the option, the expected
form and the value received.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DEFAULT_SHOW = ("step_time", "peak_memory", "peak_memory_forecast")
"""The metrics the report renders as heatmaps unless ``--trainperf-show`` says otherwise (each where a
test measured it: ``peak_memory_forecast`` is a ``tp.forecast`` test's)."""
MALLOC_MODES = ("fixed", "system")
"""What ``--trainperf-malloc`` accepts."""
CUDNN_BENCHMARK = ("keep", "on", "off")
"""What ``--trainperf-cudnn-benchmark`` accepts (as :data:`pytest_trainperf.measure.cudnn.POLICIES`)."""
DEFAULT_CONFIRM = 1
"""Re-measurements of a timing regression before it fails the cell."""
DEFAULT_ROUNDS = 5
"""Measurement rounds of an update: their spread is the noise band stored with the baseline."""
DEFAULT_MAX_TIME = 60.0
"""Seconds of adaptive measurement (confirmation, noise rounds) allowed per cell."""
DEFAULT_PAIRS = 60
"""Timed step pairs per cell of a lockstep comparison (``--trainperf-against``)."""
REF_RE = re.compile(r"^[^\s\x00-\x1f~^:?*\[\\]+$")
"""What a git ref, tag, commit or revision with ``~N``/``^`` suffixes may look like (checked by git later);
the first character is no ``-`` so that it cannot be read as an option of git."""
DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
"""The devices ``--trainperf-device`` accepts."""
METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
"""What a metric name looks like."""


def parse_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu`` or ``xpu:N``."""
    text = value.strip()
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"expected auto, cpu, cuda, cuda:N, mps, xpu or xpu:N, got {value!r}")
    return text


def parse_metrics(value: str) -> tuple[str, ...]:
    """A comma-separated list of metric names, e.g. ``step_time,peak_memory,loss``."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not METRIC_RE.match(n)]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of metric names (e.g. step_time,peak_memory), got {value!r}")
    return names


def _integer(value: str, minimum: int, expected: str) -> int:
    """``value`` as an integer of at least ``minimum``; the error names ``expected`` and the value."""
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def parse_threads(value: str) -> int:
    """A positive integer number of intra-op threads."""
    return _integer(value, 1, "a positive integer")


def parse_confirm(value: str) -> int:
    """A non-negative integer number of re-measurements."""
    return _integer(value, 0, "a non-negative integer (0 turns confirmation off)")


def parse_rounds(value: str) -> int:
    """A positive integer number of measurement rounds."""
    return _integer(value, 1, "a positive integer (1: no noise band)")


def parse_seconds(value: str) -> float:
    """A positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def parse_budget(value: str) -> int:
    """A memory size: ``24GiB``, ``512MiB``, ``1.5GB`` or a number of bytes."""
    from pytest_trainperf.units import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _choice(value: str, choices: tuple[str, ...]) -> str:
    text = value.strip()
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {value!r}")
    return text


def parse_malloc(value: str) -> str:
    """``fixed`` (glibc thresholds fixed for the session) or ``system`` (left alone)."""
    return _choice(value, MALLOC_MODES)


def parse_cudnn_benchmark(value: str) -> str:
    """``keep`` (record the process's ``torch.backends.cudnn.benchmark``), ``on`` or ``off``."""
    return _choice(value, CUDNN_BENCHMARK)


def parse_path(value: str) -> str:
    """A non-empty directory path."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected a directory path, got {value!r}")
    return value


def parse_file(value: str) -> str:
    """A non-empty file path (not a directory: no trailing separator)."""
    if not value.strip() or value.endswith(("/", "\\")):
        raise argparse.ArgumentTypeError(f"expected a file path such as results/trainperf.json, got {value!r}")
    return value


def parse_csv(value: str) -> str:
    """A file path ending in ``.csv``."""
    if not value.strip() or value.endswith(("/", "\\")) or not value.lower().endswith(".csv"):
        raise argparse.ArgumentTypeError(f"expected a file path ending in .csv such as results/trainperf.csv, "
                                         f"got {value!r}")
    return value


def parse_ref(value: str) -> str:
    """A git revision of the repository under test: a branch, tag or commit (``main``, ``v1.2``, ``HEAD~1``)."""
    text = value.strip()
    bare = text.replace("~", "").replace("^", "")
    if not text or text.startswith("-") or not REF_RE.match(bare or "x") or ".." in text:
        raise argparse.ArgumentTypeError(
            "expected a git branch, tag or commit of the repository under test (e.g. main, v1.2, HEAD~1), "
            f"got {value!r}")
    return text


CONFIRM_BASELINE, CONFIRM_NONE = "baseline", "none"
"""The policies of ``--trainperf-confirm-against`` besides a git revision."""


def parse_confirm_against(value: str) -> str:
    """``baseline`` (confirm side by side against the commit each baseline measured), ``none`` (the stored
    verdict stands), or a git revision to confirm against."""
    text = value.strip()
    if text.lower() in (CONFIRM_BASELINE, CONFIRM_NONE):
        return text.lower()
    try:
        return parse_ref(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected {CONFIRM_BASELINE}, {CONFIRM_NONE} or a git branch, tag or commit (e.g. main), got {value!r}"
        ) from None


def parse_pairs(value: str) -> int:
    """A number of step pairs, at least 12: six balanced ratios (two pairs each), the fewest that give a
    95% sign-test interval."""
    return _integer(value, 12, "an integer >= 12 (fewer pairs give no 95% interval)")


def parse_plots(value: str) -> str:
    """A directory for PNG figures; refused, naming the extra to install, when matplotlib is missing
    (so a session asking for figures stops before its tests run, not after)."""
    text = parse_path(value)
    try:
        import matplotlib  # noqa: F401  # the optional ``plots`` extra
    except ImportError:
        raise argparse.ArgumentTypeError(
            f"figures need matplotlib, which is not installed: pip install pytest-trainperf[plots] "
            f"(got {value!r})") from None
    return text


def parse_devices(value: str) -> tuple[str, ...]:
    """A comma-separated list of devices, one per pytest-xdist worker: ``cuda:0,cuda:1``."""
    devices = tuple(d.strip() for d in value.split(","))
    if not value.strip() or any(d == "auto" or not DEVICE_RE.match(d) for d in devices):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of devices (cpu, cuda:N, mps, xpu:N), e.g. cuda:0,cuda:1, got {value!r}")
    return devices


ENDPOINT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
"""A rendezvous endpoint: ``host:port`` (a name, an IPv4 address or a bracketed IPv6 one)."""
RDZV_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A rendezvous id: letters, digits, ``_``, ``.`` and ``-``, at most 64 characters."""


def parse_nnodes(value: str) -> int:
    """A positive integer number of nodes."""
    return _integer(value, 1, "a positive integer number of nodes (1: every rank on this machine)")


def parse_endpoint(value: str) -> str:
    """The rendezvous endpoint of a multi-node session: ``host:port``, the port in 1-65535."""
    text = value.strip()
    match = ENDPOINT_RE.match(text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port in 1-65535 (e.g. node0.cluster:29400), got {value!r}")
    return text


def parse_rdzv_id(value: str) -> str:
    """A rendezvous id shared by every node of a session: letters, digits, ``_ . -``."""
    text = value.strip()
    if not RDZV_ID_RE.match(text):
        raise argparse.ArgumentTypeError(
            "expected an id of letters, digits, '_', '.' and '-' (at most 64, e.g. the CI job's id), "
            f"got {value!r}")
    return text


@dataclass(frozen=True)
class _Option:
    """One option: the command-line flag and its ini twin share name, help and check."""

    name: str
    help: str
    parse: Callable[[str], Any] | None = None
    flag: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


OPTIONS = (
    _Option("--trainperf", "measure every trainperf test and compare it with its baseline", flag=True),
    _Option("--trainperf-update-baselines",
            "measure and write the baselines of the cells that ran (implies --trainperf)", flag=True),
    _Option("--trainperf-baselines", "directory of baseline files (default: baselines/ at the rootdir)",
            parse_path, metavar="DIR"),
    _Option("--trainperf-device", "device to measure on: auto (CUDA if available, else CPU), cpu, "
            "cuda, cuda:N, mps (default: auto)", parse_device, metavar="DEVICE"),
    _Option("--trainperf-strict", "fail cells that have no baseline for this environment", flag=True),
    _Option("--trainperf-show", "comma-separated metrics to render as heatmaps "
            f"(default: {','.join(DEFAULT_SHOW)})", parse_metrics, metavar="METRICS"),
    _Option("--trainperf-confirm", "re-time a cell whose step time regressed N more times; it fails only if "
            f"every re-measurement regresses too (default: {DEFAULT_CONFIRM}; 0: off)", parse_confirm, metavar="N"),
    _Option("--trainperf-rounds", "measurement rounds per cell of an update (separate warm starts, interleaved "
            f"across cells); their spread is the noise band stored with the baseline (default: {DEFAULT_ROUNDS})",
            parse_rounds, metavar="N"),
    _Option("--trainperf-max-time", "seconds per cell that adaptive measurement (confirmation re-measurements, "
            f"noise rounds of an update) may take (default: {DEFAULT_MAX_TIME:g})", parse_seconds,
            metavar="SECONDS"),
    _Option("--trainperf-memory-budget", "a cell whose peak memory exceeds SIZE (e.g. 24GiB) is reported as "
            "out of memory (emulated), as on a device of that size; tp.memory_budget overrides it per test",
            parse_budget, metavar="SIZE"),
    _Option("--trainperf-malloc", "fixed: fix glibc malloc's thresholds for the session, so CPU step times "
            "do not drift with the process's allocation history (default); system: leave malloc alone",
            parse_malloc, metavar="MODE"),
    _Option("--trainperf-threads", "intra-op threads to fix during measurement "
            "(default: torch's own count less one, at least 1)", parse_threads, metavar="N"),
    _Option("--trainperf-json", "write every cell of the session (parameters, metrics, baselines, changes, "
            "verdicts, environment) to this JSON file", parse_file, metavar="PATH"),
    _Option("--trainperf-markdown", "write the heatmaps as Markdown tables, regressions first, to this file "
            "(also appended to $GITHUB_STEP_SUMMARY when set)", parse_file, metavar="PATH"),
    _Option("--trainperf-devices", "comma-separated devices, one per pytest-xdist worker (gwN measures on the "
            "N-th, modulo the list; without xdist the first); overrides --trainperf-device",
            parse_devices, metavar="DEVICES"),
    _Option("--trainperf-cudnn-benchmark", "torch.backends.cudnn.benchmark during measurement on CUDA: on, off, "
            "or keep the process's setting (default); recorded in the environment fingerprint",
            parse_cudnn_benchmark, metavar="POLICY"),
    _Option("--trainperf-isolate", "run each trainperf cell in a fresh child process: a cell the kernel kills "
            "(out of memory) or that crashes the interpreter is reported as KILLED or CRASH and the session "
            "goes on; the process's peak RSS is reported as peak_rss (POSIX only)", flag=True),
    _Option("--trainperf-plots", "write PNG figures of the session to this directory: heatmaps per test and "
            "metric, relative views, scaling fits, latency against batch, items processed by loss "
            "(needs matplotlib: pip install pytest-trainperf[plots])", parse_plots, metavar="DIR"),
    _Option("--trainperf-against", "compare each trainperf cell with the same cell at git revision REF (branch, "
            "tag or commit), measured side by side: two child processes, one per tree, alternate their steps "
            "in lockstep; no baseline file is read or written (implies --trainperf; POSIX only)",
            parse_ref, metavar="REF"),
    _Option("--trainperf-confirm-against", "where a cell whose step time regressed against its stored baseline "
            "is confirmed, side by side on this machine in lockstep: baseline (default: the commit holding the code "
            "the baseline measured), a git revision, or none (the stored verdict stands)", parse_confirm_against,
            metavar="POLICY"),
    _Option("--trainperf-pairs", "the budget of timed step pairs per cell of a side-by-side comparison: the verdict "
            "is looked at after min(N, 20) pairs and every 10 more, and the pairs stop once regressed or once a "
            "slowdown of tolerance + 3 points is ruled out; at most "
            f"4 x N, within --trainperf-max-time (default: {DEFAULT_PAIRS})",
            parse_pairs, metavar="N"),
    _Option("--trainperf-nnodes", "nodes the ranks of each distributed cell (tp.ranks) are spread over: run the same "
            "session on every node with the same --trainperf-rdzv-endpoint and --trainperf-rdzv-id; world_size "
            "ranks per cell, world_size / N on each node (default: 1, every rank on this machine)",
            parse_nnodes, metavar="N"),
    _Option("--trainperf-rdzv-endpoint", "the c10d rendezvous endpoint of a multi-node session (--trainperf-nnodes "
            "> 1), HOST:PORT of one of the nodes, reachable from all (torchrun's --rdzv-endpoint)",
            parse_endpoint, metavar="HOST:PORT"),
    _Option("--trainperf-rdzv-id", "the id of a multi-node session, the same on every node and unique to the "
            "session (torchrun's --rdzv-id; e.g. the CI job's id): each cell's ranks meet under it",
            parse_rdzv_id, metavar="ID"),
    _Option("--trainperf-csv", "write the session's results to this CSV file, one row per cell and metric: value, "
            "baseline, change, interval, tolerance, status, and the cell's trainperf.info metadata",
            parse_csv, metavar="PATH"),
)


def add_options(parser: pytest.Parser) -> None:
    """Register every option and its ini twin."""
    group = parser.getgroup("trainperf", "performance regression testing of training (pytest-trainperf)")
    for opt in OPTIONS:
        if opt.flag:
            group.addoption(opt.name, action="store_true", default=None, dest=opt.dest, help=opt.help)
            parser.addini(opt.dest, f"{opt.help} (ini twin of {opt.name})", type="bool", default=False)
        else:
            group.addoption(opt.name, action="store", type=opt.parse, default=None, dest=opt.dest,
                            metavar=opt.metavar, help=opt.help)
            parser.addini(opt.dest, f"{opt.help} (ini twin of {opt.name})", default=None)


@dataclass(frozen=True)
class Settings:
    """What the user asked for, resolved once per session."""

    enabled: bool
    """Measure and compare (``--trainperf``, or implied by an update)."""
    update: bool
    """Write the baselines of the cells that ran."""
    baselines: Path
    """Directory of baseline files."""
    device: str
    """``auto`` or an explicit device string."""
    strict: bool
    """A cell without a baseline fails."""
    show: tuple[str, ...]
    """Metrics rendered as heatmaps."""
    threads: int | None
    """Intra-op threads during measurement (None: torch's count at session start)."""
    confirm: int = DEFAULT_CONFIRM
    """Re-measurements that must all regress too before a timing regression fails the cell."""
    malloc: str = MALLOC_MODES[0]
    """``fixed`` or ``system`` (see :mod:`pytest_trainperf.measure.host`)."""
    rounds: int = DEFAULT_ROUNDS
    """Measurement rounds per cell of an update (the noise band)."""
    memory_budget: int | None = None
    """Bytes of peak memory beyond which a cell counts as out of memory (emulated); None: no budget."""
    max_time: float = DEFAULT_MAX_TIME
    """Seconds of adaptive measurement allowed per cell."""
    json: Path | None = None
    """Where to write the session's results as JSON (None: nowhere)."""
    markdown: Path | None = None
    """Where to write the session's Markdown report (None: only ``$GITHUB_STEP_SUMMARY``, if set)."""
    devices: tuple[str, ...] = ()
    """One device per pytest-xdist worker (empty: every worker measures on :attr:`device`)."""
    cudnn_benchmark: str = CUDNN_BENCHMARK[0]
    """``torch.backends.cudnn.benchmark`` during measurement: ``keep``, ``on`` or ``off``."""
    isolate: bool = False
    """Run each cell in a fresh child process (see :mod:`pytest_trainperf.runners.isolated`)."""
    plots: Path | None = None
    """The directory to write PNG figures to (None: no figures)."""
    against: str | None = None
    """The git revision to compare with in lockstep (:mod:`pytest_trainperf.runners.lockstep`); None: the baselines."""
    pairs: int = DEFAULT_PAIRS
    """Timed step pairs per cell of a lockstep comparison."""
    confirm_against: str = CONFIRM_BASELINE
    """Where a timing regression against a stored baseline is confirmed side by side: ``baseline``
    (the commit the baseline measured), ``none``, or a git revision."""
    nnodes: int = 1
    """Nodes a distributed cell's ranks are spread over (``--trainperf-nnodes``)."""
    rdzv_endpoint: str | None = None
    """``host:port`` where the nodes of a multi-node session meet (None: one node, a free local port)."""
    rdzv_id: str | None = None
    """The id of a multi-node session, the same on every node (None: one node)."""
    csv: Path | None = None
    """Where to write the session's results as CSV, one row per cell and metric (None: nowhere)."""


def _value(config: pytest.Config, opt: _Option) -> Any:
    """The option's value: the command line if given, else the ini twin (checked), else None."""
    cli = config.getoption(opt.dest)
    if cli is not None:
        return cli
    raw = config.getini(opt.dest)
    if opt.flag:
        return bool(raw)
    if raw is None or raw == "" or raw == []:
        return None
    assert opt.parse is not None
    try:
        return opt.parse(str(raw))
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"ini option {opt.dest} (twin of {opt.name}): {exc}") from None


def _file(config: pytest.Config, dest: str, raw: str | None) -> Path | None:
    """A path option: a command-line value relative to the current directory, an ini one to the ini file."""
    if raw is None:
        return None
    if config.getoption(dest) is not None:
        return config.invocation_params.dir / raw
    return (config.inipath.parent if config.inipath is not None else config.rootpath) / raw


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (after resolving ``..`` and links)."""
    resolved, folder = path.resolve(), directory.resolve()
    return resolved == folder or folder in resolved.parents


def check_outputs(settings: Settings) -> None:
    """Refuse outputs that collide, naming both options: ``--trainperf-json`` or
    ``--trainperf-markdown`` inside the baselines directory (a report would sit among the baselines,
    committed with them or taken for one), or both naming the same file (one would overwrite the
    other). Raises :class:`pytest.UsageError`."""
    outputs = [(name, path) for name, path in (("--trainperf-json", settings.json),
                                                ("--trainperf-markdown", settings.markdown),
                                                ("--trainperf-csv", settings.csv)) if path is not None]
    for name, path in outputs:
        if _inside(path, settings.baselines):
            raise pytest.UsageError(
                f"{name} ({path}) is inside the baselines directory of --trainperf-baselines "
                f"({settings.baselines}): expected a file outside it (the report would sit among the baselines)")
    for i, (first, path) in enumerate(outputs):
        for second, other in outputs[i + 1:]:
            if path.resolve() == other.resolve():
                raise pytest.UsageError(f"{first} and {second} both name {path}: expected two different files "
                                        "(one would overwrite the other)")


def resolve(config: pytest.Config) -> Settings:
    """Resolve the command line and the ini file into :class:`Settings` (command line wins); refuse
    outputs that collide (:func:`check_outputs`)."""
    values = {opt.dest: _value(config, opt) for opt in OPTIONS}
    baselines_raw = values["trainperf_baselines"]
    if baselines_raw is None:
        baselines = config.rootpath / "baselines"
    elif config.getoption("trainperf_baselines") is not None:
        baselines = config.invocation_params.dir / baselines_raw
    else:
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        baselines = base / baselines_raw
    update = bool(values["trainperf_update_baselines"])
    against = values["trainperf_against"]
    settings = Settings(
        enabled=bool(values["trainperf"]) or update or against is not None,
        update=update,
        baselines=baselines,
        device=values["trainperf_device"] or "auto",
        strict=bool(values["trainperf_strict"]),
        show=values["trainperf_show"] or DEFAULT_SHOW,
        threads=values["trainperf_threads"],
        confirm=DEFAULT_CONFIRM if values["trainperf_confirm"] is None else values["trainperf_confirm"],
        malloc=values["trainperf_malloc"] or MALLOC_MODES[0],
        rounds=values["trainperf_rounds"] or DEFAULT_ROUNDS,
        memory_budget=values["trainperf_memory_budget"],
        max_time=values["trainperf_max_time"] or DEFAULT_MAX_TIME,
        json=_file(config, "trainperf_json", values["trainperf_json"]),
        markdown=_file(config, "trainperf_markdown", values["trainperf_markdown"]),
        devices=values["trainperf_devices"] or (),
        cudnn_benchmark=values["trainperf_cudnn_benchmark"] or CUDNN_BENCHMARK[0],
        isolate=bool(values["trainperf_isolate"]),
        plots=_file(config, "trainperf_plots", values["trainperf_plots"]),
        against=against,
        pairs=values["trainperf_pairs"] or DEFAULT_PAIRS,
        confirm_against=values["trainperf_confirm_against"] or CONFIRM_BASELINE,
        nnodes=values["trainperf_nnodes"] or 1,
        rdzv_endpoint=values["trainperf_rdzv_endpoint"],
        rdzv_id=values["trainperf_rdzv_id"],
        csv=_file(config, "trainperf_csv", values["trainperf_csv"]),
    )
    check_outputs(settings)
    check_nodes(settings)
    if settings.nnodes > 1 and config.getoption("numprocesses", None):
        raise pytest.UsageError(f"--trainperf-nnodes={settings.nnodes} with pytest-xdist (-n): expected one process "
                                "per node (every node must launch the same cells in the same order, and the nodes "
                                "meet at one endpoint)")
    return settings


def check_nodes(settings: Settings) -> None:
    """Refuse a multi-node session that misses what every node must share (``--trainperf-nnodes`` > 1
    needs ``--trainperf-rdzv-endpoint`` and ``--trainperf-rdzv-id``), or endpoint options without it.
    Raises :class:`pytest.UsageError`."""
    given = [name for name, value in (("--trainperf-rdzv-endpoint", settings.rdzv_endpoint),
                                      ("--trainperf-rdzv-id", settings.rdzv_id)) if value is not None]
    if settings.nnodes > 1 and len(given) < 2:
        missing = " and ".join(n for n in ("--trainperf-rdzv-endpoint", "--trainperf-rdzv-id") if n not in given)
        raise pytest.UsageError(f"--trainperf-nnodes={settings.nnodes} needs {missing}: expected the rendezvous "
                                "endpoint (HOST:PORT) and the session's id, the same on every node")
    if settings.nnodes == 1 and given:
        raise pytest.UsageError(f"{' and '.join(given)} given without --trainperf-nnodes: expected "
                                "--trainperf-nnodes=N (N > 1) with them (one node meets on a free local port)")
