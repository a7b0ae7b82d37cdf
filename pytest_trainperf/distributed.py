"""pytest-xdist: cells run on the workers, their results travel to the controller, one device per worker.

Each worker measures its cells and writes its baseline updates itself (``store.update`` holds a lock on
the baseline directory, so workers updating one file take turns and no cell is lost). At the end of its
session a worker puts its cells, baseline changes and write errors into ``config.workeroutput``; the
controller reads them in ``pytest_testnodedown`` into its own session object, which then renders the
one summary, JSON and Markdown of the run. :class:`TrainPerfXdist` is registered only when xdist is.

``--trainperf-devices=cuda:0,cuda:1`` gives worker ``gwN`` the N-th device (modulo the list); without
xdist the first.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest

from pytest_trainperf import results
from pytest_trainperf.settings import Settings

if TYPE_CHECKING:
    from pytest_trainperf.outputs import TrainPerfOutputs

PLUGIN_NAME = "trainperf-xdist"
"""The name the xdist integration is registered under."""
OUTPUT_KEY = "trainperf"
"""The key of a worker's results in ``config.workeroutput`` (a result-file text)."""
WORKER_RE = re.compile(r"^gw(\d+)$")
"""An xdist worker id."""


def worker_id(config: pytest.Config) -> str | None:
    """This process's xdist worker id (``gw0``...), None on the controller or without xdist."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        return str(workerinput.get("workerid"))
    return os.environ.get("PYTEST_XDIST_WORKER")


def is_worker(config: pytest.Config) -> bool:
    """True in an xdist worker process."""
    return hasattr(config, "workerinput")


def worker_device(devices: Sequence[str], worker: str | None) -> str:
    """The device of worker ``gwN``: the N-th of ``devices``, modulo their number; the first for no
    worker (or an id that is not ``gwN``)."""
    match = WORKER_RE.match(worker or "")
    index = int(match.group(1)) if match else 0
    return devices[index % len(devices)]


def assign_device(settings: Settings, config: pytest.Config) -> Settings:
    """``settings`` with ``device`` set to this worker's one of ``--trainperf-devices`` (unchanged
    when none are given): the one place the per-worker device overrides ``--trainperf-device``."""
    if not settings.devices:
        return settings
    return dataclasses.replace(settings, device=worker_device(settings.devices, worker_id(config)))


def oversubscription(workers: int, threads: int, cores: int | None) -> str | None:
    """The warning for CPU timings taken by more busy threads than cores, or, with several workers, by
    as many (no core left to the OS and pytest: on a 2-core runner two busy threads made unchanged
    code fail now and then); None when they fit."""
    busy = workers * threads
    if cores is None or busy < cores or (busy == cores and workers <= 1):
        return None
    who = f"{workers} pytest-xdist workers x " if workers > 1 else ""
    return (f"{who}{threads} measuring thread{'s' * (threads != 1)} on {cores} CPU core{'s' * (cores != 1)}: "
            "CPU timings compete for cores, so step_time and throughput are unsound in this run; the exact "
            "metrics (flops, peak_memory, loss and recorded values) are still sound. Use fewer workers "
            "(-n) or --trainperf-threads so that workers x threads < cores.")


class TrainPerfXdist:
    """Moves each worker's results to the controller: a consumer of the session's results on a worker,
    a producer of them on the controller."""

    def __init__(self, config: pytest.Config, ledger: results.Ledger, outputs: TrainPerfOutputs) -> None:
        self.config = config
        self.ledger = ledger
        self.outputs = outputs

    @pytest.hookimpl(trylast=True)  # after the session object has written the worker's baseline updates
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not is_worker(self.config):
            return
        output: dict[str, Any] = self.config.workeroutput  # type: ignore[attr-defined]
        # the controller states the CPU warnings for the whole run itself; the session's own travel
        output[OUTPUT_KEY] = results.dump(self.ledger.snapshot())
        # the results now belong to the controller: the worker renders no summary of its own
        self.ledger.clear()

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """On the controller: take in a worker's cells, baseline changes and write errors."""
        self.outputs.workers += 1
        text = getattr(node, "workeroutput", {}).get(OUTPUT_KEY)
        if text is None:
            return
        worker = getattr(getattr(node, "gateway", None), "id", "worker")
        try:
            received = results.loads(f"trainperf results of {worker}", text)
        except results.ResultsError as exc:
            self.ledger.errors.append(str(exc))
            return
        self.ledger.absorb(received)
