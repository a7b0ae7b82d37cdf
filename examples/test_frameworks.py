"""The training loops users already have, guarded as they are: a Hugging Face ``Trainer``, a Lightning
``fit`` and a plain ``DataLoader`` loop.

``test_hf_trainer`` trains a tiny GPT-2 (built from its config: no weights downloaded) with the
``Trainer``, with and without gradient accumulation; ``trainperf.hf_callback`` measures the
``Trainer``'s own optimizer steps (accumulation, clipping and the optimizer included) in the thread
that runs them, so its FLOPs and peak memory are the real step's. ``test_lightning_fit`` does the same
for a small Lightning module with ``trainperf.lightning_callback``. ``test_dataloader_loop`` iterates
a ``DataLoader`` with ``trainperf.steps``, which splits each step into the wait for its batch
(``data_time``) and the loop's body (``compute_time``), and gates the loop on its compute alone.

The framework cells are skipped, saying which package is missing, where transformers (and
accelerate, which its ``Trainer`` needs) or lightning is not installed:
``pip install 'pytest-trainperf[frameworks]'``.

    pytest --trainperf examples/test_frameworks.py
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import torch
from _models import STREAM, VOCAB, TinyLM

import pytest_trainperf as tp

SEQ_LEN = 32
BATCH = 4


def _needs(*packages: str) -> None:
    """Skip this cell, naming the package, unless every one of ``packages`` is installed."""
    import pytest

    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: pip install 'pytest-trainperf[frameworks]'")


@tp.grid(accumulate=[1, 2])
def test_hf_trainer(trainperf, tmp_path, accumulate):
    _needs("transformers", "accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = STREAM[:64 * SEQ_LEN].view(64, SEQ_LEN)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=accumulate, max_grad_norm=1.0, learning_rate=1e-3,
                             use_cpu=trainperf.device.type == "cpu", report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0)
    callback = trainperf.hf_callback(steps=15, warmup=3, items=BATCH * SEQ_LEN * accumulate)  # tokens/step
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


def test_lightning_fit(trainperf):
    _needs("lightning")
    import lightning.pytorch as pl

    class LitLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = TinyLM(d_model=64, layers=2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.lm(x)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    stream = STREAM[:64 * SEQ_LEN + 1]
    data = torch.utils.data.TensorDataset(stream[:-1].view(64, SEQ_LEN), stream[1:].view(64, SEQ_LEN))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    trainer = pl.Trainer(max_steps=20, accelerator=trainperf.device.type, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0,
                         callbacks=[trainperf.lightning_callback(steps=15, warmup=3, items=lambda b: b[0].numel())])
    with warnings.catch_warnings():  # "the train_dataloader does not have many workers": on purpose
        warnings.simplefilter("ignore")
        trainer.fit(LitLM(), loader)


@tp.tolerance(step_time=math.inf, data_time=math.inf)  # gate the loop on its compute alone
def test_dataloader_loop(trainperf):
    torch.manual_seed(0)
    model = TinyLM(d_model=64, layers=2).to(trainperf.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = STREAM[:256 * SEQ_LEN + 1]
    data = torch.utils.data.TensorDataset(stream[:-1].view(256, SEQ_LEN), stream[1:].view(256, SEQ_LEN))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    loop = trainperf.steps(loader, steps=20, warmup=3, items=lambda batch: batch[0].numel())
    for x, y in loop:
        x, y = x.to(trainperf.device), y.to(trainperf.device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        loop.loss = loss
