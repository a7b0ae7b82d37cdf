"""Distributed cells (``tp.ranks``): 2 ranks on gloo, launched for real by torch's elastic launcher.

The parent session runs in-process (pytester); every rank is a real child process that imports torch,
so the launched cells are few: a DDP and an FSDP2 cell updated, compared (they pass), then the DDP
cell with its gradients all-reduced twice and rank 1 sleeping 50 ms a step; a hanging and a raising
cell. The rest (the merge of the ranks, the marker's checks, the collective counter) is tested
without launching anything."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import torch

import pytest_trainperf as tp
from pytest_trainperf import scratch
from pytest_trainperf.grid import GridError, make_ranks
from pytest_trainperf.measure.comm import CommCount
from pytest_trainperf.records import Measurement, Metric, Outcome
from pytest_trainperf.runners.ranks import loss_disagreement, merge

INI = "[pytest]\ntrainperf_rounds = 1\n"

CELLS = """
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import pytest_trainperf as tp

TOLERANCE = float(os.environ.get("STEP_TOLERANCE", "100"))  # timings on a shared runner are not the point


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))


def train(trainperf, model, knobs=False):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(trainperf.rank))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        if knobs and os.environ.get("DOUBLE"):  # the regression: gradients all-reduced a second time
            for p in model.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        if knobs and os.environ.get("SLOW") and trainperf.rank == 1:
            time.sleep(0.05)
        return loss

    trainperf.train(step, steps=5, warmup=1)


@tp.ranks(world_size=2)
@tp.tolerance(step_time=TOLERANCE)
def test_ddp(trainperf):
    from torch.nn.parallel import DistributedDataParallel

    assert (trainperf.world_size, dist.get_world_size()) == (2, 2)
    assert trainperf.rank == dist.get_rank() and str(trainperf.device) == "cpu"
    train(trainperf, DistributedDataParallel(mlp()), knobs=True)


@tp.ranks(world_size=2)
@tp.tolerance(step_time=100, peak_memory=0.05)  # FSDP2 on gloo: two peaks (buffers freed async)
def test_fsdp(trainperf):
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    train(trainperf, model)
"""

FAILING = """
import time

import torch
import torch.distributed as dist

import pytest_trainperf as tp


def step():
    t = torch.ones(4)
    dist.all_reduce(t)
    return t.sum()


@tp.ranks(world_size=2, timeout=10)
def test_hang(trainperf):
    if trainperf.rank == 1:
        time.sleep(3600)  # rank 0 waits in its all-reduce
    trainperf.train(step, steps=2, warmup=0)


@tp.ranks(world_size=2)
def test_raise(trainperf):
    if trainperf.rank == 1:
        raise ValueError("rank one broke")
    trainperf.train(step, steps=2, warmup=0)
