"""A ``transformers.TrainerCallback`` that measures a Hugging Face ``Trainer``'s own steps.

One line in a test::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[trainperf.hf_callback(steps=10, warmup=2)])
    trainer.train()

A step is one optimizer step of the ``Trainer``, from ``on_step_begin`` to ``on_step_end``
(transformers 5): the forward and backward of every micro-batch of its gradient accumulation, the
gradient clipping (``max_grad_norm``), the optimizer and scheduler steps and ``zero_grad``. The
micro-batches are fetched before ``on_step_begin`` (outside the step); logging, evaluation and saving
run after ``on_step_end`` (outside it too). The first step is counted (FLOPs, work), the second
memory-tracked, the next ``warmup`` warm up and the next ``steps`` are timed, so ``max_steps`` must be
at least ``2 + warmup + steps``; later steps run unmeasured. The ``Trainer`` hands its callbacks no
per-step loss, so no ``loss`` is stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from pytest_trainperf.fixture import StepBlock, TrainPerf


class TrainPerfCallback(TrainerCallback):  # type: ignore[misc]  # transformers is untyped
    """Measures the ``Trainer``'s steps with ``trainperf.step`` (see the module docstring)."""

    def __init__(self, trainperf: TrainPerf, *, steps: int, warmup: int, items: float | None = None) -> None:
        self._trainperf = trainperf
        self._steps = steps
        self._warmup = warmup
        self._items = items
        self._block: StepBlock | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._block = self._trainperf.step(steps=self._steps, warmup=self._warmup, items=self._items)
        self._block.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(None, None, None)
