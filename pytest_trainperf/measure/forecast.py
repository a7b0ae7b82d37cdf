"""A step's CUDA memory, forecast on the ``meta`` device: no data, no GPU, milliseconds a step.

A forecast cell builds its model and batch on ``meta`` (``trainperf.device`` is ``meta``), and
:func:`forecast_peak` runs its step there, once or twice, under a storage tracker that counts each
storage as the CUDA caching allocator would allocate it:

- **Block rounding.** The caching allocator hands out blocks in multiples of 512 bytes (its
  ``kMinBlockSize``; a 1-byte tensor takes 512), and ``torch.cuda.max_memory_allocated`` sums those
  blocks. Each storage of ``n > 0`` bytes counts ``ceil(n / 512) * 512``; an empty one counts 0 (the
  allocator allocates nothing for it).
- **Every storage alive on ``meta``** when the step starts counts (parameters, optimizer state,
  batch, caches built by the test), then every storage an op of the step creates, until it is freed:
  the same following of storages as the CPU's exact peak (:mod:`~pytest_trainperf.measure.memory`),
  so on the same step the unrounded forecast equals the CPU tracker's peak wherever both run the
  same kernels.
- **The optimizer kernels CUDA would pick.** On CUDA, ``torch.optim`` defaults to its *foreach*
  kernels (one op over all parameters, with temporaries the size of all of them at once); on
  ``meta`` it would run one tensor at a time. An optimizer left at ``foreach=None`` runs foreach in a
  forecast, as on CUDA.
- **The attention kernel CUDA would pick.** The meta device's
  ``scaled_dot_product_attention`` picks the math kernel, which materializes the L x L score
  matrix. On CUDA, flash attention (fp16/bf16, no explicit mask, head dim a multiple of 8 up to
  256) or memory-efficient attention (any float dtype, masks allowed, head dim a multiple of 8
  for 16-bit, 4 for fp32) run instead and keep only the output and a log-sum-exp per row.
  :func:`cuda_attention` sends each call to the kernel CUDA's own selection would choose under the
  same rules, honouring ``torch.backends.cuda.enable_flash_sdp`` / ``enable_mem_efficient_sdp``
  and ``torch.nn.attention.sdpa_kernel``.

The peak is broken down, at the moment it was reached, into ``parameters``, ``gradients``,
``optimizer_state``, ``activations`` (made by the forward pass), ``temporaries`` (made by the
backward pass or the optimizer step and not kept as a gradient or a state) and ``other`` (what the
test built besides parameters: the batch, buffers, a KV cache made before the step).

What a forecast cannot see, and so leaves out (the GPU self-check measures how much it matters):
the CUDA context (300-700 MiB per process, outside ``max_memory_allocated`` too), cuBLAS and cuDNN
workspaces and the scratch flash attention's backward allocates inside the kernel, NCCL buffers, and
fragmentation: ``reserved`` memory above allocated, which depends on the order of allocations and
frees across steps.

A step that needs data (``.item()``, ``bool(t)``, a data-dependent shape such as ``nonzero`` or a
boolean mask) cannot run on ``meta``: :class:`NeedsData` names the test's line that asked.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

from pytest_trainperf.measure.memory import _StorageRef, _StorageTracker

T = TypeVar("T")

META = torch.device("meta")
"""The device a forecast runs on."""
CUDA_BLOCK = 512
"""The CUDA caching allocator's smallest block and rounding unit, in bytes (``kMinBlockSize``)."""
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "other")
"""The parts of a forecast peak, in the order shown."""
FLASH_DTYPES = (torch.float16, torch.bfloat16)
"""The dtypes flash attention runs in."""
FLASH_MAX_HEAD_DIM = 256
"""The largest head dimension flash attention takes."""
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_NEEDS_DATA = ("meta", "Meta", "data-dependent", "data dependent", "Boolean value of Tensor", "no data")
"""What the errors of an op that needs tensor values (``.item()``, ``.tolist()``, ``nonzero``) or has no meta
kernel (``unique``, ``masked_select``) say on ``meta``."""


