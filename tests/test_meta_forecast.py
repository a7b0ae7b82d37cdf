"""``tp.forecast``: a step's CUDA memory forecast on the meta device, and its OOM maps.

The forecasts below are worked out by hand from the allocator's rule (each storage rounded up to
512 bytes) and checked to the byte; the plugin's side runs through pytester.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pytest_trainperf as tp
from pytest_trainperf.env import forecast_fingerprint
from pytest_trainperf.measure.forecast import CUDA_BLOCK, NeedsData, attention_kernel, cuda_block_bytes, forecast_peak

pytest_plugins = ["pytester"]

W = cuda_block_bytes(1000 * 1000 * 4)  # a 1000x1000 fp32 weight: 4,000,000 B in 7813 blocks
B = cuda_block_bytes(1000 * 4)  # its bias: 4,000 B in 8 blocks
X = cuda_block_bytes(64 * 1000 * 4)  # a batch of 64 rows: exactly 500 blocks
PARAMS = 2 * (W + B)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000)), torch.randn(64, 1000)


def test_the_allocator_rounds_every_storage_up_to_512_bytes():
    assert [cuda_block_bytes(n) for n in (0, 1, 512, 513)] == [0, 512, 512, 1024]
    assert W == 4_000_256 and B == 4_096 and X == 256_000 and CUDA_BLOCK == 512


def test_a_linear_stack_with_adamw_is_forecast_to_the_byte():
    model, x = mlp()
    optimizer = torch.optim.AdamW(model.parameters())  # foreach=None: CUDA's foreach kernels

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    _, forecast = forecast_peak(step, calls=2)
    # the second step's optimizer: parameters, gradients, two moments each, and foreach's sqrt of the
    # second moments (one temporary the size of every parameter), the batch, this step's and the
    # previous step's 0-d losses (one block each)
    assert forecast.peak_bytes == 5 * PARAMS + X + 2 * CUDA_BLOCK
    assert dict(forecast.parts) == {"parameters": PARAMS, "gradients": PARAMS, "optimizer_state": 2 * PARAMS,
                                    "activations": 2 * CUDA_BLOCK, "temporaries": PARAMS, "other": X}
    assert forecast.start_bytes == PARAMS + X
    assert optimizer.param_groups[0]["foreach"] is None  # the user's choice is left as it was


def test_an_inference_forecast_counts_what_the_step_reaches_and_the_live_activations():
    model, x = mlp()
    other, _ = mlp()  # alive on meta, but the step cannot reach it: not counted

    def forward():
        with torch.no_grad():
            return model(x)

    _, forecast = forecast_peak(forward)
    # parameters and batch, then two activations of 64x1000 alive at once (ReLU's input and output)
    assert forecast.peak_bytes == PARAMS + X + 2 * X
    assert other[0].weight.is_meta


def test_attention_is_forecast_with_the_kernel_cuda_would_pick():
    with torch.device("meta"):
        q = torch.empty(2, 8, 1024, 64, dtype=torch.bfloat16, requires_grad=True)
        q32 = torch.empty(2, 8, 1024, 64, requires_grad=True)
        mask = torch.zeros(1024, 1024, dtype=torch.bool)
    assert attention_kernel(q, q, q, None, 0.0) == "flash"
    assert attention_kernel(q32, q32, q32, None, 0.0) == "efficient"  # fp32: no flash
    assert attention_kernel(q, q, q, mask, 0.0) == "efficient"  # an explicit mask: no flash
    odd = q[..., :60]
    assert attention_kernel(odd, odd, odd, None, 0.0) == "math"  # head dim not a multiple of 8

    def attend():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        out.sum().backward()
        return out.detach()

    _, flash = forecast_peak(attend)
    with sdpa_kernel([SDPBackend.MATH]):
        _, math = forecast_peak(attend)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        _, efficient = forecast_peak(attend)
    assert (flash.attention, math.attention, efficient.attention) == (
        (("flash", 1),), (("math", 1),), (("efficient", 1),))
    scores = 2 * 8 * 1024 * 1024 * 2  # one bf16 L x L matrix per head: what flash never holds
    assert math.peak_bytes - flash.peak_bytes >= scores
    assert efficient.peak_bytes - flash.peak_bytes < scores // 8


def test_a_step_that_needs_data_is_refused_naming_its_line():
    model, x = mlp()

    def step():
        loss = model(x).square().mean()
        if loss.item() > 10:  # the line a forecast cannot run
            loss = loss / 10
        return loss

    with pytest.raises(NeedsData) as caught:
        forecast_peak(step)
    assert "test_meta_forecast.py:" in caught.value.where
    assert "`if loss.item() > 10:  # the line a forecast cannot run`" in caught.value.where
    assert caught.value.error == "RuntimeError: Tensor.item() cannot be called on meta tensors"


@pytest.mark.parametrize("op", ["x.tolist()", "x[x > 0]", "torch.unique(x)", "x.masked_select(x > 0)"])
def test_ops_meta_cannot_run_are_refused_naming_the_line(op):
    with torch.device("meta"):
        x = torch.empty(8)
    code = compile(f"def step():\n    return {op}\n", "model_code.py", "exec")
    scope = {"x": x, "torch": torch}
    exec(code, scope)
    with pytest.raises(NeedsData) as caught:
        forecast_peak(scope["step"])
    assert caught.value.where.startswith("model_code.py:2")


def test_the_forecast_fingerprint_names_torch_and_not_the_host():
    assert forecast_fingerprint().key == f"meta | cuda (forecast) | torch {torch.__version__} | cuda none | threads 1"


@pytest.mark.parametrize(("args", "expected"), [
    ({"memory": "lots"}, "tp.forecast(memory=...): expected a size of at least 1 byte"),
    ({"memory": 0}, "tp.forecast(memory=...): expected a size of at least 1 byte"),
    ({"memory": "24GiB", "memory_axis": "gpu"}, "tp.forecast: expected memory= or memory_axis=, not both"),
    ({"memory_axis": "not an axis"}, "tp.forecast: expected memory_axis to name a tp.grid axis, got 'not an axis'"),
])
def test_bad_forecast_arguments_are_refused_with_what_was_expected(args, expected):
    with pytest.raises(tp.GridError) as caught:
        tp.forecast(**args)
    assert str(caught.value).startswith(expected)


MLP_SUITE = """
import os
import torch
from torch import nn
import pytest_trainperf as tp

