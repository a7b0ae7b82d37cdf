"""A ``lightning.pytorch.Callback`` that measures Lightning's own training steps.

One line in a test::

    trainer = lightning.pytorch.Trainer(max_steps=20, callbacks=[trainperf.lightning_callback(steps=10)], ...)
    trainer.fit(module, loader)

A step is one optimizer step (lightning 2.6): it begins at ``on_train_batch_start`` (the batch fetched
and moved to the device) and ends at the ``on_train_batch_end`` after which ``trainer.global_step`` has
grown: with ``accumulate_grad_batches`` it spans every micro-batch of the accumulation (their
fetches included); the training step, backward, gradient clipping, the optimizer step, ``zero_grad`` and
the step-interval scheduler update are inside it. The loss stored is the ``loss`` that
``training_step`` returned for the step's last micro-batch (as Lightning hands it to the hook).
The first step is counted, the second memory-tracked, the next ``warmup`` warm up and the next ``steps``
are timed: ``max_steps`` must be at least ``2 + warmup + steps``; later steps run unmeasured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

if TYPE_CHECKING:
    from pytest_trainperf.fixture import StepBlock, TrainPerf


class TrainPerfCallback(pl.Callback):  # type: ignore[misc]  # subclassing a class of an optional package
    """Measures Lightning's training steps with ``trainperf.step`` (see the module docstring).

    ``items`` is a number of items per step, or a function of a batch giving its items (summed over the
    micro-batches of a step).
    """

    def __init__(self, trainperf: TrainPerf, *, steps: int, warmup: int,
                 items: float | Callable[[Any], float] | None = None) -> None:
        self._trainperf = trainperf
        self._steps = steps
        self._warmup = warmup
        self._items = items
        self._block: StepBlock | None = None
        self._stepped = 0
        self._step_items = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._block is None:
            self._stepped = trainer.global_step
            self._step_items = 0.0
            self._block = self._trainperf.step(steps=self._steps, warmup=self._warmup,
                                               items=None if callable(self._items) else self._items)
            self._block.__enter__()
        if callable(self._items):
            items = self._items(batch)
            if isinstance(items, bool) or not isinstance(items, (int, float)) or not items > 0:
                self._trainperf._usage(f"trainperf.lightning_callback(items=...): the function returned {items!r:.80} "
                                       "for a batch; expected a positive number of items")
            self._step_items += float(items)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        block = self._block
        if block is None or trainer.global_step <= self._stepped:  # an accumulation step: the step goes on
            return
        self._block = None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        block.loss = loss if loss is not None and getattr(loss, "numel", lambda: 0)() == 1 else None
        if callable(self._items):
            block.items = self._step_items
        block.__exit__(None, None, None)
