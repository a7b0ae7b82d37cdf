"""Recompute cost of activation checkpointing, over batch size x window (seed figure 000).

A 4-block causal transformer LM trains on windows of ``window`` tokens, once keeping every block's
activations (``plain``) and once recomputing them in the backward pass (``checkpointed``:
``torch.utils.checkpoint``, non-reentrant, one checkpoint per block). ``tp.relative`` turns the two
variants into the figure that matters, the **recompute cost**
``step_time(checkpointed) / step_time(plain) - 1`` and the memory saved
``peak_memory(checkpointed) / peak_memory(plain) - 1``, at every batch size and window. On the CPU
the cost is about 25-35% where the blocks' work dominates (one more forward pass of each block) and
higher in the smallest cells, where the checkpoint wrapper's own per-block overhead weighs; the
memory saved grows with batch x window.

Guards: a checkpointing change (a torch upgrade, a new checkpoint policy, a block that starts saving
what it should recompute) that makes recomputation dearer or saves less memory fails, although each
cell on its own may still be within its step-time tolerance.

    pytest --trainperf examples/test_recompute.py
"""

from __future__ import annotations

import torch
from _models import TinyLM, lm_train_step

import pytest_trainperf as tp

LAYERS = 4


@tp.grid(batch_size=[1, 4, 16], window=[16, 64, 256], variant=["plain", "checkpointed"])
@tp.relative(variant="plain", metrics=["step_time", "peak_memory"])
def test_recompute_cost(trainperf, batch_size, window, variant):
    torch.manual_seed(0)
    checkpointed = range(LAYERS) if variant == "checkpointed" else ()
    model = TinyLM(d_model=64, layers=LAYERS, checkpointed=checkpointed).to(trainperf.device)
    step = lm_train_step(model, batch_size, window, trainperf.device)
    trainperf.train(step, steps=10, warmup=2, items_per_step=batch_size * window)
