"""A small transformer language model trained on a synthetic token stream, over batch x sequence.

Run it measured and compared with its committed baselines::

    pytest --trainperf examples/

and, after an intended change, rewrite the baselines of the cells that ran::

    pytest --trainperf-update-baselines examples/
"""

from __future__ import annotations

import torch
from torch import nn

import pytest_trainperf as tp

VOCAB = 256
MAX_LEN = 128


class TinyLM(nn.Module):
    """A pre-norm causal transformer: token + position embeddings, 2 blocks, a linear head."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.embed(tokens) + self.pos(torch.arange(length, device=tokens.device))
        return self.head(self.blocks(h, mask=mask, is_causal=True))


def token_stream(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A learnable synthetic 'language': a sparse random Markov chain over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=gen)  # 4 likely next tokens each
    choice = torch.randint(0, 4, (n_tokens,), generator=gen).tolist()
    table = successors.tolist()
    tokens = [0]
    for i in range(1, n_tokens):
        tokens.append(table[tokens[-1]][choice[i]])
    return torch.tensor(tokens, dtype=torch.long)


STREAM = token_stream(1 << 15)


def batches(batch_size: int, seq_len: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (input, target) windows of the stream, cut into batches."""
    span = seq_len + 1
    windows = STREAM[: (len(STREAM) // span) * span].view(-1, span)
    out = []
    for start in range(0, len(windows) - batch_size + 1, batch_size):
        chunk = windows[start:start + batch_size].to(device)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


@tp.grid(batch_size=[4, 16], seq_len=[32, 128])
def test_tiny_lm_training(trainperf, batch_size, seq_len):
    torch.manual_seed(0)
    model = TinyLM().to(trainperf.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(batch_size, seq_len, trainperf.device)
    position = iter(range(1 << 30))

    def step():
        tokens, targets = data[next(position) % len(data)]
        opt.zero_grad(set_to_none=True)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=20, warmup=3, items_per_step=batch_size * seq_len)

    # a held-out loss, stored and compared like the built-in metrics
    held_out = batches(batch_size, seq_len, trainperf.device)[-1]
    with torch.no_grad():
        logits = model(held_out[0])
        eval_loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), held_out[1].reshape(-1))
    trainperf.record("eval_loss", eval_loss.item(), unit="nats", tolerance=0.01)


@tp.grid(batch_size=[1, 8, 32], seq_len=[32, 128])
def test_tiny_lm_inference(trainperf, batch_size, seq_len):
    torch.manual_seed(0)
    model = TinyLM().to(trainperf.device).eval()
    tokens, _ = batches(batch_size, seq_len, trainperf.device)[0]

    @torch.inference_mode()
    def forward():
        return model(tokens)

    trainperf.run(forward, iters=20, warmup=3, items_per_call=batch_size * seq_len)
