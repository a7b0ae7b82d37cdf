"""An early and a late memory-saving strategy against the baseline, over model sizes (seed figure 001).

A 4-block causal transformer LM of three sizes trains three ways: ``baseline`` keeps every
activation; ``early`` switches activation checkpointing on from the first block (all four blocks
recompute); ``late`` switches it on only at the third block (the last two). ``tp.relative`` reports
each strategy's peak memory and step time relative to the baseline of the same size: ``early`` saves
more memory and pays more recompute time than ``late``. The FLOPs every training cell measures give
each size its compute (the figure's x axis); they include the recomputed forward passes.

Guards: the memory each strategy saves and the time it costs, per size, against the baseline's
figures; a change that erodes the saving (or makes it dearer) fails although every cell on its own
may still be within its tolerance.

    pytest --trainperf examples/test_strategies.py
"""

from __future__ import annotations

import torch
from _models import TinyLM, lm_train_step

import pytest_trainperf as tp

LAYERS = 4
FIRST_CHECKPOINTED = {"baseline": LAYERS, "early": 0, "late": LAYERS // 2}
"""The first block that recomputes its activations (LAYERS: none does)."""
WIDTH = {"small": 32, "medium": 64, "large": 128}
"""d_model per size."""


@tp.grid(size=list(WIDTH), variant=["baseline", "early", "late"])  # variants last: run side by side
@tp.relative(variant="baseline", metrics=["step_time", "peak_memory"])
def test_memory_strategies(trainperf, size, variant):
    torch.manual_seed(0)
    checkpointed = range(FIRST_CHECKPOINTED[variant], LAYERS)
    model = TinyLM(d_model=WIDTH[size], layers=LAYERS, checkpointed=checkpointed).to(trainperf.device)
    step = lm_train_step(model, batch_size=8, seq_len=128, device=trainperf.device)
    trainperf.train(step, steps=10, warmup=2, items_per_step=8 * 128)
