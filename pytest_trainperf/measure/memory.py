"""Peak memory of one call of a training step.

:func:`measure_peak` runs the step once and returns its result with a :class:`MemoryPeak`.

CUDA devices use the caching allocator's own counters (``max_memory_allocated``), which see every
allocation made through the allocator on that device, kernel workspaces included. Right before the
step (after collecting garbage, synchronizing and emptying the allocator's cache) the bytes still
allocated by what was alive before the test began are the *baseline*: the smaller of the bytes
allocated when the test began (after a garbage collection) and the bytes allocated now (what was
freed since cannot still be counted). ``peak_memory`` is ``max_memory_allocated - baseline`` and
``reserved_memory`` is ``max_memory_reserved - baseline``: one basis, so ``reserved >= peak``.

Every other device (CPU above all) has no such counters, so the step runs under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that follows tensor *storages*:

- At entry, after ``gc.collect()``, every ``torch.Tensor`` the garbage collector knows of (tensors,
  ``nn.Parameter``, buffers, optimizer state, tensors held by closures and frames) and the ``.grad``
  of every leaf (a grad has no Python object until first read, so it is read here) contributes its
  storage once, deduplicated by storage identity, so views and aliases are not counted twice. That
  sum is ``start_bytes``.
- During the call, after every aten op that reaches the dispatcher (forward, backward, which runs on
  the calling thread for CPU graphs, and optimizer ops alike), every tensor among the op's outputs
  and arguments whose storage is not yet followed is added with its ``nbytes()``; a followed
  storage whose size changed (``resize_``, ``out=`` resizing) is re-read. The running total is
  compared with the peak after each op.
- A weak reference on each followed storage subtracts its bytes the moment the storage is freed
  (``del``, ``zero_grad(set_to_none=True)``, the autograd graph dropping saved tensors). The tracker
  holds only weak references and integers, so it keeps nothing alive, and its callbacks are
  disarmed before :func:`measure_peak` returns.

So ``peak_bytes`` is exactly the largest sum of live followed storage bytes seen at an op boundary.
What it does not count, or counts late:

- buffers an aten kernel allocates and frees inside itself (workspaces, the old buffer of a growing
  ``resize_``) and allocations made by libraries below aten (oneDNN, BLAS scratch, the allocator's
  alignment and bookkeeping): the figure is tensor bytes, not process RSS;
- allocations that bypass the dispatcher (``torch.frombuffer``, ``torch.UntypedStorage(n)``,
  ``storage.resize_()``, ``torch.load``'s storages, tensors made by C++ extensions) are counted only
  from the first op that takes or returns them; ``torch.from_numpy`` and ``torch.tensor`` go through
  ``aten.lift_fresh``, so they count from their creation, even when the numpy memory existed before
  the step;
- storages held only by C++ at entry (saved tensors of an autograd graph built before the step,
  TorchScript attributes never read from Python) are missing from ``start_bytes`` and counted from
  the first op that touches them;
- ops run inside a tensor subclass's own ``__torch_dispatch__`` (below this mode), storages of
  sparse and opaque (mkldnn) layouts, wrapper subclasses without real storage, meta and fake
  tensors, and tensors on other devices;
- ops run by other threads (the mode is thread-local), although frees on other threads are seen.

**Storages received from other processes** (the batches of a ``DataLoader`` with ``num_workers > 0``,
anything passed through a ``torch.multiprocessing`` queue) live in shared memory, and the process
rebuilds each as a tensor with ``aten.set_`` the moment it *receives* it. How many batches the
workers have prefetched, and so how many the loader has received but not yet handed out, depends on
the scheduling of the worker processes, not on the code under test. So a shared-memory storage not
followed yet is neither counted at entry nor by the ``aten.set_`` that wraps it: it counts from the
first other op that takes or returns it (the step using its batch), and a batch the loader only
holds in its prefetch buffer is never counted. The peak of a step that takes its batch from a
``DataLoader`` is then the same whatever the workers prefetched. The same rule applies to any
shared-memory storage (``tensor.share_memory_()``, ``model.share_memory()``): it counts from its first
use in the step, not from entry.

Running under the mode costs a Python call per aten op: expect a small eager step to run several
times slower, which is why timing and memory are never measured in the same call.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

METHOD_STORAGE_TRACKER = "storage-tracker"
"""``MemoryPeak.method`` on CPU and every other non-CUDA device."""

METHOD_CUDA_ALLOCATOR = "cuda-caching-allocator"
"""``MemoryPeak.method`` on CUDA devices."""

_CUDA = "cuda"
"""The device type measured through the caching allocator's counters."""

