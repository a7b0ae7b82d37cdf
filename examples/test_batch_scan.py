"""A batch-size scan of a small language model: tokens processed, step time and loss (seed figure 004).

A small causal transformer LM trains for a fixed number of steps at each batch size on a learnable
synthetic token stream (a sparse Markov chain: 4 likely successors per token, so the loss falls from
ln 256 = 5.5 towards ln 4 = 1.4 nats). Each cell's throughput is in tokens
(``items_per_step=batch_size * seq_len``), so tokens processed per step and per second are known,
its loss curve (every step's loss) is stored with the baseline, and after training the loss on a
held-out tail of the stream is recorded as ``eval_loss``. Larger batches see more tokens in the same
number of steps and end at a lower held-out loss.

Guards: step time and throughput per batch size, the training loss curve (numerics: a changed
initialisation, learning rate or kernel shows as a moved curve), and the held-out loss.

    pytest --trainperf examples/test_batch_scan.py
"""

from __future__ import annotations

import torch
from _models import TinyLM, held_out_loss, lm_train_step

import pytest_trainperf as tp

SEQ_LEN = 64


@tp.grid(batch_size=[2, 4, 8, 16, 32])
def test_batch_size_scan(trainperf, batch_size):
    torch.manual_seed(0)
    model = TinyLM(d_model=64, layers=2).to(trainperf.device)
    step = lm_train_step(model, batch_size, SEQ_LEN, trainperf.device)
    trainperf.train(step, steps=32, warmup=2, items_per_step=batch_size * SEQ_LEN)
    trainperf.record("eval_loss", held_out_loss(model, SEQ_LEN, trainperf.device), unit="nats",
                     tolerance=0.01)
