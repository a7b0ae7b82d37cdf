"""How step time and FLOPs scale with parameters and with sequence length (seed figure 002).

``tp.scaling`` fits ``metric = a * x^b`` across a grid axis and stores the exponent ``b`` with the
baselines:

- against **parameters**: a 2-block causal transformer LM of growing width records its parameter
  count (``trainperf.record("parameters", ...)``), and the fit takes that as x
  (``x_metric="parameters"``): FLOPs grow about linearly in the parameters (exponent near 1), and
  so does the step time once the matrix multiplies outweigh the fixed per-step costs (the widths
  start at 64 for that);
- against **sequence length** at a fixed, narrow width: FLOPs grow between linearly (the
  projections and the MLP, per token) and quadratically (attention scores), with an exponent
  between 1 and 2 that rises as attention takes over.

Guards: a complexity regression, an exponent that rises by more than its tolerance (0.25 by
default), e.g. an attention kernel that starts materialising something quadratic per layer, or
parameters that stop being shared, caught even while every cell is still within its own
tolerance.

    pytest --trainperf examples/test_scaling.py
"""

from __future__ import annotations

import torch
from _models import TinyLM, lm_train_step, parameter_count

import pytest_trainperf as tp


@tp.grid(width=[64, 128, 256, 384])
@tp.scaling(x="width", x_metric="parameters", metrics=["step_time", "flops"])
def test_scaling_with_parameters(trainperf, width):
    torch.manual_seed(0)
    model = TinyLM(d_model=width, heads=4, layers=2).to(trainperf.device)
    trainperf.record("parameters", parameter_count(model), tolerance=0)
    step = lm_train_step(model, batch_size=8, seq_len=64, device=trainperf.device)
    trainperf.train(step, steps=10, warmup=2, items_per_step=8 * 64)


@tp.grid(seq_len=[64, 128, 256, 512])
@tp.scaling(x="seq_len", metrics=["step_time", "flops"])
def test_scaling_with_sequence_length(trainperf, seq_len):
    torch.manual_seed(0)
    model = TinyLM(d_model=32, heads=4, layers=2).to(trainperf.device)
    step = lm_train_step(model, batch_size=8, seq_len=seq_len, device=trainperf.device)
    trainperf.train(step, steps=10, warmup=2, items_per_step=8 * seq_len)