"""


@pytest.fixture(autouse=True)
def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)


def cells(pytester: pytest.Pytester) -> dict[str, dict]:
    doc = json.loads((pytester.path / "r.json").read_text())
    return {c["test"]: c for c in doc["cells"]}


def metric(cell: dict, name: str) -> float:
    (value,) = [m["value"] for m in cell["verdict"]["measurement"]["metrics"] if m["name"] == name]
    return float(value)


def breakdown(cell: dict, name: str) -> dict[str, float]:
    (found,) = [b for b in cell["verdict"]["measurement"]["breakdowns"] if b["metric"] == name]
    return {part: amount for part, amount in found["parts"]}


def ranks_alive(where: Path) -> list[psutil.Process]:
    """Rank processes started for the cells under ``where`` that are still alive."""
    alive = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "PYTEST_TRAINPERF_RANKS" in cmdline and str(where) in cmdline:
            alive.append(proc)
    return alive


# ------------------------------------------------------------------ launched


def test_ddp_and_fsdp_cells_measured_and_judged(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_cells=CELLS)
    update = pytester.runpytest("--trainperf-update-baselines", "--trainperf-json=r.json")
    update.assert_outcomes(passed=2)
    stored = json.loads((pytester.path / "baselines" / "test_cells.json").read_text())
    (env,) = stored["environments"].values()
    assert "threads 1" in next(iter(stored["environments"]))  # 2 ranks share the machine's cores
    ddp = env["tests"]["test_ddp"]["default"]
    assert {p for p, _ in ddp["breakdowns"]["peak_memory"]["parts"]} == {"rank 0", "rank 1"}

    # the DDP cell with its gradients all-reduced twice and rank 1 sleeping 50 ms a step; the FSDP cell as it was
    monkeypatch.setenv("DOUBLE", "1")
    monkeypatch.setenv("SLOW", "1")
    monkeypatch.setenv("STEP_TOLERANCE", "1.0")
    compare = pytester.runpytest("--trainperf", "--trainperf-json=r.json", "--trainperf-confirm=1")
    compare.assert_outcomes(passed=1, failed=1)
    compare.stdout.fnmatch_lines(["*_ test_ddp _*", "*step_time: baseline*",
                                  "*comm_bytes: baseline 16.4 KiB, now 32.8 KiB, change +100% (tolerance 0.0%)",
                                  "*collectives whose bytes appeared or grew: +16.4 KiB all_reduce",
                                  "*(timings confirmed by 1 re-measurement*"])  # the ranks launched again
    found = cells(pytester)
    ddp_cell, fsdp_cell = found["test_ddp"], found["test_fsdp"]
    assert {c["verdict"]["baseline_outcome"] for c in found.values()} == {"measured"}
    assert {m["status"] for m in fsdp_cell["verdict"]["metrics"]} <= {"unchanged", "improved"}
    regressed = {m["name"] for m in ddp_cell["verdict"]["metrics"] if m["status"] == "regressed"}
    assert {"step_time", "comm_calls", "comm_bytes"} <= regressed
    # DDP: every gradient in one bucket, all-reduced (now twice: the bucket, then each gradient); FSDP2:
    # each layer gathered in the forward and again in the backward, its gradients reduce-scattered
    params = 4 * (32 * 64 + 64 + 64 * 32 + 32)
    assert breakdown(ddp_cell, "comm_bytes") == {"all_reduce": 2 * params}
    assert breakdown(ddp_cell, "comm_calls") == {"all_reduce": 1 + 4}
    assert breakdown(fsdp_cell, "comm_calls") == {"all_gather": 4, "reduce_scatter": 2}
    assert breakdown(fsdp_cell, "comm_bytes") == {"all_gather": 2 * params, "reduce_scatter": params}
    assert metric(fsdp_cell, "comm_bytes") == 3 * params
    assert metric(ddp_cell, "step_time") >= 0.05  # the slowest rank's step: rank 1 sleeps 50 ms in each
    assert metric(ddp_cell, "straggler") >= 0.025  # rank 0 does the same work without the sleep
    assert metric(fsdp_cell, "straggler") >= 0


FREED = CELLS[:CELLS.index("@tp.ranks")] + """
def freed(path):
    with open(path, "a") as out:
        out.write(f"{dist.is_initialized()}\\n")


@tp.ranks(world_size=2)
@tp.tolerance(step_time=100)
def test_freed(trainperf):
    import weakref
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(mlp())
    weakref.finalize(model, freed, os.path.join(os.environ["FREED_DIR"], f"rank{trainperf.rank}"))
    train(trainperf, model)
"""


def test_a_rank_frees_the_tests_ddp_model_before_it_destroys_its_process_group(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture keeps the test's step (to re-time it), and so its DDP model, whose reducer holds the
    gloo group. Freed after ``destroy_process_group()``, the reducer frees the group with the GIL held
    while a gloo thread waits for the GIL: a rank that hangs now and then (pytorch/pytorch#56297). So a
    rank lets go of the test's objects first: the model is freed while the group is still up."""
    pytester.makepyfile(test_freed=FREED)
    monkeypatch.setenv("FREED_DIR", str(pytester.path))
    pytester.runpytest("--trainperf").assert_outcomes(passed=1)
    assert [(pytester.path / f"rank{rank}").read_text() for rank in (0, 1)] == ["True\n", "True\n"]


def test_hanging_and_raising_ranks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING)
    result = pytester.runpytest("--trainperf", "--trainperf-json=r.json")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*trainperf regression: timeout*",
                                 "*timed out after 10 s (tp.ranks(timeout=...)): a hung collective*"])
    result.stdout.fnmatch_lines(["*trainperf: rank 1 of 2 failed:*", "*ValueError: rank one broke*"])
    assert "During handling" not in result.stdout.str()
    found = cells(pytester)
    assert found["test_hang"]["verdict"]["measurement"]["outcome"] == Outcome.TIMEOUT.value
    assert "test_raise" not in found  # a failed test is no cell
    assert ranks_alive(pytester.path) == []
    assert not list(Path(tempfile.gettempdir()).glob(f"{scratch.PREFIX}ranks-{os.getpid()}-*"))  # removed


# ------------------------------------------------------------------ collection


