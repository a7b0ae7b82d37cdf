"""Measurements that respect the test's lifetime: a timing regression is confirmed inside the test,
before ``train``/``run`` returns to it, so that a test which tears down what its step uses (here, its
process group) at its end is confirmed, not crashed; record-only cells are not run again for noise."""

from __future__ import annotations

import json

import pytest

# A data-parallel step in a one-rank gloo group that the test creates and destroys itself. Every call of
# the step up to SLOW sleeps: 1 counted + 1 memory-tracked + 2 warm-up + 8 timed = 12 calls are the first
# measurement, so SLOW=12 is a transient slowdown that a re-timing clears, and SLOW=10**9 a lasting one.
# Gradients are all-reduced by hand, not by DistributedDataParallel: its reducer would hold the group
# past destroy_process_group and free it when the test returns, joining gloo's worker threads with the
# GIL held while a worker waits for the GIL to free a finished collective's tensors: a deadlock on a
# loaded runner (pytorch/pytorch#56297). Freed by destroy_process_group, the group lets the GIL go.
DDP_TEST = """
import time

import torch
import torch.distributed as dist

import pytest_trainperf as tp

CALLS = [0]


# a 100 ms sleep in a ~1 ms step reads +10000%: a 100% tolerance still fails it, and lets through the
# drift of a loaded runner between the update and the check (CI once read such a re-timed step +20.7%)
@tp.tolerance(step_time=1.0)
def test_ddp(trainperf):
    torch.manual_seed(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(32, 32)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(8, 32)

        def step():
            CALLS[0] += 1
            if CALLS[0] <= {slow}:
                time.sleep({sleep})
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            for p in model.parameters():  # averaged across ranks, as DDP does
                dist.all_reduce(p.grad)
            opt.step()
            logged = loss.detach().clone()
            dist.all_reduce(logged)  # the loss averaged across ranks, for the log: needs the default group
            return logged

        trainperf.train(step, steps=8, warmup=2)
    finally:
        dist.destroy_process_group()
"""
QUICK = ("--trainperf-confirm-against=none",)


def test_a_test_that_destroys_its_process_group_is_confirmed_inside_its_lifetime(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ddp=DDP_TEST.format(slow=0, sleep=0))
    pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=2").assert_outcomes(passed=1)
    # a transient slowdown: re-timed while the group is alive, cleared, and the cell passes
    pytester.makepyfile(test_ddp=DDP_TEST.format(slow=12, sleep=0.1))
    transient = pytester.runpytest("--trainperf", "--trainperf-confirm=1", *QUICK)
    transient.assert_outcomes(passed=1)
    assert "has not been initialized" not in transient.stdout.str()
    # a lasting one: both re-timings regress too, and the failure says it was confirmed
    pytester.makepyfile(test_ddp=DDP_TEST.format(slow=10**9, sleep=0.1))
    lasting = pytester.runpytest("--trainperf", "--trainperf-confirm=2", "--trainperf-json=r.json", *QUICK)
    lasting.assert_outcomes(failed=1)
    lasting.stdout.fnmatch_lines(["*trainperf regression: step_time +*",
                                  "*  (timings confirmed by 2 re-measurements; figures from the last)"])
    assert "has not been initialized" not in lasting.stdout.str()
    cell = json.loads((pytester.path / "r.json").read_text())["cells"][0]
    assert cell["status"] == "regressed"