_RECEIVE_OP = torch.ops.aten.set_
"""The op that wraps a storage received from another process in a tensor (``_rebuild_tensor``): it
does not count a shared-memory storage."""

_NO_STORAGE_ERRORS = (NotImplementedError, RuntimeError)
"""Raised by ``untyped_storage()`` (sparse, mkldnn) or ``data_ptr()`` (wrapper subclasses)."""

T = TypeVar("T")


@dataclass(frozen=True)
class MemoryPeak:
    """The memory one call of a step used on its device."""

    peak_bytes: int
    """The peak of live bytes during the call, including ``start_bytes``: the figure to gate on."""
    reserved_bytes: int | None
    """CUDA: ``max_memory_reserved`` during the call (allocator cache included); ``None`` elsewhere."""
    start_bytes: int
    """Live bytes on the device when the call started (parameters, optimizer state, inputs...)."""
    method: str
    """How the bytes were counted: :data:`METHOD_STORAGE_TRACKER` or :data:`METHOD_CUDA_ALLOCATOR`."""
    baseline_bytes: int = 0
    """CUDA: bytes allocated right before the call by what was alive before the test began, subtracted
    from the allocator's peaks (0 elsewhere: those storages are left out one by one)."""


class Preexisting:
    """What was alive before a test started, left out of its peak.

    A test's peak should not depend on which other tests ran before it in the same process (module
    globals, tensors still held by an earlier test): storages alive when this snapshot is taken are
    not counted (weak references: a later storage at a reused address is counted). On CUDA the
    allocated bytes at snapshot time (after a garbage collection, so that an earlier test's garbage is
    not taken for live memory) bound what is subtracted instead.

    Elsewhere no garbage collection runs here (it cost 70 ms a cell with torch loaded, for nothing): an
    earlier test's garbage that holds a storage is left out like any other storage alive now, and is
    gone (its weak reference dead) by the time the step runs, after :func:`measure_peak`'s collection.
    """

    def __init__(self, device: torch.device) -> None:
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self.cuda_bytes = 0
        """Bytes allocated on the CUDA device at snapshot time (0 elsewhere)."""
        if device.type == _CUDA:
            gc.collect()
            self.cuda_bytes = torch.cuda.memory_allocated(device)
            return
        for storage in _live_storages(device):
            self._refs[storage._cdata] = weakref.ref(storage)

    def __contains__(self, storage: torch.UntypedStorage) -> bool:
        ref = self._refs.get(storage._cdata)
        return ref is not None and ref() is storage


def _live_storages(device: torch.device) -> list[torch.UntypedStorage]:
    """Every storage on ``device`` reachable from a Python tensor (and the grads of leaves)."""
    found: dict[int, torch.UntypedStorage] = {}
    objects = gc.get_objects()
    try:
        # type(), not isinstance(): some module proxies warn on __class__ lookups. The filter runs in
        # C (map, compress) over the few hundred thousand objects of a session with torch loaded.
        kinds = {kind for kind in set(map(type, objects)) if issubclass(kind, torch.Tensor)}
        tensors = list(itertools.compress(objects, map(kinds.__contains__, map(type, objects))))
    finally:
        del objects
    try:
        with torch._C.DisableTorchFunctionSubclass():
            for obj in tensors:
                for tensor in (obj, _grad_of(obj)):
                    storage = _storage_on(tensor, device)
                    if storage is not None:
                        found[storage._cdata] = storage
    finally:
        del tensors
    return list(found.values())


