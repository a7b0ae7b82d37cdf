"""Tests of ``pytest_trainperf.measure.memory`` against real torch: exact byte counts, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode, is_in_torch_dispatch_mode
from torch.utils.data import DataLoader, TensorDataset

from pytest_trainperf.measure import memory
from pytest_trainperf.measure.memory import (
    METHOD_CUDA_ALLOCATOR,
    METHOD_STORAGE_TRACKER,
    MemoryPeak,
    measure_peak,
)

pytestmark = pytest.mark.filterwarnings("error")

MIB = 2**20
"""One mebibyte."""
FLOAT32 = 4
"""Bytes per float32 element."""
INT64 = 8
"""Bytes per int64 element."""
SCALAR = FLOAT32
"""Bytes of the 0-dim float32 result of a full reduction (``sum``)."""
CPU = torch.device("cpu")
SUBPROCESS_TIMEOUT_S = 120
"""Generous: each child imports torch; the limit only guards against a hang."""


def _rise(fn: Callable[[], object]) -> int:
    """Bytes the call of ``fn`` rose above what was live when it started."""
    _, peak = measure_peak(fn, CPU)
    return peak.peak_bytes - peak.start_bytes


def _linear_bytes(fan_in: int, fan_out: int) -> int:
    """Bytes of an ``nn.Linear(fan_in, fan_out)``'s float32 weight and bias, by hand."""
    return (fan_in * fan_out + fan_out) * FLOAT32


