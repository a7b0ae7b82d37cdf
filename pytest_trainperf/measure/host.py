"""The host process's memory allocator: fixed glibc thresholds so CPU step times stop drifting.

glibc's ``malloc`` serves large blocks (a tensor's storage, from 128 KiB up) with ``mmap`` and hands
them back to the OS on free, unless its *dynamic* thresholds have been raised by what the process
freed before. Whether a training step page-faults on every activation therefore depends on the
process's allocation history, not on the code under test: the same CPU step runs at one speed in one
pytest process and up to 2x slower in the next. Measured on a 2-core runner, a small CNN training
cell's median step time ranged over 16-23 ms across 6 processes with glibc's defaults, and over
10.6-12.5 ms with the thresholds fixed here (another cell: 13.6-18.2 ms against 9.1-9.9 ms).

:func:`fix_malloc` sets ``M_MMAP_THRESHOLD`` (which also turns the dynamic adjustment off),
``M_TRIM_THRESHOLD`` and ``M_TOP_PAD`` through ``mallopt``, once per session, before any test module is
imported. The price is memory the process keeps instead of returning (up to the trim threshold);
tensor-storage peak memory, which is what the plugin reports, is not affected. On other C libraries
(macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import platform
import sys

MMAP_THRESHOLD = 256 << 20
"""Blocks below 256 MiB come from the heap, whatever the process freed before."""
TRIM_THRESHOLD = 1 << 30
"""Up to 1 GiB of free heap top is kept rather than returned (and faulted in again next step)."""
TOP_PAD = 64 << 20
"""Heap growth in 64 MiB steps."""
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
"""``mallopt`` parameter numbers from glibc's ``malloc.h``."""

FIXED = "glibc-fixed"
"""The mode when the thresholds were fixed."""
SYSTEM = "system"
"""The mode when the allocator was left as it is."""


def fix_malloc() -> str:
    """Fix glibc's malloc thresholds for this process; return :data:`FIXED`, or :data:`SYSTEM` where
    the C library is not glibc or refuses."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return SYSTEM
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return SYSTEM
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    ok = all(mallopt(param, value) == 1 for param, value in settings)
    return FIXED if ok else SYSTEM
