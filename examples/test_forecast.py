"""Will a 7B or 13B model still fit the GPU? Seed figure 003 at its real scale, forecast on the CPU.

``test_generation_fits`` maps Llama-2-shaped decoders of 7B and 13B parameters in bf16 over sequence
length x batch size (the seed's axes) on four cards: 24 GiB (RTX 3090/4090), 40 GiB (A100 40GB),
80 GiB (A100/H100 80GB) and 141 GiB (H200). A cell is one generation's prefill: the prompt of
``seq_len`` tokens runs through the model and fills a KV cache sized for the prompt and
:data:`NEW_TOKENS` more, and the logits of the last position come out. Nothing is allocated:
``tp.forecast`` runs the step on the ``meta`` device and counts its storages as the CUDA caching
allocator would, with the attention kernel CUDA would pick (flash attention, in bf16); the cells
whose forecast exceeds the card are ``OOM (forecast)``.

``test_finetune_fits`` forecasts a full fine-tuning step of the 7B model (AdamW, bf16 weights and
optimizer state, one sequence of 512 or 2048 tokens) on the same cards: two steps run, the second
with the optimizer state the first made.

Guards: a change that makes a cell stop fitting a card fails it (a new ``OOM (forecast)``), a cell
that now fits is an improvement, and the forecast bytes are judged like a measured peak (0.5%).

    pytest --trainperf examples/test_forecast.py
"""

from __future__ import annotations

import functools

import torch
from _llama import CONFIGS, KVCache, Llama

import pytest_trainperf as tp

CARDS = ["24GiB", "40GiB", "80GiB", "141GiB"]
"""RTX 3090/4090, A100 40GB, A100/H100 80GB, H200."""
SEQ_LENS = [16, 32, 64, 128, 256, 512, 1024]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
NEW_TOKENS = 128
"""Positions the KV cache holds beyond the prompt (the tokens a generation would add)."""


@functools.lru_cache(maxsize=2)
def llama(name: str, device: torch.device) -> Llama:
    """A model of the named shape in bf16, built once per session: on ``meta`` it holds no memory, and a
    forecast counts only what its step reaches, so the other model kept here is not counted."""
    with torch.device(device):
        return Llama(CONFIGS[name], max_len=4096).to(torch.bfloat16).eval()


@tp.grid(seq_len=SEQ_LENS, batch_size=BATCH_SIZES, model=list(CONFIGS), gpu=CARDS)
@tp.forecast(memory_axis="gpu")
def test_generation_fits(trainperf, seq_len, batch_size, model, gpu):
    decoder = llama(model, trainperf.device)
    config = decoder.config

    @torch.inference_mode()
    def prefill():
        cache = KVCache(config, batch_size, seq_len + NEW_TOKENS, torch.bfloat16, trainperf.device)
        tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=trainperf.device)
        return decoder(tokens, cache)

    trainperf.run(prefill, iters=1, items_per_call=batch_size * seq_len)


@tp.grid(seq_len=[512, 2048], gpu=CARDS)
@tp.forecast(memory_axis="gpu")
def test_finetune_fits(trainperf, seq_len, gpu):
    batch_size = 1
    decoder = llama("7B", trainperf.device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-5, foreach=True)
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=trainperf.device)
    targets = torch.zeros(batch_size, dtype=torch.long, device=trainperf.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = decoder(tokens)  # the last position's logits: a sequence-classification-style loss
        loss = torch.nn.functional.cross_entropy(logits[:, -1].float(), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    trainperf.train(step, steps=2)
