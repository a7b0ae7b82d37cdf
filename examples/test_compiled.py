"""One small model, eager and ``torch.compile``d: the compiled cell is timed compiled, and its graph
breaks, recompiles, graph count and compile time are guarded.

A three-layer MLP classifier (LayerNorm, GELU) trains on a fixed random batch, once as it is and once
through ``torch.compile(model, backend="aot_eager")``. ``aot_eager`` traces the forward and backward
graphs exactly as Inductor's front end does (dynamo, then AOTAutograd), so graph breaks and
recompiles are the ones Inductor would see, but it generates no kernels: the compile costs a second
or two on a 2-core CPU instead of tens of seconds, and the step runs the traced graphs eagerly (no
speed-up: the figure guarded here is what dynamo did, not how fast Inductor's code is; see
``benchmarks/compiled.py`` for an Inductor-compiled step against eager).

Guards, on the compiled cell: ``graph_breaks`` (0: a ``print`` or a data-dependent branch added to
``forward`` fails the cell, naming the metric), ``recompiles`` (0), ``unique_graphs`` (1) and
``compile_time`` (at most twice the baseline's); on both cells: step time, FLOPs (the same in both: the
FLOP step runs eager), peak memory (the eager step's) and the loss, which compiled and eager reach alike.

    pytest --trainperf examples/test_compiled.py
"""

from __future__ import annotations

import torch
from torch import nn

import pytest_trainperf as tp

BATCH = 64
WIDTH = 128


class Classifier(nn.Module):
    """Three linear layers with LayerNorm and GELU: small enough to compile in a second or two."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH),
                                  nn.LayerNorm(WIDTH))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) + x)


@tp.grid(mode=["eager", "compiled"])
def test_compiled_classifier(trainperf, mode):
    torch.manual_seed(0)
    model = Classifier().to(trainperf.device)
    run = torch.compile(model, backend="aot_eager") if mode == "compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=gen).to(trainperf.device)
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(trainperf.device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=30, warmup=3, items_per_step=BATCH)
