"""Shared by the examples: a small causal transformer LM and a learnable synthetic token stream.

Not a test module (no ``test_`` prefix); the examples import it as ``from _models import ...``, with
this directory on ``sys.path`` (``conftest.py`` sees to it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

VOCAB = 256
MAX_LEN = 512


class TinyLM(nn.Module):
    """A pre-norm causal transformer: token + position embeddings, ``layers`` blocks, a linear head.

    ``checkpointed`` names the blocks whose activations are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant) instead of being kept from the forward pass.
    """

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2, ffn: int = 4,
                 checkpointed: Collection[int] = ()) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ffn * d_model, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        self.checkpointed = frozenset(checkpointed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.embed(tokens) + self.pos(torch.arange(length, device=tokens.device))
        for i, block in enumerate(self.blocks):
            if i in self.checkpointed:
                h = checkpoint(block, h, src_mask=mask, is_causal=True, use_reentrant=False)
            else:
                h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


STREAM = token_stream(1 << 17)
"""Built once at import (collection), so no cell's peak memory or time includes it."""
HELD_OUT = 1 << 13
"""The stream's last tokens, never trained on."""


def batches(batch_size: int, seq_len: int, device: torch.device,
            held_out: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (input, target) windows of the stream (or of its held-out tail), cut into batches."""
    source = STREAM[-HELD_OUT:] if held_out else STREAM[:-HELD_OUT]
    span = seq_len + 1
    windows = source[: (len(source) // span) * span].view(-1, span)
    out = []
    for start in range(0, len(windows) - batch_size + 1, batch_size):
        chunk = windows[start:start + batch_size].to(device)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


def lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy."""
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def lm_train_step(model: nn.Module, batch_size: int, seq_len: int, device: torch.device,
                  lr: float = 3e-3) -> Callable[[], torch.Tensor]:
    """A training step over consecutive batches of the stream (AdamW), returning the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = batches(batch_size, seq_len, device)
    position: Iterator[int] = iter(range(1 << 30))

    def step() -> torch.Tensor:
        tokens, targets = data[next(position) % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        opt.step()
        return loss

    return step


@torch.no_grad()
def held_out_loss(model: nn.Module, seq_len: int, device: torch.device, batch_size: int = 16) -> float:
    """Mean next-token loss over the held-out tail of the stream (a few batches)."""
    model.eval()
    losses = [lm_loss(model, tokens, targets).item()
              for tokens, targets in batches(batch_size, seq_len, device, held_out=True)[:4]]
    model.train()
    return sum(losses) / len(losses)
