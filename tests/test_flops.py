"""FLOP counting: what ``count_flops`` sees of a step, and the precision each FLOP runs in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from pytest_trainperf.measure.flops import (  # noqa: E402
    PRECISION_METRICS,
    FlopCount,
    OpKind,
    Precision,
    Tf32,
    count_flops,
    is_causal,
    precision_of,
    tf32_flags,
)
from pytest_trainperf.stats import DEFAULT_TOLERANCES  # noqa: E402


def attention_step(q: torch.Tensor, causal: bool) -> object:
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)
    out.sum().backward()
    return out


def test_cpu_attention_is_counted_as_sdpa():
    # torch's counter knows the CUDA attention kernels only; the CPU flash kernel takes the same formula
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    _, flops = count_flops(lambda: attention_step(q, causal=False))
    shape = tuple(q.shape)
    assert flops.total == sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)


def test_causal_attention_counts_half_of_the_full_score_and_value_products():
    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    full = count_flops(lambda: attention_step(q, causal=False))[1].total
    causal = count_flops(lambda: attention_step(q, causal=True))[1].total
    assert full > 0 and causal == full // 2


def test_attention_flops_grow_quadratically_in_sequence_length():
    def flops(length: int) -> int:
        q = torch.randn(1, 2, length, 8)
        return count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[1].total

    assert flops(64) > 0
    assert flops(128) == 4 * flops(64)


def test_a_bf16_autocast_step_on_the_cpu_runs_its_flops_in_bf16():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(16, 32)

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        return loss

    _, plain = count_flops(lambda: model(x).square().mean().backward())
    _, mixed = count_flops(step)
    assert plain.by_precision == ((Precision.FP32, plain.total),)
    assert mixed.by_precision == ((Precision.BF16, mixed.total),)
    assert mixed.total == plain.total > 0  # the same work, in another precision


def test_a_step_in_two_precisions_is_split_and_the_split_adds_up():
    a32, a16 = torch.randn(8, 16), torch.randn(8, 16, dtype=torch.bfloat16)

    def step() -> None:
        a32 @ a32.T  # 2 * 8 * 16 * 8
        a16 @ a16.T
        a16 @ a16.T

    _, flops = count_flops(step)
    assert dict(flops.by_precision) == {Precision.FP32: 2048, Precision.BF16: 4096}
    assert flops.total == 6144
    names = {m.name: m.value for m in flops.metrics()}
    assert names == {"flops": 6144.0, "flops_fp32": 2048.0, "flops_bf16": 4096.0}


def test_convolutions_are_counted_by_dtype_too():
    conv = torch.nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    _, flops = count_flops(lambda: conv(x))
    assert flops.total > 0 and flops.by_precision == ((Precision.BF16, flops.total),)


TF32_ON = Tf32(matmul=True, conv=True)
TF32_OFF = Tf32(matmul=False, conv=False)
AMPERE, VOLTA = (8, 0), (7, 0)


@pytest.mark.parametrize(("dtype", "kind", "tf32", "device", "capability", "expected"), [
    ("float32", OpKind.MATMUL, TF32_ON, "cuda", AMPERE, Precision.TF32),
    ("float32", OpKind.ATTENTION, TF32_ON, "cuda", (9, 0), Precision.TF32),
    ("float32", OpKind.MATMUL, TF32_OFF, "cuda", AMPERE, Precision.FP32),
    ("float32", OpKind.MATMUL, TF32_ON, "cuda", VOLTA, Precision.FP32),  # V100/T4: no TF32, whatever the flag
    ("float32", OpKind.MATMUL, TF32_ON, "cpu", None, Precision.FP32),
    ("float32", OpKind.CONV, Tf32(matmul=False, conv=True), "cuda", AMPERE, Precision.TF32),  # cuDNN's default
    ("float32", OpKind.MATMUL, Tf32(matmul=False, conv=True), "cuda", AMPERE, Precision.FP32),
    ("float32", OpKind.CONV, Tf32(matmul=True, conv=False), "cuda", AMPERE, Precision.FP32),
    ("bfloat16", OpKind.MATMUL, TF32_ON, "cuda", AMPERE, Precision.BF16),
    ("float16", OpKind.CONV, TF32_OFF, "cpu", None, Precision.FP16),
    ("float8_e4m3fn", OpKind.MATMUL, TF32_OFF, "cuda", (9, 0), Precision.FP8),
    ("float64", OpKind.MATMUL, TF32_ON, "cuda", AMPERE, Precision.FP64),
    ("complex64", OpKind.MATMUL, TF32_ON, "cpu", None, Precision.OTHER),
])
def test_the_precision_of_an_op(dtype: str, kind: OpKind, tf32: Tf32, device: str,
                                capability: tuple[int, int] | None, expected: Precision) -> None:
    assert precision_of(dtype, kind, tf32, device, capability) is expected


@pytest.fixture
def restored_tf32() -> Iterator[None]:
    """Every TF32 flag put back as it was (through the API that set it)."""
    backends = torch.backends
    matmul = backends.cuda.matmul.fp32_precision if hasattr(backends.cuda.matmul, "fp32_precision") else None
    conv = backends.cudnn.conv.fp32_precision if hasattr(backends.cudnn, "conv") else None
    precision = torch.get_float32_matmul_precision()
    legacy = backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(precision)
    backends.cudnn.allow_tf32 = legacy
    if matmul is not None:
        backends.cuda.matmul.fp32_precision = matmul
    if conv is not None:
        backends.cudnn.conv.fp32_precision = conv


@pytest.mark.usefixtures("restored_tf32")
def test_tf32_flags_follow_the_matmul_and_convolution_flags_separately() -> None:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    assert tf32_flags() == Tf32(matmul=False, conv=True)  # torch's defaults
    torch.set_float32_matmul_precision("high")
    assert tf32_flags() == Tf32(matmul=True, conv=True)
    torch.backends.cudnn.allow_tf32 = False
    assert tf32_flags() == Tf32(matmul=True, conv=False)
    torch.set_float32_matmul_precision("highest")
    assert tf32_flags() == Tf32(matmul=False, conv=False)


@pytest.mark.usefixtures("restored_tf32")
def test_tf32_flags_set_through_the_fp32_precision_api_are_read() -> None:
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: no fp32_precision API")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert tf32_flags() == Tf32(matmul=True, conv=False)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert tf32_flags() == Tf32(matmul=False, conv=True)


def test_the_causal_argument_is_read_by_position_or_name() -> None:
    assert is_causal((4, "is_causal"), ("q", "k", "v", 0.0, True), {})
    assert not is_causal((4, "is_causal"), ("q", "k", "v", 0.0, False), {})
    assert is_causal((4, "is_causal"), ("q", "k", "v"), {"is_causal": True})
    assert is_causal((9, "custom_mask_type"), tuple(range(9)) + (1,), {})
    assert not is_causal((9, "custom_mask_type"), tuple(range(9)) + (0,), {})
    assert not is_causal(None, (True,), {})


def test_the_split_metrics_are_reported_not_gated() -> None:
    assert set(PRECISION_METRICS) <= set(DEFAULT_TOLERANCES)
    assert all(DEFAULT_TOLERANCES[name] == float("inf") for name in PRECISION_METRICS)
    assert FlopCount(total=0, by_precision=()).metrics()[0].name == "flops"
