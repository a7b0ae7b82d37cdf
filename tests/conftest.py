from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

pytest_plugins = ["pytester"]

# CI runs the same hypothesis examples every time (HYPOTHESIS_PROFILE=ci in .ci/run), so a landing
# does not hang on a lucky draw; local runs stay random and keep looking for new counterexamples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _keep_library_modules(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep torch (and what it imports lazily) loaded across pytester's in-process runs.

    pytester restores ``sys.modules`` after every in-process run, dropping each module first imported
    during it; torch and its C extensions cannot be imported twice in one process. Modules of the
    test files pytester writes (under the base temp dir) are still dropped, as pytester intends.
    """
    from _pytest import pytester

    base = str(tmp_path_factory.getbasetemp())
    original = pytester.SysModulesSnapshot.__init__

    def written_by_test(name: str) -> bool:
        module = sys.modules.get(name)
        return str(Path(getattr(module, "__file__", None) or base)).startswith(base)

    def init(self: pytester.SysModulesSnapshot, preserve: Callable[[str], bool] | None = None) -> None:
        original(self, preserve=lambda name: not written_by_test(name) or bool(preserve and preserve(name)))

    monkeypatch.setattr(pytester.SysModulesSnapshot, "__init__", init)
