"""What the tests that build a temporary git repository share: a tiny training step (optionally
slowed by a sleep, which adds no FLOPs) and git run in that repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

WORKLOAD = """
import time

import torch
from torch import nn

SLEEP = {sleep}


def build():
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        if SLEEP:
            time.sleep(SLEEP)  # slower, not more FLOPs: only the timings change
        return loss

    return step
"""


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=where, check=True, capture_output=True, text=True).stdout.strip()