def test_marker_checked_at_collection(pytester: pytest.Pytester) -> None:
    head = "import pytest_trainperf as tp\n\n"
    pytester.makepyfile(**{name: head + body for name, body in {
        "test_neither": "@tp.ranks()\ndef test_neither(trainperf):\n    pass\n",
        "test_both": "@tp.grid(world_size=[1, 2])\n@tp.ranks(world_size=2)\ndef test_both(trainperf, world_size):\n"
                     "    pass\n",
        "test_zero": "@tp.grid(world_size=[0, 2])\n@tp.ranks()\ndef test_zero(trainperf, world_size):\n    pass\n",
        "test_no_fixture": "@tp.ranks(world_size=2)\ndef test_no_fixture():\n    pass\n",
        "test_axis": "@tp.grid(world_size=[1, 2])\n@tp.ranks()\ndef test_axis(trainperf, world_size):\n    pass\n",
    }.items()})
    result = pytester.runpytest("--collect-only", "-q", "--continue-on-collection-errors")
    result.stdout.fnmatch_lines_random([
        "*test_neither: tp.ranks: expected world_size=N or a grid axis 'world_size', got neither*",
        "*test_both: tp.ranks(world_size=2) and the grid axis 'world_size' both give the ranks*",
        "*test_zero: tp.grid axis 'world_size' of a tp.ranks test: expected integers >= 1, got 0*",
        "*test_no_fixture: tp.ranks: expected the test to take the 'trainperf' fixture*",
        "*test_axis[[]world_size=1[]]*", "*test_axis[[]world_size=2[]]*",
    ])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"world_size": 0}, "tp.ranks: expected world_size=None (the grid axis 'world_size') or an integer >= 1, got 0"),
    ({"world_size": "2"}, "got '2'"),
    ({"world_size": True}, "got True"),
    ({"world_size": 2, "timeout": 0}, "tp.ranks: expected timeout= a positive finite number of seconds, got 0"),
    ({"world_size": 2, "timeout": float("inf")}, "got inf"),
])
def test_marker_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tp.ranks(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("same_loss", "expected"), [(False, None), (True, 1e-6), (1e-4, 1e-4), (0, 0.0)])
def test_same_loss_tolerance(same_loss: object, expected: float | None) -> None:
    assert make_ranks(2, same_loss=same_loss).same_loss == expected


@pytest.mark.parametrize("same_loss", ["yes", -0.1, 1.0, float("nan")])
def test_same_loss_refused(same_loss: object) -> None:
    with pytest.raises(GridError, match=r"tp.ranks: expected same_loss=True, False or a relative tolerance in "
                                        r"\[0, 1\) \(e.g. 1e-4\), got "):
        tp.ranks(2, same_loss=same_loss)  # type: ignore[arg-type]


def test_loss_disagreement_names_the_step_the_ranks_and_the_values() -> None:
    agree = [[1.0, 0.5, 0.25], [1.0, 0.5 * (1 + 1e-8), 0.25]]
    assert loss_disagreement(agree, 1e-6) == ""
    assert loss_disagreement([[2.0]], 0.0) == ""  # one rank: nothing to compare
    off = [[1.0, 0.5, 0.25], [1.0, 0.5, 0.25], [1.0, 1.5, 1.25]]
    assert loss_disagreement(off, 1e-6) == ("the ranks' losses disagree at trainperf.train step 1: rank 0 returned "
                                            "0.5, rank 2 returned 1.5 (expected equal within a relative 1e-06: "
                                            "tp.ranks(same_loss=...))")
    assert loss_disagreement([[1.0, 0.5], [1.01, 0.5]], 0.05) == ""  # within the tolerance given
    assert "different numbers of trainperf.train steps (rank 0: 2, rank 1: 1)" in loss_disagreement(
        [[1.0, 0.5], [1.0]], 1e-6)


def test_marker_once() -> None:
    def f(trainperf: object) -> None:
        pass

    with pytest.raises(GridError, match="tp.ranks applied twice to 'f': expected one tp.ranks per test"):
        tp.ranks(2)(tp.ranks(2)(f))


# ------------------------------------------------------------------ the merge of the ranks


