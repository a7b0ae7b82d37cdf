"""Makes ``_models`` (what the examples share) importable under any ``--import-mode``: pytest's
default mode puts this directory on ``sys.path`` by itself, ``importlib`` mode does not."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
