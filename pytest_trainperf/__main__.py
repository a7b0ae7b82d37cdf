"""``python -m pytest_trainperf``: see :mod:`pytest_trainperf.cli`."""

from __future__ import annotations

from pytest_trainperf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