def _grad_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The grad of a leaf or grad-retaining tensor (reading it elsewhere warns), else None."""
    try:
        if not (tensor.is_leaf or tensor.retains_grad):
            return None
        return tensor.grad
    except _NO_STORAGE_ERRORS:
        return None


def _storage_on(tensor: torch.Tensor | None, device: torch.device) -> torch.UntypedStorage | None:
    """The tensor's storage if it has a real one on ``device``."""
    if tensor is None:
        return None
    try:
        storage = tensor.untyped_storage()
        if not _same_device(storage.device, device):
            return None
        storage.data_ptr()  # raises for the storage-less storage of a wrapper subclass
    except _NO_STORAGE_ERRORS:
        return None
    return storage


def measure_peak(fn: Callable[[], T], device: torch.device,
                 exclude: Preexisting | None = None) -> tuple[T, MemoryPeak]:
    """Run fn() once and return its result and the peak memory of that call.

    Storages in ``exclude`` (alive before the test began) are not counted. An exception from ``fn``
    propagates, with every piece of global state restored.
    """
    with peak_of(device, exclude) as found:
        result = fn()
    assert found.peak is not None
    return result, found.peak


@dataclass
class FoundPeak:
    """What :func:`peak_of` measured: set when its block exits."""

    peak: MemoryPeak | None = None
    """The peak memory of the block (None until it exited)."""


@contextlib.contextmanager
def peak_of(device: torch.device, exclude: Preexisting | None = None) -> Iterator[FoundPeak]:
    """The peak memory of the block, as :func:`measure_peak` measures a call: for a step that is a
    loop's body (``trainperf.step``), not a function. An exception from the block propagates, with
    every piece of global state restored."""
    found = FoundPeak()
    if device.type == _CUDA:
        outside = exclude.cuda_bytes if exclude is not None else 0
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        baseline = min(outside, start)
        yield found
        torch.cuda.synchronize(device)
        found.peak = MemoryPeak(
            peak_bytes=torch.cuda.max_memory_allocated(device) - baseline,
            reserved_bytes=torch.cuda.max_memory_reserved(device) - baseline,
            start_bytes=start - baseline,
            method=METHOD_CUDA_ALLOCATOR,
            baseline_bytes=baseline,
        )
        return
    tracker = _StorageTracker(device, exclude)
    try:
        gc.collect()
        start = tracker.scan_live()
        with tracker:
            yield found
        found.peak = MemoryPeak(peak_bytes=tracker.peak_bytes, reserved_bytes=None, start_bytes=start,
                                method=METHOD_STORAGE_TRACKER)
    finally:
        tracker.disarm()


CPU_ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
"""How the CPU allocator's failure reads (Linux, Windows): a ``RuntimeError``, not ``OutOfMemoryError``."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (CUDA and other accelerators), the CPU allocator's failure
    and Python's ``MemoryError``."""
    # torch.OutOfMemoryError since torch 2.5; torch.cuda.OutOfMemoryError (the same class there) before
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, (oom, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in CPU_ALLOCATOR_FAILURES)


def recover(device: torch.device) -> None:
    """After an out-of-memory error, once its exception and frames are gone: collect garbage and, on
    CUDA, return the allocator's cache and reset its peak counters, so the next cell starts clean."""
    gc.collect()
    if device.type == _CUDA:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocator_pressure(device: torch.device) -> tuple[int, int]:
    """CUDA: the caching allocator's ``num_alloc_retries`` and ``num_ooms`` so far (cache flushes and
    out-of-memory errors it recovered from: a step near the memory limit); ``(0, 0)`` elsewhere."""
    if device.type != _CUDA:
        return 0, 0
    stats = torch.cuda.memory_stats(device)
    return int(stats.get("num_alloc_retries", 0)), int(stats.get("num_ooms", 0))


class _StorageRef(weakref.ref[torch.UntypedStorage]):
    """A weak reference to a followed storage, carrying its key and its last known size."""

    __slots__ = ("category", "exact", "key", "nbytes")

    key: int
    """The storage's identity (``_cdata``, the address of its ``StorageImpl``)."""
    nbytes: int
    """What it counts, as of when last seen (its size; rounded in a forecast), subtracted when it is freed."""
    exact: int
    """Its size when last seen."""
    category: str
    """A forecast's part of the peak it belongs to (unset elsewhere)."""

    def __new__(
        cls,
        storage: torch.UntypedStorage,
        callback: Callable[[_StorageRef], object],
        key: int,
        nbytes: int,
    ) -> _StorageRef:
        return super().__new__(cls, storage, callback)

    def __init__(
        self,
        storage: torch.UntypedStorage,
        callback: Callable[[_StorageRef], object],
        key: int,
        nbytes: int,
    ) -> None:
        # weakref.ref.__init__ only re-parses (storage, callback), which __new__ already took.
        self.key = key
        self.nbytes = nbytes


