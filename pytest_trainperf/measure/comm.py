"""Exact communication of one step: calls and bytes by collective, on every rank of a distributed cell.

Counted by the work mode (:mod:`.work`), a ``TorchDispatchMode`` on the instrumented step, which sees
every collective that goes through the dispatcher as a ``c10d`` op (``c10d.allreduce_``,
``c10d._allgather_base_``, ...) or a functional one (``_c10d_functional.all_reduce``, DTensor's and
compiled code's). That is all of them: ``torch.distributed``'s Python functions dispatch the ``c10d``
ops, and so does the C++ ``ProcessGroup`` API, which DDP's reducer calls for its bucketed all-reduce
from the autograd engine (checked on gloo with torch 2.13: DDP's buckets are seen as
``c10d.allreduce_``, FSDP2's unshard and gradient reduction as ``c10d._allgather_base_`` and
``c10d._reduce_scatter_base_``). ``torch.distributed.tensor.debug.CommDebugMode`` is the same kind of
mode; it counts calls, not bytes. The flight recorder sees NCCL only; a DDP comm hook sees DDP only.

* ``comm_calls``: collectives issued in the step, with the count of each collective in the breakdown.
* ``comm_bytes``: their bytes, each collective counted as the size of its full buffer: the tensor(s)
  of an all-reduce, broadcast or reduce, the gathered output of an all-gather, the input of a
  reduce-scatter, the input of an all-to-all, the tensor of a send or receive (``numel x element
  size``; the largest tensor operand of the op). Per rank, as the rank's code issued them.

Both are exact: the same code issues the same collectives with the same sizes on any machine, so
``gradients all-reduced twice`` fails on a CPU runner. Not counted: what does not dispatch a ``c10d``
op (a process group's own internal traffic, NCCL's protocol overhead, an object collective's pickled
bytes beyond the tensors it dispatches) and ``wait_tensor`` (no communication of its own).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pytest_trainperf.records import Breakdown, Metric

NAMESPACES = ("c10d", "_c10d_functional")
"""The op namespaces of collectives: the process group's ops and the functional collectives."""
COLLECTIVES = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast", "reduce_": "reduce",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "gather_": "gather", "scatter_": "scatter", "send": "send", "recv_": "recv", "recv_any_source_": "recv",
    "barrier": "barrier", "monitored_barrier_": "barrier",
}
"""Op names (without namespace and overload) -> the collective they are counted as. An op of the
namespaces not listed counts under its own name (``wait_tensor`` is not counted)."""
NOT_COUNTED = frozenset({"wait_tensor", "wait"})
"""Ops of the collective namespaces that communicate nothing themselves."""


@dataclass
class CommCount:
    """The collectives one step issued (filled while the step runs)."""

    calls: Counter[str] = field(default_factory=Counter)
    """Collective (``all_reduce``) -> calls."""
    bytes: Counter[str] = field(default_factory=Counter)
    """Collective -> bytes of its full buffers."""

    def add(self, namespace: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count one op ``namespace.name`` (bare name, no overload) if it is a collective."""
        if namespace not in NAMESPACES or name in NOT_COUNTED:
            return
        collective = COLLECTIVES.get(name, name)
        self.calls[collective] += 1
        self.bytes[collective] += max((_size(group) for group in (*args, *kwargs.values())), default=0)

    def metrics(self) -> list[Metric]:
        """``comm_calls`` and ``comm_bytes`` (exact: any change is a change of the code)."""
        return [Metric("comm_calls", float(sum(self.calls.values())), ""),
                Metric("comm_bytes", float(sum(self.bytes.values())), "B")]

    def breakdowns(self) -> tuple[Breakdown, ...]:
        """Both by collective, as stored with a baseline (a failure names the collective that grew)."""
        return (Breakdown("comm_calls", tuple((k, float(v)) for k, v in self.calls.items()), "",
                          "collectives that appeared or grew"),
                Breakdown("comm_bytes", tuple((k, float(v)) for k, v in self.bytes.items()), "B",
                          "collectives whose bytes appeared or grew"))


def _size(value: object) -> int:
    """Bytes of a tensor argument, or of the tensors in a list argument (lists of lists included)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 0


def distributed_now() -> bool:
    """Whether this process is a rank of an initialised default process group (communication counts
    are reported then, and only then)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())
