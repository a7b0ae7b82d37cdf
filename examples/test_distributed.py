"""Distributed training strategies against DDP, over model sizes, on 2 ranks (seed figure 001 with real strategies).

A 4-block causal transformer LM of two sizes trains on 2 ranks (``tp.ranks``: torch's elastic launcher,
gloo on the CPU, NCCL on CUDA) three ways: ``ddp`` (DistributedDataParallel: every rank holds the whole
model, gradients all-reduced), ``fsdp`` (FSDP2 ``fully_shard`` per block and at the root: parameters,
gradients and optimizer state sharded, each block gathered for its forward and again for its backward)
and ``fsdp_ckpt`` (the same, with every block's activations recomputed in the backward pass).
``tp.relative`` reports each strategy's peak memory per rank (the largest rank's) and step time (the
slowest rank's) relative to ``ddp`` of the same size; the FLOPs every cell measures (per rank) place the
sizes.

Guards: the memory each strategy saves per rank and the time it costs against ``ddp``, per size (each
cell's own step time only beyond +100%: two ranks on a shared 2-core runner slow down together with its
load, the figures do not); and, exactly, the communication of every cell (``comm_calls``, ``comm_bytes``
by collective): a wrapping change that stops sharding a block, or gradients all-reduced twice, fails on
any machine.

    pytest --trainperf examples/test_distributed.py
"""

from __future__ import annotations

import pytest
import torch
from _models import TinyLM, batches, lm_loss

import pytest_trainperf as tp

LAYERS = 4
WIDTH = {"small": 32, "large": 64}
"""d_model per size."""
BATCH, SEQ = 4, 64
"""Per rank: each rank trains on its own batches of the stream."""


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """The model as the strategy trains it."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block)
    fully_shard(model)
    return model


@tp.grid(size=list(WIDTH), strategy=["ddp", "fsdp", "fsdp_ckpt"])  # strategies last: run side by side
@tp.ranks(world_size=2)
@tp.relative(strategy="ddp", metrics=["step_time", "peak_memory"])
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module:UserWarning")  # the logits (a view) are never changed in place
# FSDP2 on gloo: its peak takes one of two values, by when a gathered buffer is freed; 2 ranks on a shared
# 2-core runner: a cell's own step time moves with the load (the figures, strategy against ddp, guard time)
@tp.tolerance(peak_memory=0.05, step_time=1.0)
def test_distributed_strategies(trainperf, size, strategy):
    torch.manual_seed(0)  # the same initial model on every rank
    checkpointed = range(LAYERS) if strategy == "fsdp_ckpt" else ()
    model = wrap(TinyLM(d_model=WIDTH[size], layers=LAYERS, checkpointed=checkpointed).to(trainperf.device),
                 strategy, trainperf.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(BATCH, SEQ, trainperf.device)[trainperf.rank::trainperf.world_size]
    position = iter(range(1 << 30))

    def step():
        tokens, targets = data[next(position) % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=5, warmup=1, items_per_step=BATCH * SEQ)