def _rank(step: tuple[float, ...], peak: float, flops: float = 100.0, outcome: Outcome = Outcome.MEASURED,
          detail: str = "") -> Measurement:
    if outcome is not Outcome.MEASURED:
        return Measurement(test="test_x", cell="default", params=(), metrics=(), outcome=outcome, detail=detail)
    metrics = (Metric("step_time", sorted(step)[len(step) // 2], "s", samples=step),
               Metric("throughput", 1.0, "items/s"), Metric("peak_memory", peak, "B"), Metric("flops", flops, "FLOP"),
               Metric("loss", peak / 1000, ""))
    return Measurement(test="test_x", cell="default", params=(), metrics=metrics, items_per_step=4.0)


def test_merge_takes_the_slowest_rank_per_step() -> None:
    merged = merge([_rank((1.0, 5.0, 2.0), 100.0), _rank((3.0, 1.0, 2.5), 300.0)])
    step = merged.metric("step_time")
    assert step is not None and step.samples == pytest.approx((3.0, 5.0, 2.5)) and step.value == pytest.approx(3.0)
    straggler = merged.metric("straggler")
    assert straggler is not None and straggler.value == pytest.approx(2.0)  # spreads 2, 4, 0.5: their median
    throughput = merged.metric("throughput")
    # both ranks' items per step over the slowest step
    assert throughput is not None and throughput.samples == pytest.approx((8 / 3.0, 8 / 5.0, 8 / 2.5))
    assert merged.metric("peak_memory").value == pytest.approx(300.0)  # type: ignore[union-attr]
    assert merged.breakdown("peak_memory").parts == (("rank 0", 100.0), ("rank 1", 300.0))  # type: ignore[union-attr]
    assert merged.metric("loss").value == pytest.approx(0.1)  # type: ignore[union-attr]  # rank 0's
    assert merged.items_per_step == pytest.approx(8.0) and merged.notes == ()


def test_merge_notes_ranks_that_disagree_and_names_a_rank_that_did_not_measure() -> None:
    merged = merge([_rank((1.0,), 1.0, flops=100.0), _rank((1.0,), 1.0, flops=200.0)])
    assert merged.notes == ("the ranks' flops differ (rank 0: 100, rank 1: 200); rank 0's is the cell's",)
    oom = merge([_rank((1.0,), 1.0), _rank((1.0,), 0.0, outcome=Outcome.OOM, detail="OutOfMemoryError: CUDA")])
    assert oom.outcome is Outcome.OOM and oom.detail == "rank 1 of 2: OutOfMemoryError: CUDA"


# ------------------------------------------------------------------ the collective counter


def test_comm_count_by_collective() -> None:
    count = CommCount()
    grads = [torch.zeros(10), torch.zeros(6)]
    count.add("c10d", "allreduce_", (grads, None), {})
    count.add("c10d", "_allgather_base_", (torch.zeros(8), torch.zeros(4)), {})  # output, input
    count.add("c10d", "_reduce_scatter_base_", (torch.zeros(4), torch.zeros(8)), {})
    count.add("_c10d_functional", "all_reduce", (torch.zeros(2, dtype=torch.float16), "sum", "0"), {})
    count.add("_c10d_functional", "wait_tensor", (torch.zeros(2),), {})
    count.add("aten", "mm", (torch.zeros(2, 2), torch.zeros(2, 2)), {})
    assert dict(count.calls) == {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}
    assert dict(count.bytes) == {"all_reduce": 16 * 4 + 2 * 2, "all_gather": 32, "reduce_scatter": 32}
    assert [(m.name, m.value) for m in count.metrics()] == [("comm_calls", 4.0), ("comm_bytes", 132.0)]


NCCL = """
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pytest_trainperf as tp


@tp.ranks(world_size=2)
@tp.tolerance(step_time=100)
def test_ddp_nccl(trainperf):
    assert dist.get_backend() == "nccl" and trainperf.device == torch.device("cuda", trainperf.rank)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).to(trainperf.device))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 32, device=trainperf.device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=5, warmup=1)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
                    reason="NCCL ranks need two CUDA devices (one per rank) and a torch built with NCCL")
def test_a_ddp_cell_on_two_gpus_runs_on_nccl_and_counts_its_all_reduce(pytester: pytest.Pytester) -> None:
    """What the hardware must give: one rank per GPU on NCCL, the same exact all-reduce volume as on gloo,
    and the CUDA allocator's peak of each rank."""
    pytester.makepyfile(test_nccl=NCCL)
    update = pytester.runpytest("--trainperf-update-baselines", "--trainperf-device=cuda", "--trainperf-json=r.json")
    update.assert_outcomes(passed=1)
    cell = cells(pytester)["test_ddp_nccl"]
    params = 4 * (32 * 64 + 64 + 64 * 32 + 32)
    assert breakdown(cell, "comm_bytes") == {"all_reduce": params}
    assert breakdown(cell, "comm_calls") == {"all_reduce": 1}
    assert metric(cell, "peak_memory") > 0 and metric(cell, "reserved_memory") >= metric(cell, "peak_memory")
    pytester.runpytest("--trainperf", "--trainperf-device=cuda").assert_outcomes(passed=1)
