"""The one counting pass (measure/counting.py) against what it replaces: ``FlopCounterMode`` with the
plugin's formulas, and the work mode stacked under it. FLOPs, their split by precision and every work
count must be the same to the unit on every kind of step the examples run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pytest_trainperf.measure.counting import count_step  # noqa: E402
from pytest_trainperf.measure.flops import FlopCount, Precision, count_flops, flop_formulas, new_tally  # noqa: E402
from pytest_trainperf.measure.work import Counting, WorkCount  # noqa: E402


def reference(fn: Callable[[], object]) -> tuple[FlopCount, WorkCount]:
    """What the fixture counted before the one pass: ``FlopCounterMode`` (its module tracker, its
    decomposition attempts, torch's shape wrapper) with the plugin's formulas, and the work counts
    taken by a second mode stacked under it."""
    tally = new_tally()
    work = Counting("cpu")

    class StackedWorkMode(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            work.op(func, args, kwargs, out)
            return out

    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas(tally))
    with StackedWorkMode(), counter:
        fn()
    work.finish()
    split = tuple((p, tally.flops[p]) for p in Precision if tally.flops.get(p))
    return FlopCount(total=counter.get_total_flops(), by_precision=split), work.count


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = x + self.attention(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return h + self.mlp(h)


def transformer(checkpointed: bool, dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(16) for _ in range(2)).to(dtype)
    opt = torch.optim.AdamW(blocks.parameters(), lr=1e-3)
    x = torch.randn(2, 8, 16, dtype=dtype)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if checkpointed else block(h)
        loss = h.float().square().mean()
        loss.backward()
        opt.step()
        return loss

    return step


def convnet() -> Callable[[], object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))

    def step() -> object:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def attention_kinds() -> Callable[[], object]:
    torch.manual_seed(0)
    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    mask = torch.rand(16, 16) > 0.5

    def step() -> object:
        causal = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        masked = nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        low = q.bfloat16()
        bf16 = nn.functional.scaled_dot_product_attention(low, low, low)
        loss = causal.sum() + masked.sum() + bf16.float().sum()
        loss.backward()
        return loss

    return step


def autocast() -> Callable[[], object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)

    def step() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        if loss.item() > 1e9:  # a sync: counted at this line either way
            print("diverged")
        loss.backward()
        return loss

    return step


def by_op(syncs: Counter[str]) -> Counter[str]:
    """Sync counts by op, whatever their site."""
    out: Counter[str] = Counter()
    for site, n in syncs.items():
        out[site.rsplit(" (", 1)[1]] += n
    return out


def conditional(counted_before: bool) -> Callable[[], object]:
    """A ``torch.cond`` with matmuls in both branches, after a matmul or first in the step."""
    x = torch.randn(4, 4)

    def step() -> object:
        y = x @ x if counted_before else x
        return torch.cond(y.sum() > 0, lambda a: a @ a @ a, lambda a: a @ a + 1, (y,))

    return step


@pytest.mark.parametrize("make", [
    pytest.param(lambda: transformer(checkpointed=False), id="attention-blocks"),
    pytest.param(lambda: transformer(checkpointed=True), id="checkpointed-blocks"),
    pytest.param(lambda: transformer(checkpointed=False, dtype=torch.bfloat16), id="bf16"),
    pytest.param(convnet, id="conv"),
    pytest.param(attention_kinds, id="sdpa-causal-masked-bf16"),
    pytest.param(autocast, id="bf16-autocast"),
    pytest.param(lambda: conditional(counted_before=True), id="cond-after-flops"),
    pytest.param(lambda: conditional(counted_before=False), id="cond-first"),
])
def test_one_pass_counts_what_the_flop_counter_and_the_stacked_work_mode_counted(make: Callable[[], Any]) -> None:
    before_flops, before_work = reference(make())
    _, flops, work = count_step(make())
    assert flops.total > 0
    assert flops == before_flops  # the total and its split by precision, to the FLOP
    assert count_flops(make())[1] == before_flops  # FLOPs alone: the same
    assert work.ops == before_work.ops  # the same ops ran: decompositions where the counter decomposed
    assert work.traffic == before_work.traffic and work.by_precision == before_work.by_precision
    assert work.fp32_by_op == before_work.fp32_by_op
    # the same syncs (the reference's sites name its own mode's line: a mode outside the package)
    assert by_op(work.syncs) == by_op(before_work.syncs)
    assert all("work.op(" not in site for site in work.syncs)
    assert work.metrics(float(flops.total)) == before_work.metrics(float(before_flops.total))


def test_torch_counts_the_same_without_the_plugins_formulas_where_they_agree() -> None:
    # a plain FlopCounterMode (no custom mapping) on a step with no CPU attention and no causal halving
    step = convnet()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    assert count_flops(convnet())[1].total == counter.get_total_flops() > 0


def test_the_counting_pass_installs_no_module_hooks() -> None:
    # FlopCounterMode's module tracker sets global module hooks; the counting pass attributes nothing
    # to modules and leaves every module call on its fast path
    from torch.nn.modules import module

    seen: list[int] = []

    def step() -> object:
        seen.append(len(module._global_forward_hooks) + len(module._global_forward_pre_hooks))
        return nn.Linear(2, 2)(torch.ones(2)).sum()

    count_step(step)
    assert seen == [0]