CALLS = []

@tp.grid(width=[256, 1024], gpu=["16MiB", "64MiB"])
@tp.forecast(memory_axis="gpu")
def test_mlp(trainperf, width, gpu):
    layers, shrink = int(os.environ.get("LAYERS", "2")), int(os.environ.get("SHRINK", "1"))
    with torch.device(trainperf.device):
        model = nn.Sequential(*[nn.Linear(width // shrink, width // shrink) for _ in range(layers)])
        x = torch.randn(64, width // shrink)
    optimizer = torch.optim.AdamW(model.parameters())

    def step():
        CALLS.append(width)
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    trainperf.train(step, steps=10)


def test_calls():  # runs last: the step ran twice per width, whatever the device
    assert CALLS == [256, 256, 1024, 1024]
"""


def test_an_oom_map_is_judged_against_its_baseline(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    pytester.makepyfile(test_suite=MLP_SUITE)
    result = pytester.runpytest("--trainperf-update-baselines", "-p", "no:randomly")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*test_mlp*peak_memory_forecast*", "*width=1024-gpu=16MiB*new -> oom-forecast*"])
    # unchanged: the same map passes
    pytester.runpytest("--trainperf").assert_outcomes(passed=5)
    # a fourth layer: the 1024-wide model (2 layers: 40 MiB) needs 80 MiB, over the 64 MiB card
    monkeypatch.setenv("LAYERS", "4")
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=2, failed=3)  # the 1024-wide model on 16 MiB stays out of memory: unchanged
    result.stdout.fnmatch_lines([
        "*peak_memory_forecast: baseline 2.57 MiB, now 5.08 MiB, change +97.5% (tolerance 0.5%)",
        "*parts of the forecast peak that grew: +1.00 MiB optimizer_state, +514 KiB gradients, +514 KiB parameters*",
        "*FAILED*test_mlp?width=256-gpu=16MiB*peak_memory_forecast +97.5%*",
        "*FAILED*test_mlp?width=256-gpu=64MiB*peak_memory_forecast +97.5%*",
        "*FAILED*test_mlp?width=1024-gpu=64MiB*out of memory (oom-forecast), where the baseline was measured*"])
    assert "forecast peak 80.3 MiB exceeds the device's 64.0 MiB" in result.stdout.str()
    # half the width: the 1024-wide model (now 10 MiB) fits the 16 MiB card it did not fit: an improvement
    monkeypatch.setenv("LAYERS", "2")
    monkeypatch.setenv("SHRINK", "2")
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["1024 * 10.1 * 10.1", "* was OOM (forecast) * impr", "* impr *",
                                 "4 cells measured: 4 improved"])


def test_a_plain_run_forecasts_once_per_cell_of_the_other_axes(pytester):
    pytester.makepyfile(test_suite=MLP_SUITE)
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=5)


def test_a_data_dependent_step_fails_its_cell_with_the_line(pytester):
    pytester.makepyfile(test_suite="""
        import torch
        import pytest_trainperf as tp

        @tp.forecast(memory="24GiB")
        def test_step(trainperf):
            weight = torch.ones(8, device=trainperf.device, requires_grad=True)

            def step():
                loss = weight.sum()
                if loss.item() > 10:
                    loss = loss / 10
                return loss

            trainperf.train(step, steps=3)
    """)
    result = pytester.runpytest("--trainperf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tp.forecast: the step cannot run on the meta device: it needs tensor values*"
                                 "test_suite.py:10 `if loss.item() > 10:`*"])
    assert "oom-forecast" not in result.stdout.str()


def test_a_model_far_bigger_than_the_machine_is_forecast_without_allocating_it(pytester):
    pytester.makepyfile(test_suite="""
        import torch
        from torch import nn
        import pytest_trainperf as tp

        @tp.forecast(memory="80GiB")
        def test_huge(trainperf):
            with torch.device(trainperf.device):
                # 10 layers of 50,000 x 50,000 in bf16: 50 GB of weights, twice this machine's memory
                model = nn.Sequential(*[nn.Linear(50_000, 50_000, bias=False, dtype=torch.bfloat16)
                                        for _ in range(10)])
                x = torch.zeros(8, 50_000, dtype=torch.bfloat16)

            def forward():
                with torch.no_grad():
                    return model(x)

            trainperf.run(forward, iters=5)
    """)
    result = pytester.runpytest("--trainperf", "--trainperf-update-baselines", "-v")  # -v: new values listed
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*peak_memory_forecast*46.6 GiB*"])


def test_a_memory_axis_that_is_not_a_grid_axis_is_refused_at_collection(pytester):
    pytester.makepyfile(test_sizes="""
        import pytest_trainperf as tp

        @tp.grid(card=["24GiB", "lots"])
        @tp.forecast(memory_axis="card")
        def test_sizes(trainperf, card):
            pass
    """, test_missing="""
        import pytest_trainperf as tp

        @tp.grid(width=[1, 2])
        @tp.forecast(memory_axis="gpu")
        def test_missing(trainperf, width):
            pass
    """)
    result = pytester.runpytest("--trainperf")
    result.stdout.fnmatch_lines([
        "*test_missing: tp.forecast(memory_axis='gpu'): expected the name of a tp.grid axis ('width')*",
        "*test_sizes: tp.forecast(memory_axis='card'): expected a size of at least 1 byte*got 'lots'*",
    ])
    result.assert_outcomes(errors=2)
