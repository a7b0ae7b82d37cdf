"""Distributed cells launched for real (2 ranks on gloo): failures on 2 pytest-xdist workers, two nodes.

One session on two xdist workers runs three cells, two at a time: a rank that crashes hard
(``os._exit(3)``), a rank that runs out of memory, and a DDP job on the same data whose ranks must agree
on the loss (``tp.ranks(same_loss=True)``) with rank 1 adding 1.0 to its loss. Each cell gets its
outcome naming the rank, no rank outlives its cell, and the cells after a failed one run; two jobs run at
once on the two workers without their rendezvous colliding. ``--trainperf-against`` refuses a
distributed cell (skipped, with the reason) before launching anything. Two pytest sessions on this
machine, one rank each, run one cell as two nodes (``--trainperf-nnodes=2``): the node of rank 0 judges
it over both ranks (a ``same_loss`` cell whose ranks agree); the multi-node options are checked when a
session starts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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


@tp.ranks(world_size=2, same_loss=True)
def test_same(trainperf):  # DDP on the same data: the same loss, but rank 1 adds 1.0 to it
    job(trainperf, same_data=True, off=1.0)
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
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    # a hard crash: the cell is crashed, naming the rank and its exit status; out of memory in one rank: the
    # cell is out of memory (no baseline: new, it passes), naming the rank
    result.stdout.fnmatch_lines_random(["  rank 1 of 2 crashed: exited with status 3 without a result",
                                        "OOM: test_failing_ranks.py::test_oom[[]default[]]: rank 1 of 2: *"])
    # rank 1 adds 1.0 to its loss: the ranks, the step and the two values
    result.stdout.fnmatch_lines(["trainperf: distributed cell test_failing_ranks.py::test_same (2 ranks):"
                                 " the ranks' losses disagree at trainperf.train step 0: rank 0 returned *, rank 1 "
                                 "returned * (expected equal within a relative 1e-06: tp.ranks(same_loss=...))"])
    assert "console_main" not in out  # a rank's last output line is its own, not pytest's deprecation
    doc = json.loads((pytester.path / "r.json").read_text())
    outcomes = {c["test"]: c["verdict"]["measurement"]["outcome"] for c in doc["cells"]}
    assert outcomes == {"test_crash": "crashed", "test_oom": "oom"}  # the cell that failed its check is no cell
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


# ------------------------------------------------------------------ multi-node

NODE_CELL = """
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pytest_trainperf as tp


@tp.ranks(world_size=2)
def test_broken(trainperf):  # first: a failed cell does not stop the nodes meeting for the next one
    if trainperf.rank == 1:
        raise ValueError("rank one broke")
    DistributedDataParallel(nn.Linear(16, 4))(torch.ones(2, 16)).sum().backward()  # waits for rank 1


