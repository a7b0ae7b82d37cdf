"""A Llama-shaped decoder with a KV cache, for forecasts at the scale of real models (seed figure 003).

Written here rather than built with ``transformers`` so that the examples need no optional package:
pre-norm blocks of RMSNorm, multi-head attention with rotary position embeddings through
``scaled_dot_product_attention``, and a SwiGLU feed-forward, the shapes of Llama 2's public configs
(:data:`CONFIGS`). Built under ``with torch.device("meta")`` it allocates nothing, so a 13B model is
built in milliseconds on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama-style decoder."""

    width: int
    layers: int
    heads: int
    ffn: int
    vocab: int = 32000


CONFIGS = {
    "7B": LlamaConfig(width=4096, layers=32, heads=32, ffn=11008),
    "13B": LlamaConfig(width=5120, layers=40, heads=40, ffn=13824),
}
"""Llama 2's public shapes (6.7 and 13.0 billion parameters)."""


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        return (x.float() * scale).type_as(x) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (batch, heads, positions, head dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated for ``length`` positions."""

    def __init__(self, config: LlamaConfig, batch: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, config.heads, length, config.width // config.heads)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.layers)]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.q = nn.Linear(config.width, config.width, bias=False)
        self.k = nn.Linear(config.width, config.width, bias=False)
        self.v = nn.Linear(config.width, config.width, bias=False)
        self.o = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = rotate(split(self.q(x)), cos, sin), rotate(split(self.k(x)), cos, sin), split(self.v(x))
        if cache is not None:  # write this call's keys and values, attend over everything so far
            keys, values = cache
            keys[:, :, start:start + length] = k
            values[:, :, start:start + length] = v
            k, v = keys[:, :, :start + length], values[:, :, :start + length]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        return self.o(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.width)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.width)
        self.gate = nn.Linear(config.width, config.ffn, bias=False)
        self.up = nn.Linear(config.width, config.ffn, bias=False)
        self.down = nn.Linear(config.ffn, config.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start)
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """The decoder: ``forward(tokens, cache, start)`` returns the logits of the last position only
    (what generation needs), writing the keys and values of ``tokens`` into ``cache`` at ``start``."""

    def __init__(self, config: LlamaConfig, max_len: int = 4096) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        head_dim = config.width // config.heads
        inverse = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inverse).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        length = tokens.shape[1]
        cos = self.cos[start:start + length].to(self.head.weight.dtype)
        sin = self.sin[start:start + length].to(self.head.weight.dtype)
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, (cache.keys[i], cache.values[i]) if cache is not None else None, start)
        return self.head(self.norm(x[:, -1:]))


def parameter_count(config: LlamaConfig) -> int:
    """Parameters of a decoder of this shape."""
    per_block = 4 * config.width ** 2 + 3 * config.width * config.ffn + 2 * config.width
    return config.layers * per_block + 2 * config.vocab * config.width + config.width
