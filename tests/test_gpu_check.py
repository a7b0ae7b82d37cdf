"""The GPU self-check script (benchmarks/gpu_check.py): what can be checked without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TIMEOUT_S = 120
"""Generous: the script asks a child python whether torch sees CUDA."""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the refusal is for machines without it")
def test_without_cuda_the_check_exits_2_with_a_clear_message_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode == 2
    assert "gpu_check: no CUDA device" in done.stderr and "--device cpu" in done.stderr
    assert not out.exists()


def test_an_unknown_stage_is_refused_naming_the_stages(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--only", "nope",
                           "--out", str(tmp_path / "gpu.md")], capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    assert done.returncode == 2 and "--only: expected stages among environment, mfu" in done.stderr
