from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


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