@tp.ranks(world_size=2, same_loss=True)
def test_job(trainperf):
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))  # the same data: the same loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=2, warmup=1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_one_machine(pytester: pytest.Pytester) -> None:
    """Two pytest sessions (this process's, through pytester, and a child), one rank each, meet at the
    same endpoint under the same id, cell by cell: a cell whose rank 1 raises fails on both nodes (with
    rank 1's error where it ran), then the node that holds rank 0 of the next cell judges it over both
    ranks (the other rank's measurement gathered from the other node), the other says where it is judged."""
    port = free_port()
    pytester.makeini(INI)
    pytester.makepyfile(test_node_job=NODE_CELL)
    other = pytester.mkdir("node_b")  # the other node's checkout: the same files
    (other / "pytest.ini").write_text(INI)
    (other / "test_node_job.py").write_text(NODE_CELL)
    args = ["test_node_job.py", "--trainperf", "--trainperf-json=r.json", "-rs", "-p", "no:cacheprovider",
            "--trainperf-nnodes=2", f"--trainperf-rdzv-endpoint=localhost:{port}", "--trainperf-rdzv-id=session-1"]
    child = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=other, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        here = pytester.runpytest(*args)
    finally:
        there = child.communicate(timeout=240)[0]
    outs = {pytester.path: here.stdout.str(), other: there}
    assert here.ret == child.returncode == pytest.ExitCode.TESTS_FAILED, "\n".join(outs.values())
    assert all("test_node_job.py::test_broken" in out for out in outs.values())  # failed on both nodes
    assert sum("trainperf: rank 1 of 2 failed:" in out and "ValueError: rank one broke" in out
               for out in outs.values()) == 1  # where rank 1 ran; rank 0 failed in its all-reduce
    judged = [tree for tree, out in outs.items() if "1 failed, 1 passed" in out]
    assert len(judged) == 1, "\n".join(outs.values())  # one node (which one: the rendezvous decides) judges
    (skipped,) = [tree for tree in outs if tree not in judged]
    assert "1 failed, 1 skipped" in outs[skipped]
    assert ("test_node_job.py::test_job: ranks 1-1 of 2 ran here; the cell is judged, stored and reported on the "
            "node of rank 0 (--trainperf-nnodes=2)") in " ".join(outs[skipped].split())
    written = skipped / "r.json"  # nothing judged there
    assert not written.exists() or json.loads(written.read_text())["cells"] == []
    (cell,) = json.loads((judged[0] / "r.json").read_text())["cells"]
    parts = {b["metric"]: dict(b["parts"]) for b in cell["verdict"]["measurement"]["breakdowns"]}
    assert set(parts["peak_memory"]) == {"rank 0", "rank 1"}  # rank 1's came from the other node
    assert parts["comm_calls"] == {"all_reduce": 1}
    assert rank_processes(pytester.path) == []


@pytest.mark.parametrize(("args", "expected"), [
    (["--trainperf-nnodes=0"], "*--trainperf-nnodes: expected a positive integer number of nodes*got '0'*"),
    (["--trainperf-rdzv-endpoint=node0"], "*--trainperf-rdzv-endpoint: expected HOST:PORT with a port in 1-65535*"
                                          "got 'node0'*"),
    (["--trainperf-rdzv-endpoint=node0:70000"], "*--trainperf-rdzv-endpoint: expected HOST:PORT*got 'node0:70000'*"),
    (["--trainperf-rdzv-id=a b"], "*--trainperf-rdzv-id: expected an id of letters, digits*got 'a b'*"),
    (["--trainperf-nnodes=2", "--trainperf-rdzv-id=x"],
     "*--trainperf-nnodes=2 needs --trainperf-rdzv-endpoint: expected the rendezvous endpoint (HOST:PORT) and the "
     "session's id, the same on every node*"),
    (["--trainperf-rdzv-endpoint=[::1]:29400"],
     "*--trainperf-rdzv-endpoint given without --trainperf-nnodes: expected --trainperf-nnodes=N (N > 1)*"),
    (["--trainperf-nnodes=2", "--trainperf-rdzv-id=x", "--trainperf-rdzv-endpoint=h:1", "-n", "2"],
     "*--trainperf-nnodes=2 with pytest-xdist (-n): expected one process per node*"),
])
def test_node_options_checked(pytester: pytest.Pytester, args: list[str], expected: str) -> None:
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_node_options_ini_and_world_size_over_nodes(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrainperf_nnodes = 2\ntrainperf_rdzv_endpoint = localhost:29400\n"
                     "trainperf_rdzv_id = ci-42\n")
    pytester.makepyfile(test_three_ranks="""
import pytest_trainperf as tp


@tp.ranks(world_size=3)
def test_three(trainperf):
    raise AssertionError("never launched")
""")
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*trainperf: distributed cell test_three_ranks.py::test_three: world_size=3 over "
                                 "--trainperf-nnodes=2: expected a world size divisible by the nodes*"])
    pytester.makeini("[pytest]\ntrainperf_nnodes = two\n")
    bad = pytester.runpytest("--trainperf")
    bad.stderr.fnmatch_lines(["*ini option trainperf_nnodes (twin of --trainperf-nnodes): expected a positive "
                              "integer number of nodes*got 'two'*"])