def test_one_temporary_rises_by_its_bytes_plus_what_is_live_beside_it() -> None:
    def step() -> torch.Tensor:
        big = torch.zeros(16 * MIB // FLOAT32)
        total = big.sum()  # live together with `big` for an instant
        del big
        return total

    result, peak = measure_peak(step, CPU)

    assert peak.peak_bytes - peak.start_bytes == 16 * MIB + SCALAR
    assert peak.reserved_bytes is None
    assert peak.method == METHOD_STORAGE_TRACKER
    assert result.item() == 0.0


def test_sequential_temporaries_do_not_add_up() -> None:
    def step() -> torch.Tensor:
        first = torch.ones(8 * MIB // FLOAT32)
        a = first.sum()
        del first
        second = torch.ones(8 * MIB // FLOAT32)
        b = second.sum()
        del second
        return a + b

    # At the peak: `second`, `a` and `b`; `first` is gone.
    assert _rise(step) == 8 * MIB + 2 * SCALAR


def test_overlapping_temporaries_add_up() -> None:
    def step() -> torch.Tensor:
        first = torch.ones(8 * MIB // FLOAT32)
        second = torch.ones(8 * MIB // FLOAT32)
        a, b = first.sum(), second.sum()
        del first, second
        return a + b

    assert _rise(step) == 16 * MIB + 2 * SCALAR


def test_views_and_in_place_ops_share_their_storage() -> None:
    def step() -> None:
        base = torch.zeros(4 * MIB // FLOAT32)
        view = base[1:].view(-1, 1)
        view.add_(1.0)
        base.mul_(2.0)
        del base, view

    assert _rise(step) == 4 * MIB


@pytest.mark.parametrize(
    "grow",
    [
        pytest.param(lambda t: t.resize_(16 * MIB // FLOAT32), id="resize_"),
        pytest.param(lambda t: torch.zeros(16 * MIB // FLOAT32, out=t), id="out="),
    ],
)
def test_a_storage_grown_in_place_is_reread(grow: Callable[[torch.Tensor], object]) -> None:
    def step() -> None:
        empty = torch.empty(0)
        grow(empty)
        del empty

    assert _rise(step) == 16 * MIB


def test_a_storage_made_outside_the_dispatcher_counts_from_the_first_op_that_takes_it() -> None:
    def step() -> torch.Tensor:
        # frombuffer runs no aten op: the storage is first seen as an argument of `sum`.
        wrapped = torch.frombuffer(bytearray(16 * MIB), dtype=torch.float32)
        total = wrapped.sum()
        del wrapped
        return total

    assert _rise(step) == 16 * MIB + SCALAR


def test_grads_live_at_entry_are_counted_and_their_frees_seen() -> None:
    model = torch.nn.Linear(1024, 1024)
    x = torch.randn(8, 1024)
    grad_bytes = _linear_bytes(1024, 1024)
    _, before = measure_peak(lambda: None, CPU)
    model(x).sum().backward()  # the grads now exist in C++ only: never read from Python here

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        big = torch.zeros(16 * MIB // FLOAT32)
        total = big.sum()
        del big
        return total

    _, peak = measure_peak(step, CPU)

    assert peak.start_bytes - before.start_bytes == grad_bytes
    assert peak.peak_bytes == peak.start_bytes - grad_bytes + 16 * MIB + SCALAR


def test_storages_on_other_devices_and_without_storage_are_skipped() -> None:
    indices = torch.tensor([[0, 1], [1, 0]])
    values = torch.tensor([1.0, 2.0])

    def step() -> torch.Tensor:
        on_meta = torch.empty(16 * MIB // FLOAT32, device="meta")
        sparse = torch.sparse_coo_tensor(indices, values, (2, 2), check_invariants=False)
        dense = sparse.to_dense()  # 2 x 2 float32, the one storage this step makes on the CPU
        del on_meta, sparse
        return dense

    result, peak = measure_peak(step, CPU)

    assert peak.peak_bytes - peak.start_bytes == 4 * FLOAT32
    assert result.tolist() == [[0.0, 1.0], [2.0, 0.0]]


def test_nested_measurements_each_see_their_own_call() -> None:
    held = 1024 * FLOAT32
    inner_bytes = 2048 * FLOAT32

    def outer_step() -> MemoryPeak:
        kept = torch.zeros(held // FLOAT32)
        _, inner = measure_peak(lambda: torch.zeros(inner_bytes // FLOAT32), CPU)
        del kept
        return inner

    inner, outer = measure_peak(outer_step, CPU)

    assert inner.peak_bytes - inner.start_bytes == inner_bytes
    assert inner.start_bytes - outer.start_bytes == held
    assert outer.peak_bytes - outer.start_bytes == held + inner_bytes


def test_an_exception_propagates_and_leaves_no_dispatch_mode_active() -> None:
    assert _get_current_dispatch_mode() is None

    def step() -> None:
        torch.zeros(1024)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        measure_peak(step, CPU)

    assert _get_current_dispatch_mode() is None
    assert torch._C._len_torch_dispatch_stack() == 0
    assert not is_in_torch_dispatch_mode()


def test_returns_the_result_as_is_and_keeps_nothing_alive() -> None:
    live_at_entry = torch.zeros(1024)
    entry_storage = weakref.ref(live_at_entry.untyped_storage())
    made_inside: list[weakref.ref[torch.Tensor]] = []

    def step() -> torch.Tensor:
        inside = torch.ones(1024)
        made_inside.append(weakref.ref(inside))
        return inside

    result, _ = measure_peak(step, CPU)

    assert made_inside[0]() is result
    # Freed after the measurement: a callback still armed would count into the void, and an error in
    # a weakref callback surfaces as an unraisable-exception warning, an error here.
    del result, live_at_entry
    assert made_inside[0]() is None
    assert entry_storage() is None


def test_a_dataloader_step_peak_does_not_depend_on_how_many_batches_the_workers_prefetched() -> None:
    """Batches from worker processes arrive in shared memory, wrapped by ``aten.set_`` as the loader
    receives them; how many it has received ahead of the step is up to the workers' scheduling. Only
    the batch the step uses counts, from its first use: neither those held before the step (a
    prefetch buffer) nor those received during it and left unused."""
    rows, row, batch = 512, 256, 8
    loader = DataLoader(TensorDataset(torch.ones(rows, row)), batch_size=batch, num_workers=2)
    batch_bytes = batch * row * FLOAT32
    it = iter(loader)
    peaks = []
    for held, ahead in ((0, 0), (3, 0), (0, 2), (2, 3)):
        buffered = [next(it) for _ in range(held)]  # received before the step, never used by it
        assert all(b[0].untyped_storage().is_shared() for b in buffered)

        def step(ahead: int = ahead) -> torch.Tensor:
            unused = [next(it) for _ in range(ahead)]  # received during the step, not used
            (x,) = next(it)
            total = x.sum()
            del unused
            return total

        peak = measure_peak(step, CPU)[1]  # the result not kept: the next start is the same
        peaks.append((peak.start_bytes, peak.peak_bytes))
        assert peak.peak_bytes - peak.start_bytes == batch_bytes + SCALAR, (held, ahead)
        del buffered
    assert len(set(peaks)) == 1, peaks


def test_a_shared_memory_storage_counts_from_its_first_use_not_from_entry() -> None:
    shared = torch.ones(MIB // FLOAT32).share_memory_()

    _, idle = measure_peak(lambda: None, CPU)  # alive but not used: not counted
    _, used = measure_peak(shared.sum, CPU)

    assert used.start_bytes == idle.start_bytes
    assert used.peak_bytes - used.start_bytes == MIB + SCALAR


def test_tracker_matches_the_cpu_allocator_for_a_training_step() -> None:
    """An independent oracle: the profiler's record of every CPU allocator call.

    With SGD and MSE no kernel allocates a scratch buffer of its own, so the two agree to the byte;
    forward, backward and optimizer ops must all be seen for that to hold.
    """
    from torch._C._profiler import _ExtraFields_Allocation, _ProfilerEvent
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 64), torch.randn(32, 8)

    def step() -> torch.Tensor:
        # Frees only what it allocates: the profiler misses frees of blocks allocated before it.
        loss = torch.nn.functional.mse_loss(model(x), y)
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    tracked = _rise(step)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations: list[tuple[int, int]] = []

    def collect(event: _ProfilerEvent) -> None:
        if isinstance(event.extra_fields, _ExtraFields_Allocation):
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        for child in event.children:
            collect(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        collect(root)
    allocations.sort(key=lambda allocation: allocation[0])
    live = allocator_peak = 0
    for _, size in allocations:
        live += size
        allocator_peak = max(allocator_peak, live)

    assert live == 0
    assert tracked == allocator_peak


TRAINING_SCRIPT = """
import importlib.util, json, sys
import torch

# Loaded by path, so the child needs neither the rest of the package nor an install.
spec = importlib.util.spec_from_file_location("trainperf_memory", sys.argv[1])
memory = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = memory
spec.loader.exec_module(memory)

torch.manual_seed(0)
cpu = torch.device("cpu")
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(32, 64)
y = torch.randint(0, 8, (32,))

def step(extra_bytes):
    held = torch.zeros(extra_bytes // 4)
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    del held
    return loss.item()

step(0)
_, plain = memory.measure_peak(lambda: step(0), cpu)
_, extra = memory.measure_peak(lambda: step(16 * 2**20), cpu)
print(json.dumps({
    "start": plain.start_bytes,
    "peak": plain.peak_bytes,
    "extra_start": extra.start_bytes,
    "extra_peak": extra.peak_bytes,
}))
"""
"""A fresh process: warm one AdamW step, then measure it plain and with 16 MiB held throughout."""


def test_training_step_peak_is_reproducible_and_exact_across_processes() -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", TRAINING_SCRIPT, str(Path(memory.__file__).resolve())],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        for _ in range(2)
    ]
    finished = [(child, *child.communicate(timeout=SUBPROCESS_TIMEOUT_S)) for child in children]
    for child, _, stderr in finished:
        assert child.returncode == 0, stderr
    first, second = (json.loads(stdout) for _, stdout, _ in finished)

    params = _linear_bytes(64, 128) + _linear_bytes(128, 8)
    inputs = 32 * 64 * FLOAT32 + 32 * INT64
    grads = params
    adamw_state = 2 * params + 4 * FLOAT32  # exp_avg, exp_avg_sq, and a 0-dim float32 `step` per param
    assert first == second
    assert first["start"] == params + inputs + grads + adamw_state
    assert first["peak"] >= params + grads + adamw_state
    assert first["extra_start"] == first["start"]
    assert first["extra_peak"] - first["peak"] == 16 * MIB


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: reads the caching allocator's counters")


@CUDA
def test_cuda_peak_comes_from_the_caching_allocator() -> None:
    device = torch.device("cuda")

    def step() -> int:
        # zeros = empty + fill_: no kernel scratch; 16 MiB is a multiple of the 512-byte block size.
        big = torch.zeros(16 * MIB // FLOAT32, device=device)
        return big.numel()

    result, peak = measure_peak(step, device)

    assert result == 16 * MIB // FLOAT32
    assert peak.method == METHOD_CUDA_ALLOCATOR
    assert peak.peak_bytes - peak.start_bytes == 16 * MIB
    assert peak.reserved_bytes is not None
    assert peak.reserved_bytes >= peak.peak_bytes


@CUDA
def test_cuda_peak_is_max_memory_allocated_less_the_baseline_and_reserved_is_on_the_same_basis() -> None:
    device = torch.device("cuda")
    held = torch.zeros(8 * MIB // FLOAT32, device=device)  # alive before the test: left out
    outside = memory.Preexisting(device)
    params = torch.zeros(2 * MIB // FLOAT32, device=device)  # the test's own: counted

    def step() -> int:
        return int(torch.zeros(16 * MIB // FLOAT32, device=device).numel())

    _, peak = measure_peak(step, device, outside)
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)

    assert peak.baseline_bytes == outside.cuda_bytes  # nothing of it was freed before the step
    assert peak.peak_bytes == allocated - peak.baseline_bytes == 18 * MIB
    assert peak.reserved_bytes == reserved - peak.baseline_bytes
    assert peak.start_bytes == 2 * MIB
    assert peak.reserved_bytes >= peak.peak_bytes
    del held, params


@CUDA
def test_memory_freed_before_the_step_does_not_make_the_cuda_peak_read_low() -> None:
    device = torch.device("cuda")
    dropped = torch.zeros(8 * MIB // FLOAT32, device=device)  # alive when the test began, freed before its step
    outside = memory.Preexisting(device)
    del dropped

    def step() -> int:
        return int(torch.zeros(16 * MIB // FLOAT32, device=device).numel())

    _, peak = measure_peak(step, device, outside)

    assert peak.baseline_bytes == torch.cuda.memory_allocated(device) < outside.cuda_bytes  # taken right before
    assert peak.peak_bytes == torch.cuda.max_memory_allocated(device) - peak.baseline_bytes == 16 * MIB
