"""pytest-trainperf: performance-regression testing of model training and inference.

The public face: ``grid``, ``ranks``, ``tolerance``, ``memory_budget``, ``forecast``, ``relative``, ``scaling``,
``TrainPerf`` (the
type of the ``trainperf`` fixture), ``Measurement``, ``GridError`` and ``__version__``. ``TrainPerf`` is
imported when first used (PEP 562), so importing the package, or one of its pure modules
(``pytest_trainperf.stats``, ``.store``, ``.records``, ...), loads neither pytest nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# the decorators are imported now: the submodule ``pytest_trainperf.grid`` would otherwise stand where
# the function ``grid`` belongs once anything imported it (grid.py loads neither pytest nor torch)
from pytest_trainperf.grid import GridError, forecast, grid, memory_budget, ranks, relative, scaling, tolerance
from pytest_trainperf.records import Measurement

if TYPE_CHECKING:
    from pytest_trainperf.fixture import TrainPerf

__version__ = "0.1.0"

_LAZY = {"TrainPerf": "pytest_trainperf.fixture"}
"""The public names imported when first used (the fixture's module imports pytest), and their modules."""

__all__ = ["GridError", "Measurement", "TrainPerf", "__version__", "forecast", "grid", "memory_budget", "ranks",
           "relative",
           "scaling", "tolerance"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_trainperf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
