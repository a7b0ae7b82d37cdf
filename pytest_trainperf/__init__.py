"""pytest-trainperf: performance-regression testing of model training and inference.

The public face: ``grid``, ``tolerance``, ``memory_budget``, ``relative``, ``scaling``, ``TrainPerf`` (the
type of the ``trainperf`` fixture) and ``__version__``. Importing this package does not import torch.
"""

from __future__ import annotations

from pytest_trainperf.fixture import TrainPerf
from pytest_trainperf.grid import GridError, grid, memory_budget, relative, scaling, tolerance
from pytest_trainperf.records import Measurement

__version__ = "0.1.0"

__all__ = ["GridError", "Measurement", "TrainPerf", "__version__", "grid", "memory_budget", "relative", "scaling",
           "tolerance"]
