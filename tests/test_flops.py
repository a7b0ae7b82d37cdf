"""FLOP counting: what ``count_flops`` sees of a step."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_trainperf.measure.flops import count_flops  # noqa: E402


def test_cpu_attention_is_counted_as_sdpa():
    # torch's counter knows the CUDA attention kernels only; the CPU flash kernel takes the same formula
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q = torch.randn(2, 4, 64, 16, requires_grad=True)

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        out.sum().backward()
        return out

    _, flops = count_flops(step)
    shape = tuple(q.shape)
    assert flops == sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)


def test_attention_flops_grow_quadratically_in_sequence_length():
    def flops(length: int) -> int:
        q = torch.randn(1, 2, length, 8)
        return count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[1]

    assert flops(64) > 0
    assert flops(128) == 4 * flops(64)
