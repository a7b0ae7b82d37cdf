"""Utilization over sequence length x batch size under a memory budget, and inference latency of
slimmed model variants (seed figure 003).

``test_training_utilization`` trains a small causal transformer LM over a sequence length x batch
size grid under ``tp.memory_budget``: the cells whose peak memory would not fit a device of that
size are reported as ``OOM*`` (emulated out of memory, not timed), as a small GPU would refuse them,
and the cells that fit report step time, throughput and utilization (``cpu_utilization`` on the
CPU, ``sm_utilization`` on a GPU with NVML).

``test_inference_latency`` times the forward pass of the ``original`` model and of two slimmed
variants, ``narrower`` (half the width) and ``shallower`` (half the blocks), over batch sizes, with
``items_per_call`` in tokens so throughput is comparable across batches.

Guards: a grid that stops fitting the budget (a new ``OOM*`` where the baseline was measured fails),
and latency and throughput per variant and batch size.

    pytest --trainperf examples/test_utilization.py
"""

from __future__ import annotations

import torch
from _models import TinyLM, batches, lm_train_step

import pytest_trainperf as tp

VARIANTS = {"original": {"d_model": 64, "layers": 4},
            "narrower": {"d_model": 32, "layers": 4},
            "shallower": {"d_model": 64, "layers": 2}}
INFERENCE_SEQ_LEN = 64
BUDGET = "32MiB"
"""Stands in for a small device: the three largest training cells (peak 40 to 155 MiB on the CPU) exceed it."""


@tp.grid(seq_len=[16, 64, 256], batch_size=[4, 16, 64])
@tp.memory_budget(BUDGET)
def test_training_utilization(trainperf, seq_len, batch_size):
    torch.manual_seed(0)
    model = TinyLM(d_model=64, layers=2).to(trainperf.device)
    step = lm_train_step(model, batch_size, seq_len, trainperf.device)
    trainperf.train(step, steps=10, warmup=2, items_per_step=batch_size * seq_len)


@tp.grid(variant=list(VARIANTS), batch_size=[1, 4, 16, 64])
def test_inference_latency(trainperf, variant, batch_size):
    torch.manual_seed(0)
    model = TinyLM(**VARIANTS[variant]).to(trainperf.device).eval()
    tokens, _ = batches(batch_size, INFERENCE_SEQ_LEN, trainperf.device)[0]

    @torch.inference_mode()
    def forward():
        return model(tokens)

    trainperf.run(forward, iters=20, warmup=3, items_per_call=batch_size * INFERENCE_SEQ_LEN)
