"""The framework callbacks: a Hugging Face ``Trainer`` and a Lightning ``fit`` measured with one line each,
their FLOPs and peak memory taken in the thread that runs the steps (the same FLOPs as the model's own
step, counted apart; a peak of at least the parameters, gradients and optimizer state), then judged
against their baselines. Each framework is imported once, here, before pytester snapshots the modules:
every inner session reuses it."""

from __future__ import annotations

import importlib.util

import pytest

pytest_plugins = ["pytester"]

QUICK = ("--trainperf-confirm-against=none", "--trainperf-confirm=0")
QUIET = ("-W", "ignore::UserWarning", "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning")
"""Lightning's own warnings (no workers, a deprecated pytree API), which this session turns into errors."""

HF_TEST = """
import math

import torch
import pytest_trainperf as tp
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from pytest_trainperf.measure.counting import count_step

ACCUMULATE = 2


def model_and_data():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)  # built from its config: no weights downloaded
    ids = torch.randint(0, 128, (64, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    return model, data


def reference_flops():
    # the same model's own step, counted apart: two micro-batches' forward and backward, clipping, AdamW
    model, data = model_and_data()
    opt = torch.optim.AdamW(model.parameters())
    batch = {k: torch.stack([d[k] for d in data[:4]]) for k in ("input_ids", "labels")}

    def step():
        for _ in range(ACCUMULATE):
            model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return count_step(step)[1].total


@tp.tolerance(step_time=math.inf)  # what the callback measures is under test, not a timing under load
def test_hf_trainer(trainperf, tmp_path):
    model, data = model_and_data()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
                             gradient_accumulation_steps=ACCUMULATE, max_grad_norm=1.0, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[trainperf.hf_callback(steps=6, warmup=1, items=4 * ACCUMULATE)])
    trainer.train()
    if trainperf.enabled and not trainperf.timing_only:
        measured = trainperf.result()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        assert measured.metric("flops").value == reference_flops() > 0
        # parameters, their gradients and AdamW's two moments are alive during the step
        assert measured.metric("peak_memory").value >= 4 * params
        assert measured.metric("throughput").value > 0
"""

LIGHTNING_TEST = """
import math

import torch
import pytest_trainperf as tp
import lightning.pytorch as pl

from pytest_trainperf.measure.counting import count_step


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loader():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 32), torch.randn(256, 1))
    return torch.utils.data.DataLoader(data, batch_size=8)


def reference_flops(module):
    x, y = next(iter(loader()))
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step():
        for _ in range(2):
            module.training_step((x, y), 0).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return count_step(step)[1].total


@tp.tolerance(step_time=math.inf)  # what the callback measures is under test, not a timing under load
def test_lightning_fit(trainperf):
    torch.manual_seed(0)
    module = Tiny()
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         gradient_clip_val=1.0,
                         callbacks=[trainperf.lightning_callback(steps=6, warmup=1, items=lambda b: len(b[0]))])
    trainer.fit(module, loader())
    if trainperf.enabled and not trainperf.timing_only:
        measured = trainperf.result()
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        assert measured.metric("flops").value == reference_flops(Tiny()) > 0
        assert measured.metric("peak_memory").value >= 4 * params  # parameters, gradients, Adam's moments
        assert measured.metric("throughput").value > 0
        assert measured.metric("loss") is not None
"""


def _framework(name: str, needs: tuple[str, ...] = (), preload: tuple[str, ...] = ()) -> None:
    """Import ``name`` and the modules in ``preload`` now, once per session (pytester drops the modules
    an inner session imported), or skip saying which package is missing."""
    for package in (name, *needs):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'pytest-trainperf[frameworks]')")
    for module in (name, *preload):
        importlib.import_module(module)


def test_a_hugging_face_trainer_is_measured_with_one_callback(pytester: pytest.Pytester) -> None:
    _framework("transformers", needs=("accelerate",),  # the Trainer needs accelerate
               preload=("transformers.trainer", "transformers.models.gpt2.modeling_gpt2"))
    pytester.makepyfile(test_hf_trainer=HF_TEST)
    update = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=1")
    update.assert_outcomes(passed=1)
    assert "0 FLOPs" not in update.stdout.str()
    pytester.runpytest("--trainperf", *QUICK).assert_outcomes(passed=1)


def test_a_lightning_fit_is_measured_with_one_callback(pytester: pytest.Pytester) -> None:
    _framework("lightning", preload=("lightning.pytorch",))
    pytester.makepyfile(test_lightning_fit=LIGHTNING_TEST)
    update = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=1", *QUIET)
    update.assert_outcomes(passed=1)
    assert "0 FLOPs" not in update.stdout.str()
    pytester.runpytest("--trainperf", *QUICK, *QUIET).assert_outcomes(passed=1)


def test_too_few_trainer_steps_fail_with_the_steps_needed(pytester: pytest.Pytester) -> None:
    _framework("lightning", preload=("lightning.pytorch",))
    pytester.makepyfile(test_short_fit=LIGHTNING_TEST.replace("max_steps=10", "max_steps=5"))
    result = pytester.runpytest("--trainperf-update-baselines", "--trainperf-rounds=1", *QUIET)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*trainperf.step: the loop ended after 5 measured step(s); the measurement "
                                 "needs 9 (1 counted + 1 memory-tracked + 1 warm-up + 6 timed)*"])
