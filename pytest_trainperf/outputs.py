"""Results for machines and reviewers: JUnit properties, ``--trainperf-json``, ``--trainperf-markdown``,
``$GITHUB_STEP_SUMMARY`` and ``--trainperf-plots``.

:class:`TrainPerfOutputs` is a consumer of the session's results: it reads the session's
:class:`~pytest_trainperf.results.Ledger` at the end (on the controller under xdist, after the workers'
results arrived) and writes each output once; the rendering itself lives in
the pure :mod:`pytest_trainperf.results`, :mod:`pytest_trainperf.report.markdown` and
:mod:`pytest_trainperf.report.plots`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_trainperf import results
from pytest_trainperf.distributed import is_worker, oversubscription
from pytest_trainperf.judge import UPDATE_HINT
from pytest_trainperf.records import CellResult
from pytest_trainperf.runners.children import STEP_SUMMARY_ENV
from pytest_trainperf.settings import Settings

PLUGIN_NAME = "trainperf-outputs"
"""The name the outputs object is registered under."""
JUNIT_METRICS = ("step_time", "throughput", "peak_memory", "flops", "loss")
"""Metrics attached to a cell's JUnit test case (with any other that regressed)."""


def cpu_warnings(cells: list[CellResult], workers: int) -> tuple[str, ...]:
    """The oversubscription warning when CPU cells were timed by more threads than there are cores."""
    threads = [r.fingerprint.threads for r in cells if r.fingerprint.device_type == "cpu"]
    if not threads:
        return ()
    warning = oversubscription(max(workers, 1), max(threads), os.cpu_count())
    return () if warning is None else (warning,)


def junit_properties(result: CellResult) -> list[tuple[str, object]]:
    """``trainperf.*`` properties of a cell's test case: its status, environment, and the value and
    change of each main metric."""
    verdict = result.verdict
    props: list[tuple[str, object]] = [("trainperf.status", verdict.status.value),
                                       ("trainperf.environment", result.fingerprint.key)]
    for m in verdict.metrics:
        if m.name not in JUNIT_METRICS and m not in verdict.regressions:
            continue
        props.append((f"trainperf.{m.name}", m.current))
        if m.change is not None:
            props.append((f"trainperf.{m.name}.change", m.change))
    return props


class TrainPerfOutputs:
    """Writes the session's results for machines (JSON, JUnit) and reviewers (Markdown)."""

    def __init__(self, config: pytest.Config, settings: Settings, ledger: results.Ledger) -> None:
        self.config = config
        self.settings = settings
        self.ledger = ledger
        self.workers = 0
        """xdist workers whose results arrived (0 without xdist)."""
        self.written: list[str] = []
        self.errors: list[str] = []
        self.warnings: tuple[str, ...] = ()

    @pytest.hookimpl(tryfirst=True)  # before the report copies item.user_properties
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> None:
        done = self.ledger.cells
        if call.when == "call" and done and done[-1].nodeid == item.nodeid:
            item.user_properties += junit_properties(done[-1])

    @pytest.hookimpl(trylast=True)  # after the baselines were written and the workers' results arrived
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if is_worker(self.config) or not self.ledger.cells:
            return
        settings = self.settings
        found = self.ledger.snapshot(cpu_warnings(self.ledger.cells, self.workers))
        self.warnings = found.warnings
        markdown = None
        if settings.markdown is not None or os.environ.get(STEP_SUMMARY_ENV):
            from pytest_trainperf.report.markdown import TITLE, render_markdown

            markdown = render_markdown(found, show=settings.show, hint="" if found.against else UPDATE_HINT,
                                       title=f"{TITLE} against {found.against}" if found.against else TITLE)
        try:
            if settings.json is not None:
                results.write(settings.json, found)
                self.written.append(f"JSON results: {self._shown(settings.json)}")
            if settings.csv is not None:
                results.write_csv(settings.csv, found)
                self.written.append(f"CSV results: {self._shown(settings.csv)}")
            if settings.markdown is not None and markdown is not None:
                settings.markdown.parent.mkdir(parents=True, exist_ok=True)
                settings.markdown.write_text(markdown, encoding="utf-8")
                self.written.append(f"Markdown report: {self._shown(settings.markdown)}")
            summary = os.environ.get(STEP_SUMMARY_ENV)
            if summary and markdown is not None:
                with open(summary, "a", encoding="utf-8") as fh:
                    fh.write(markdown + "\n")
                self.written.append(f"Markdown report appended to ${STEP_SUMMARY_ENV}")
            if settings.plots is not None:
                from pytest_trainperf.report.plots import write_plots

                figures = write_plots(found, settings.plots)
                self.written += [f"figure: {self._shown(path)}" for path in figures]
                if not figures:
                    self.written.append(f"figures: nothing to draw into {self._shown(settings.plots)}")
        except (OSError, results.ResultsError) as exc:
            self.errors.append(f"results not written: {exc}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(trylast=True)  # under the session's own trainperf section
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for warning in self.warnings:
            terminalreporter.write_line(f"trainperf warning: {warning}", yellow=True)
        for line in self.written:
            terminalreporter.write_line(f"trainperf: {line}")
        for error in self.errors:
            terminalreporter.write_line(f"trainperf: {error}", red=True, bold=True)

    def _shown(self, path: Path) -> str:
        try:
            return path.relative_to(self.config.invocation_params.dir).as_posix()
        except ValueError:
            return str(path)


def register(config: pytest.Config, settings: Settings, ledger: results.Ledger) -> None:
    """Register the outputs object, and the xdist integration where pytest-xdist is loaded."""
    outputs = TrainPerfOutputs(config, settings, ledger)
    config.pluginmanager.register(outputs, PLUGIN_NAME)
    if config.pluginmanager.hasplugin("xdist"):
        from pytest_trainperf.distributed import PLUGIN_NAME as XDIST_NAME
        from pytest_trainperf.distributed import TrainPerfXdist

        config.pluginmanager.register(TrainPerfXdist(config, ledger, outputs), XDIST_NAME)