def cuda_block_bytes(nbytes: int) -> int:
    """The bytes the CUDA caching allocator counts for a storage of ``nbytes``."""
    return 0 if nbytes <= 0 else -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


@dataclass(frozen=True)
class Forecast:
    """A step's forecast peak on a CUDA device."""

    peak_bytes: int
    """The largest sum of live storages, each rounded to the allocator's blocks: the figure to gate on."""
    exact_bytes: int
    """The same peak without rounding (what the CPU's exact peak of the same kernels would be)."""
    start_bytes: int
    """Rounded bytes alive when the first step began (parameters, batch, ...)."""
    parts: tuple[tuple[str, int], ...]
    """The peak by :data:`CATEGORIES`, at the moment it was reached (rounded bytes; they sum to the peak)."""
    attention: tuple[tuple[str, int], ...] = ()
    """``scaled_dot_product_attention`` calls by the kernel they were forecast with (``flash``, ...)."""


class NeedsData(Exception):
    """The step asked for a tensor's value, which ``meta`` tensors do not have."""

    def __init__(self, where: str, error: str) -> None:
        super().__init__(f"{where}: {error}" if where else error)
        self.where = where
        """``file.py:42 `if loss.item() > 10:``` (empty when no frame of the test's code was found)."""
        self.error = error
        """The error's first line."""


def needs_data(exc: BaseException) -> bool:
    """Whether ``exc`` is an op refusing to run on ``meta``: it needs tensor values, or has no meta kernel."""
    return isinstance(exc, (RuntimeError, NotImplementedError, TypeError)) and any(s in str(exc) for s in _NEEDS_DATA)


def user_line(tb: Any) -> str:
    """The innermost frame of the traceback outside torch, this package and the standard library:
    ``file.py:42 `source line```."""
    found = ""
    for frame, lineno in traceback.walk_tb(tb):
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith((_PACKAGE, _TORCH)) or path.startswith(sys.prefix + os.sep + "lib") \
                or frame.f_code.co_filename.startswith("<"):
            continue
        line = (traceback.linecache.getline(frame.f_code.co_filename, lineno)  # type: ignore[attr-defined]
                .strip())
        found = f"{os.path.basename(path)}:{lineno}" + (f" `{line}`" if line else "")
    return found


# ---------------------------------------------------------------------------------------- attention


def attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None, dropout_p: float, enable_gqa: bool = False) -> str:
    """The kernel CUDA's ``scaled_dot_product_attention`` would pick for these inputs (SM80 and later):
    ``flash``, ``efficient`` or ``math``; the backends switched off by ``sdpa_kernel`` are skipped."""
    head_dim = query.shape[-1]
    same_dim = key.shape[-1] == head_dim and value.shape[-1] == head_dim
    four_d = query.dim() == key.dim() == value.dim() == 4
    same_dtype = query.dtype == key.dtype == value.dtype
    flash_on = torch.backends.cuda.flash_sdp_enabled()  # type: ignore[no-untyped-call]
    efficient_on = torch.backends.cuda.mem_efficient_sdp_enabled()  # type: ignore[no-untyped-call]
    if (flash_on and four_d and same_dim and same_dtype and attn_mask is None
            and query.dtype in FLASH_DTYPES and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM
            and (not enable_gqa or query.shape[1] % key.shape[1] == 0)):
        return "flash"
    align = 4 if query.dtype == torch.float32 else 8
    if (efficient_on and four_d and same_dim and same_dtype
            and query.dtype in (*FLASH_DTYPES, torch.float32) and head_dim % align == 0 and not enable_gqa):
        return "efficient"
    return "math"


_SDPA = torch.nn.functional.scaled_dot_product_attention


