from __future__ import annotations

import gc
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _pytest import pytester as _pytester
from hypothesis import settings

pytest_plugins = ["pytester"]

# CI runs the same hypothesis examples every time (HYPOTHESIS_PROFILE=ci in .ci/run), so a landing
# does not hang on a lucky draw; local runs stay random and keep looking for new counterexamples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The fixture below wraps pytester's private SysModulesSnapshot(preserve=...), which pytest 8 and 9 have
# (pyproject.toml's test extra pins that range). Say so plainly if a pytest changes it, rather than fail
# every pytester test with torch's "cannot import twice" errors.
if "preserve" not in inspect.signature(_pytester.SysModulesSnapshot.__init__).parameters:  # pragma: no cover
    raise RuntimeError(f"tests/conftest.py: pytest {pytest.__version__}'s pytester.SysModulesSnapshot takes no "
                       "`preserve` argument any more; expected pytest 8 or 9 (the test extra's pin)")


def written_by_test(name: str, base: str) -> bool:
    """Whether module ``name`` comes from a file under ``base`` (the files pytester's tests write).
    A module with no file (a C extension's submodule such as ``torch._C._dynamo``) is not."""
    file = getattr(sys.modules.get(name), "__file__", None)
    return file is not None and str(Path(file)).startswith(base)


@pytest.fixture(autouse=True)
def _keep_library_modules(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep torch (and what it imports lazily) loaded across pytester's in-process runs.

    pytester restores ``sys.modules`` after every in-process run, dropping each module first imported
    during it; torch and its C extensions cannot be imported twice in one process. Modules of the
    test files pytester writes (under the base temp dir) are still dropped, as pytester intends.
    """
    base = str(tmp_path_factory.getbasetemp())
    original = _pytester.SysModulesSnapshot.__init__

    def init(self: _pytester.SysModulesSnapshot, preserve: Callable[[str], bool] | None = None) -> None:
        original(self, preserve=lambda name: not written_by_test(name, base) or bool(preserve and preserve(name)))

    monkeypatch.setattr(_pytester.SysModulesSnapshot, "__init__", init)


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sessions pytester runs are not pytest-xdist workers, even when this suite runs on them
    (``-n 2``, the README's test command): without this, the plugin in an inner session would read the
    outer worker's ``PYTEST_XDIST_WORKER`` (``gw1``) as its own and, e.g., pick that worker's device."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_is_alive() -> None:
    """Move what is alive when a test module starts (torch, scipy, hypothesis, earlier modules' state)
    into the collector's permanent generation: every cell of the sessions pytester runs in this process
    collects garbage and scans the live objects for tensors, and each of those then walks only what was
    made since (here, a few hundred thousand objects fewer). A tensor alive at that point is not seen
    by the peak memory's snapshot of live tensors; the tests make theirs after it."""
    import torch  # noqa: F401  (every module's sessions load it: frozen with the rest from the first one on)

    gc.collect()
    gc.freeze()