class _StorageTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped __init_subclass__
    """Sums the bytes of live storages on one device and keeps the running peak.

    Holds weak references and integers only; all counters are guarded by one re-entrant lock, because
    a free can call back on another thread, or on this one in the middle of an update.
    """

    def __init__(self, device: torch.device, exclude: Preexisting | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._device = device
        self._exclude = exclude
        self._lock = threading.RLock()
        self._followed: dict[int, _StorageRef] = {}
        self._armed = True
        self._live = 0
        self._peak = 0

    @property
    def peak_bytes(self) -> int:
        """The largest live total seen so far."""
        with self._lock:
            return self._peak

    def scan_live(self) -> int:
        """Follow every storage on the device reachable from a Python tensor; return their bytes."""
        for storage in _live_storages(self._device):
            if not storage.is_shared():  # received, prefetched batches count from their first use
                self._follow_storage(storage)
        with self._lock:
            self._peak = self._live
            return self._live

    def disarm(self) -> None:
        """Stop counting frees and drop every weak reference, so no callback runs afterwards."""
        with self._lock:
            self._armed = False
            self._followed.clear()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Sequence[type],
        args: Sequence[object] = (),
        kwargs: Mapping[str, object] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten((out, args, kwargs))
        received = func.overloadpacket is _RECEIVE_OP
        with self._lock, torch._C.DisableTorchFunctionSubclass():
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    self._follow(leaf, received)
            if self._live > self._peak:
                self._peak = self._live
        return out

    def _follow(self, tensor: torch.Tensor, received: bool = False) -> None:
        """Start following the tensor's storage, or re-read its size if already followed; but not
        start following a shared-memory storage that an op ``received`` (``aten.set_``) wraps."""
        storage = _storage_on(tensor, self._device)
        if storage is None:
            return
        if received and storage.is_shared():
            ref = self._followed.get(storage._cdata)
            if ref is None or ref() is not storage:
                return
        self._follow_storage(storage)

    def _follow_storage(self, storage: torch.UntypedStorage) -> None:
        if self._exclude is not None and storage in self._exclude:
            return
        key = storage._cdata
        exact = storage.nbytes()
        with self._lock:
            ref = self._followed.get(key)
            if ref is not None and ref() is storage:
                if ref.exact != exact:
                    nbytes = self._bytes(exact)
                    self._count(ref, nbytes - ref.nbytes, exact - ref.exact)
                    ref.nbytes, ref.exact = nbytes, exact
                return
            if ref is not None:
                # A dead storage whose callback has not run yet shares the address: settle it now.
                self._on_free(ref)
            ref = _StorageRef(storage, self._on_free, key, self._bytes(exact))
            ref.exact = exact
            self._followed[key] = ref
            self._count(ref, ref.nbytes, exact)

    def _bytes(self, exact: int) -> int:
        """What a storage of ``exact`` bytes counts: those bytes (a forecast rounds them to the CUDA
        allocator's blocks)."""
        return exact

    def _count(self, ref: _StorageRef, change: int, exact_change: int, freed: bool = False) -> None:
        """A followed storage was added, resized or (``freed``) dropped: its counted bytes changed by
        ``change`` (its own bytes by ``exact_change``). Called under the lock."""
        self._live += change

    def _on_free(self, ref: _StorageRef) -> None:
        """Weak-reference callback: a followed storage was freed."""
        with self._lock:
            if not self._armed or self._followed.get(ref.key) is not ref:
                return
            del self._followed[ref.key]
            self._count(ref, -ref.nbytes, -ref.exact, freed=True)


def _same_device(storage_device: torch.device, device: torch.device) -> bool:
    """Whether a storage's device is the measured one; an index-less device matches every index."""
    return storage_device.type == device.type and device.index in (None, storage_device.index)