class CudaAttention(TorchFunctionMode):
    """While entered, ``scaled_dot_product_attention`` on ``meta`` runs the kernel CUDA would pick.

    The op is a composite: on ``meta`` it decomposes into the math kernel before any dispatch mode
    could see it. Two hooks catch it before that:

    - this function mode, for calls from the test's code (``F.scaled_dot_product_attention``);
    - a kernel registered on the ``AutogradMeta`` dispatch key (``torch.library``, removed on exit), for
      calls a function mode does not see: those from inside another torch function, such as
      ``nn.MultiheadAttention``'s. Under ``torch.inference_mode`` the autograd keys are skipped, so
      those nested calls keep ``meta``'s math kernel there (``Meta`` itself may not be given a kernel
      for a composite op).

    Each call is routed to ``_scaled_dot_product_flash_attention``,
    ``_scaled_dot_product_efficient_attention`` or the math kernel, each with its own autograd formula.
    Tensors on other devices are not affected.
    """

    def __init__(self, target: str = "cuda") -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self._library: Any = None
        self._target = target
        """``cuda``; ``cpu``: the kernel a CPU picks (its flash kernel), to check the tracker against the CPU."""

    def __enter__(self) -> CudaAttention:
        library = torch.library.Library("aten", "IMPL")  # type: ignore[no-untyped-call]
        library.impl("scaled_dot_product_attention", self._route, "AutogradMeta")  # type: ignore[no-untyped-call]
        self._library = library
        return super().__enter__()  # type: ignore[no-any-return, no-untyped-call]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)  # type: ignore[no-untyped-call]
        if self._library is not None:
            self._library._destroy()
            self._library = None

    def __torch_function__(self, func: Any, types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        if func is not _SDPA:
            return func(*args, **(kwargs or {}))
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = dict(zip(names, args, strict=False)) | dict(kwargs or {})
        if not isinstance(bound.get("query"), torch.Tensor) or not bound["query"].is_meta:
            return func(*args, **(kwargs or {}))
        return self._route(**bound)

    def _route(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
               scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        if self._target == "cpu" and query.dim() == 4 and not enable_gqa:
            self.calls["cpu-flash"] = self.calls.get("cpu-flash", 0) + 1
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(  # type: ignore[no-any-return]
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        kernel = attention_kernel(query, key, value, attn_mask, dropout_p, enable_gqa)
        self.calls[kernel] = self.calls.get(kernel, 0) + 1
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(  # type: ignore[no-any-return]
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if kernel == "efficient":
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # as CUDA's SDPA: an additive bias
                attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                    attn_mask.logical_not(), float("-inf"))
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(  # type: ignore[no-any-return]
                query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(  # type: ignore[no-any-return]
            query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


# ---------------------------------------------------------------------------------------- the memo

MEMO_SIZE = 65536
"""Output layouts kept by :func:`_dispatch` (op and input layouts -> output layouts)."""
_MEMO: dict[tuple[object, ...], tuple[tuple[torch.Size, tuple[int, ...], torch.dtype], ...] | None] = {}


@functools.cache
def _cacheable(func: Any) -> bool:
    """Whether an op's outputs are fresh tensors whose layouts depend on its inputs' layouts only: no
    argument is written or aliased, every return is a plain ``Tensor``, no generator is taken."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.returns:
        return False
    if any(a.alias_info is not None or "Generator" in str(a.type) for a in schema.arguments):
        return False
    return all(r.alias_info is None and str(r.type) == "Tensor" for r in schema.returns)


_SCALARS = (str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_NUMBERS = (bool, int, float)


def _flatten(values: Sequence[object], key: list[object], tensors: list[torch.Tensor]) -> bool:
    """Append each value's stand-in to ``key`` (a meta tensor by its layout, a number with its type)
    and its tensors to ``tensors``; False when a value could change an op's result beyond its layout
    (a tensor elsewhere, whose value may matter, or an object of another kind)."""
    ok = True
    for value in values:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            if value.is_meta:
                key.append((value.shape, value.stride(), value.dtype, value.storage_offset()))
            else:
                ok = False
        elif isinstance(value, _NUMBERS):
            key.append(type(value))  # 1, 1.0 and True are equal keys, and give other dtypes
            key.append(value)
        elif isinstance(value, _SCALARS):
            key.append(value)
        elif isinstance(value, (list, tuple)):
            key.append(len(value))
            ok = _flatten(value, key, tensors) and ok
        else:
            ok = False
    return ok


def _dispatch(func: Any, args: Sequence[object], kwargs: Mapping[str, object],
              tensors: list[torch.Tensor]) -> tuple[Any, bool]:
    """Run ``func`` on meta tensors, putting the tensors of its arguments in ``tensors``; an op already
    seen with inputs of the same layouts gets fresh outputs of the layouts it gave then
    (``empty_strided``), without its meta kernel. Returns the output and whether it was remembered.

    The meta kernels of most elementwise ops are Python functions (``torch._refs``) that take 0.2 to
    0.6 ms a call; a transformer repeats the same ops on the same shapes in every block, so a 7B
    forecast runs several times faster. Only ops that write and alias nothing and return fresh
    tensors are remembered, and only when their outputs' storages are exactly what ``empty_strided``
    makes, so the storages the tracker follows are the same either way. FakeTensorMode keeps a dispatch
    cache on the same principle."""
    parts: list[object] = [func]
    ok = _flatten(args, parts, tensors)
    for name in sorted(kwargs):
        parts.append(name)
        ok = _flatten((kwargs[name],), parts, tensors) and ok
    key = tuple(parts) if ok and _cacheable(func) else None
    if key is not None:
        if key in _MEMO:
            layouts = _MEMO[key]
            if layouts is None:
                key = None
            else:
                outs = tuple(torch.empty_strided(shape, stride, dtype=dtype, device=META)
                             for shape, stride, dtype in layouts)
                return (outs[0] if len(outs) == 1 else outs), True
    out = func(*args, **kwargs)
    if key is not None:
        outs = out if isinstance(out, tuple) else (out,)
        fresh = all(isinstance(o, torch.Tensor) and o.is_meta and o.storage_offset() == 0
                    and o.untyped_storage().nbytes() == _fresh_bytes(o) for o in outs)
        if len(_MEMO) >= MEMO_SIZE:
            _MEMO.clear()
        _MEMO[key] = tuple((o.shape, o.stride(), o.dtype) for o in outs) if fresh else None
    return out, False


def _fresh_bytes(t: torch.Tensor) -> int:
    """The bytes ``empty_strided`` allocates for ``t``'s shape and strides."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))) * t.element_size()


# ---------------------------------------------------------------------------------------- the tracker


class _ForecastTracker(_StorageTracker):  # type: ignore[no-untyped-call]  # untyped __init_subclass__
    """The storage tracker on ``meta``, each storage rounded to CUDA blocks and put in a category."""

    def __init__(self) -> None:
        super().__init__(META)
        self._parts = dict.fromkeys(CATEGORIES, 0)
        self._peak_parts = dict(self._parts)
        self._exact = self._exact_peak = 0
        self._kinds: dict[int, str] = {}  # storage key -> category known from the objects that hold it
        self._peak_seen = 0
        self._starting = False
        self.in_optimizer = False

    @property
    def exact_peak(self) -> int:
        with self._lock:
            return self._exact_peak

    @property
    def peak_parts(self) -> tuple[tuple[str, int], ...]:
        with self._lock:
            return tuple(self._peak_parts.items())

    def classify(self, storage: torch.UntypedStorage, category: str) -> None:
        """Put ``storage`` in ``category`` (now, and whenever it is followed later)."""
        key = storage._cdata
        with self._lock:
            self._kinds[key] = category
            ref = self._followed.get(key)
            if ref is not None and ref() is storage and ref.category != category:
                self._parts[ref.category] -= ref.nbytes
                self._parts[category] += ref.nbytes
                ref.category = category

    def _bytes(self, exact: int) -> int:
        return cuda_block_bytes(exact)

    def _count(self, ref: _StorageRef, change: int, exact_change: int, freed: bool = False) -> None:
        if not hasattr(ref, "category"):  # new: in the category its holder or the moment gives it
            ref.category = self._kinds.get(ref.key) or self._new_category()
        self._live += change
        self._exact += exact_change
        self._parts[ref.category] += change
        if freed:
            self._kinds.pop(ref.key, None)

    def _new_category(self) -> str:
        if self._starting:
            return "other"
        if self.in_optimizer or torch._C._current_graph_task_id() != -1:
            return "temporaries"
        return "activations"

    def __torch_dispatch__(self, func: Any, types: Sequence[type], args: Sequence[object] = (),
                           kwargs: Mapping[str, object] | None = None) -> Any:
        inputs: list[torch.Tensor] = []
        out, remembered = _dispatch(func, args, kwargs or {}, inputs)
        with self._lock, torch._C.DisableTorchFunctionSubclass():
            follow = self._follow_storage
            for leaf in _tensors(out):
                if leaf.is_meta:
                    follow(leaf.untyped_storage())
            # the arguments: a storage that is new here (made outside the step's reach) or, after an op that
            # may write its arguments, resized; an op answered from the memo wrote nothing
            followed = self._followed
            for leaf in inputs:
                if leaf.is_meta:
                    storage = leaf.untyped_storage()
                    if not remembered or storage._cdata not in followed:
                        follow(storage)
            if self._live > self._peak:
                self._peak = self._live
            if self._live >= self._peak_seen:
                self._peak_seen = self._live
                self._peak_parts = dict(self._parts)
            if self._exact > self._exact_peak:
                self._exact_peak = self._exact
        return out

    def _note_peak(self) -> None:
        with self._lock:
            if self._live >= self._peak_seen:
                self._peak_seen = self._live
                self._peak_parts = dict(self._parts)
            self._exact_peak = max(self._exact_peak, self._exact)

    def start(self, reach: Reach) -> int:
        """Follow the meta storages the step can reach, classified by what holds them; their rounded bytes."""
        self._classify_holders(reach.modules, reach.optimizers)
        self._starting = True
        try:
            with self._lock:
                for tensor in reach.tensors:
                    if tensor.device.type == "meta":
                        self._follow_storage(tensor.untyped_storage())
                self._peak = self._live
                start = self._live
        finally:
            self._starting = False
        self._note_peak()
        return start

    def _classify_holders(self, modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        """Parameters, their grads and optimizer state."""
        for optimizer in optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.device.type == "meta":
                        self.classify(value.untyped_storage(), "optimizer_state")
        for module in modules:
            for param in module.parameters(recurse=False):
                if param.device.type == "meta":
                    self.classify(param.untyped_storage(), "parameters")
                    if param.grad is not None:
                        self.classify(param.grad.untyped_storage(), "gradients")


def _tensors(tree: object) -> list[torch.Tensor]:
    """The tensors in nested tuples and lists (an op's outputs and arguments)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    found: list[torch.Tensor] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (tuple, list)):
            for item in node:
                if isinstance(item, torch.Tensor):
                    found.append(item)
                elif isinstance(item, (tuple, list)):
                    stack.append(item)
    return found


@dataclass
class Reach:
    """What a step can reach: its tensors, modules and optimizers."""

    tensors: list[torch.Tensor]
    modules: list[torch.nn.Module]
    optimizers: list[torch.optim.Optimizer]


_LEAVES = (type, types.ModuleType, types.CodeType, types.FrameType, str, bytes, bytearray, int, float, complex,
           bool, type(None), torch.dtype, torch.device)
_OURS = ("pytest_trainperf", "_pytest", "pytest", "pluggy")
"""Packages whose objects a step may hold (the fixture) but whose tensors are not the step's."""
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
"""What every ``nn.Module`` holds (its hooks, its parameter, buffer and submodule dicts, read directly)."""
REACH_LIMIT = 2_000_000
"""The most objects :func:`reachable` walks."""


def _code_names(code: types.CodeType) -> set[str]:
    """The global names a code object and the functions, lambdas and comprehensions inside it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def reachable(fn: object) -> Reach:
    """Every tensor, module and optimizer ``fn`` can reach: through its closure, defaults and bound
    object, the module globals its code (and the functions it names) reads, and from there through
    every container and object attribute (``gc.get_referents``).

    Not through a module's or a class's namespace as a whole, nor into this plugin's or pytest's
    objects: a tensor the step reaches only through a global its code does not name, or a class
    attribute, is not seen. What is not reachable is not the step's, whatever else is alive on
    ``meta`` (another cell's model kept in a cache), so no garbage collection or scan of the process
    is needed.
    """
    import gc

    seen: set[int] = set()
    stack: list[object] = [fn]
    reach = Reach([], [], [])
    while stack and len(seen) < REACH_LIMIT:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        kind = type(obj)
        if kind.__module__.split(".")[0] in _OURS:
            continue
        if isinstance(obj, torch.Tensor):
            reach.tensors.append(obj)
            grad = obj.grad if obj.is_leaf else None
            if grad is not None:
                reach.tensors.append(grad)
            continue
        if isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            stack.extend(obj.__defaults__ or ())
            stack.extend((obj.__kwdefaults__ or {}).values())
            names = _code_names(obj.__code__)
            stack.extend(value for name, value in obj.__globals__.items() if name in names)
            continue
        if isinstance(obj, types.MethodType):
            stack.extend((obj.__self__, obj.__func__))
            continue
        if isinstance(obj, torch.nn.Module):
            reach.modules.append(obj)
            held = vars(obj)
            stack.extend(held.get("_parameters", {}).values())
            stack.extend(held.get("_buffers", {}).values())
            stack.extend(held.get("_modules", {}).values())
            stack.extend(value for name, value in held.items() if name not in _MODULE_INTERNALS)
            continue
        if isinstance(obj, torch.optim.Optimizer):
            reach.optimizers.append(obj)
        stack.extend(gc.get_referents(obj))
    return reach


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell: the variable is not bound yet
        return False
    return True


@contextmanager
def _hooks(tracker: _ForecastTracker, modules: list[torch.nn.Module], foreach: bool = True) -> Iterator[None]:
    """Gradients and optimizer state classified as they are made."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = [p for module in modules for p in module.parameters(recurse=False)
              if p.device.type == "meta" and p.requires_grad]

    def on_grad(param: torch.Tensor) -> None:
        if param.grad is not None:
            tracker.classify(param.grad.untyped_storage(), "gradients")

    defaulted: list[dict[str, Any]] = []

    def before_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        tracker.in_optimizer = True
        for group in optimizer.param_groups:  # CUDA's default: the foreach kernels (meta's is one tensor at a time)
            if (foreach and group.get("foreach", False) is None and not group.get("fused")
                    and not group.get("differentiable")):
                group["foreach"] = True
                defaulted.append(group)

    def after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        tracker.in_optimizer = False
        while defaulted:
            defaulted.pop()["foreach"] = None
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.device.type == "meta":
                    tracker.classify(value.untyped_storage(), "optimizer_state")

    with ExitStack() as stack:
        for param in params:
            stack.callback(param.register_post_accumulate_grad_hook(on_grad).remove)  # type: ignore[no-untyped-call]
        stack.callback(register_optimizer_step_pre_hook(before_step).remove)
        stack.callback(register_optimizer_step_post_hook(after_step).remove)
        yield


def forecast_peak(fn: Callable[[], T], calls: int = 1, kernels: str = "cuda") -> tuple[T, Forecast]:
    """Call ``fn()`` ``calls`` times on ``meta`` and forecast the peak CUDA memory over those calls.

    ``kernels="cpu"`` runs the attention and optimizer kernels a CPU would pick instead (its flash
    attention, one tensor at a time): ``benchmarks/forecast.py`` checks the tracker against the CPU's
    exact peak so.
    Raises :class:`NeedsData` when the step asks for a tensor's value, naming the line.
    """
    tracker = _ForecastTracker()
    attention = CudaAttention(kernels)
    try:
        reach = reachable(fn)
        start = tracker.start(reach)
        try:
            with ExitStack() as stack:
                stack.enter_context(_hooks(tracker, reach.modules, foreach=kernels == "cuda"))
                stack.enter_context(attention)
                stack.enter_context(tracker)
                for _ in range(calls):
                    result = fn()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if not needs_data(exc):
                raise
            where = user_line(exc.__traceback__)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NeedsData(where, f"{type(exc).__name__}: {first}") from None
        finally:
            del reach
        forecast = Forecast(peak_bytes=tracker.peak_bytes, exact_bytes=tracker.exact_peak, start_bytes=start,
                            parts=tracker.peak_parts, attention=tuple(sorted(attention.calls.items())))
    finally:
        tracker.disarm()
    return result, forecast


