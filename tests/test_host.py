"""The allocator fix: applied on glibc, a no-op elsewhere, reported in the fingerprint."""

from __future__ import annotations

import platform
import sys

import pytest

from pytest_trainperf.measure.host import FIXED, SYSTEM, fix_malloc
from pytest_trainperf.records import Fingerprint

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds exist on glibc only")
def test_fix_malloc_applies_on_glibc() -> None:
    assert fix_malloc() == FIXED
    assert fix_malloc() == FIXED  # idempotent


@pytest.mark.skipif(GLIBC, reason="this machine has glibc")
def test_fix_malloc_leaves_other_libcs_alone() -> None:
    assert fix_malloc() == SYSTEM


def test_the_mode_is_part_of_the_environment_key() -> None:
    base = dict(device="AMD EPYC", device_type="cpu", torch="2.13.0", cuda=None, threads=1, cpu="AMD EPYC")
    fixed = Fingerprint(**base, malloc=FIXED)
    system = Fingerprint(**base, malloc=SYSTEM)
    assert fixed.key != system.key
    assert fixed.key.endswith("| malloc glibc-fixed")
