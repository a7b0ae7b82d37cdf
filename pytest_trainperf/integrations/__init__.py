"""Framework callbacks that measure a framework's own training loop, one module per framework:

- :mod:`.huggingface`: a ``transformers.TrainerCallback`` for the Hugging Face ``Trainer``;
- :mod:`.lightning`: a ``lightning.pytorch.Callback`` for Lightning's ``Trainer.fit``.

Each drives ``trainperf.step`` (:meth:`pytest_trainperf.fixture.TrainPerf.step`) from the framework's
hooks, in the thread that runs the steps: the FLOP counter and the memory tracker see the step as it
runs there. Nothing here is imported at plugin load; a module is imported when its callback is asked
for (``trainperf.hf_callback(...)``, ``trainperf.lightning_callback(...)``), and needs its framework.
"""

from __future__ import annotations

MISSING = ("trainperf.{call}: the {framework} integration needs {package} installed "
           "(pip install 'pytest-trainperf[frameworks]'): {error}")
"""The failure when a framework's callback is asked for and the framework is not installed."""
