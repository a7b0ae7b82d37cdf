"""Distributed cells that fail, checked by launching them (2 ranks on gloo, 2 pytest-xdist workers).

One session on two xdist workers runs four cells, two at a time: a rank that crashes hard
(``os._exit(3)``), a rank that runs out of memory, and a DDP job on the same data whose ranks must
agree on the loss (``tp.ranks(same_loss=True)``), as it is and with rank 1 adding 1.0 to its loss. Each
cell gets its outcome naming the rank, no rank outlives its cell, and the cells after a failed one run;
two jobs run at once on the two workers without their rendezvous colliding. ``--trainperf-against``
refuses a distributed cell (skipped, with the reason) before launching anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

pytest_plugins = ["pytester"]

INI = "[pytest]\ntrainperf_rounds = 1\n"

CELLS = """
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pytest_trainperf as tp


def job(trainperf, same_data=False, broken=None, off=0.0):
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0 if same_data else trainperf.rank))
    calls = iter(range(1 << 30))

    def step():
        call = next(calls)
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        if broken is not None and trainperf.rank == 1 and call == 2:  # in the warm-up step
            broken()
        return loss + (off if trainperf.rank == 1 else 0.0)

    trainperf.train(step, steps=2, warmup=1)


def crash():
    os._exit(3)


def oom():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (rank one)")


@tp.ranks(world_size=2)
def test_crash(trainperf):
    job(trainperf, broken=crash)


@tp.ranks(world_size=2)
def test_oom(trainperf):
    job(trainperf, broken=oom)


@tp.grid(off=[0.0, 1.0])
@tp.ranks(world_size=2, same_loss=True)
def test_same(trainperf, off):
    job(trainperf, same_data=True, off=off)
"""

CONFTEST = """
import json
import os
import time

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):  # in each xdist worker: when it ran each cell (its ranks launched and done)
    started = time.time()
    try:
        return (yield)
    finally:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker and not os.environ.get("PYTEST_TRAINPERF_RANKS"):
            span = [worker, started, time.time()]
            with open(os.path.join(os.environ["SPANS"], f"{item.name}.json"), "w") as f:
                json.dump(span, f)
"""


def rank_processes(where: Path) -> list[psutil.Process]:
    """Rank processes started for the cells under ``where`` that are still alive."""
    alive = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "PYTEST_TRAINPERF_RANKS" in cmdline and str(where) in cmdline:
            alive.append(proc)
    return alive


def test_failing_ranks_on_two_xdist_workers(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_failing_ranks=CELLS)
    spans = pytester.mkdir("spans")
    monkeypatch.setenv("SPANS", str(spans))
    result = pytester.runpytest("-n", "2", "--trainperf", "--trainperf-json=r.json")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    # a hard crash: the cell is crashed, naming the rank and its exit status; out of memory in one rank: the
    # cell is out of memory (no baseline: new, it passes), naming the rank
    result.stdout.fnmatch_lines_random(["  rank 1 of 2 crashed: exited with status 3 without a result",
                                        "OOM: test_failing_ranks.py::test_oom[[]default[]]: rank 1 of 2: *"])
    # rank 1 adds 1.0 to its loss: the ranks, the step and the two values
    result.stdout.fnmatch_lines(["trainperf: distributed cell test_failing_ranks.py::test_same[[]off=1.0[]] (2 ranks):"
                                 " the ranks' losses disagree at trainperf.train step 0: rank 0 returned *, rank 1 "
                                 "returned * (expected equal within a relative 1e-06: tp.ranks(same_loss=...))"])
    assert "console_main" not in out  # a rank's last output line is its own, not pytest's deprecation
    doc = json.loads((pytester.path / "r.json").read_text())
    cells = {c["cell"]: c for c in doc["cells"] if c["test"] == "test_same"}
    outcomes = {c["test"]: c["verdict"]["measurement"]["outcome"] for c in doc["cells"]}
    assert outcomes["test_crash"] == "crashed" and outcomes["test_oom"] == "oom"
    assert list(cells) == ["off=0.0"]  # the cell that failed its check is no cell
    # the ranks of the disagreeing cell did run: their losses differ by exactly the 1.0 added
    rank0 = [line for line in out.splitlines() if "losses disagree" in line]
    values = rank0[0].split("rank 0 returned ")[1].split(", rank 1 returned ")
    assert float(values[1].split(" ")[0]) - float(values[0]) == pytest.approx(1.0)

    # two jobs ran at once, one launched by each worker: their rendezvous did not collide
    finished = [json.loads(p.read_text()) for p in Path(spans).iterdir()]
    assert {worker for worker, _, _ in finished} == {"gw0", "gw1"}
    assert any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in finished for b in finished)
    assert rank_processes(pytester.path) == []  # no rank outlives its cell
    assert psutil.Process().children(recursive=True) == []  # nor a worker


def test_against_refuses_a_distributed_cell(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_against_ranks="""
import pytest_trainperf as tp


@tp.ranks(world_size=2)
def test_job(trainperf):
    raise AssertionError("never launched")
""")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "one"]):
        subprocess.run(["git", *args], cwd=pytester.path, check=True, capture_output=True)
    result = pytester.runpytest("--trainperf-against=main", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*trainperf: test_against_ranks.py::test_job: a distributed cell (tp.ranks) is not "
                                 "compared with --trainperf-against=main: its ranks cannot take turns step by step*"])
    assert rank_processes(pytester.path) == []
