"""Progress of an update's noise rounds: which round and cell runs, and about how long is left.

Rounds 2 and later of ``--trainperf-update-baselines`` run after pytest's own run loop, where pytest
shows nothing (their reports are not logged). :class:`RoundsProgress` says what runs, with a time
estimate, in one of two ways chosen by the plugin:

- **live**: one line rewritten in place (``\\r``, as pytest's own "collecting ..." line) per cell, erased
  when the round ends: on a terminal with markup (not ``NO_COLOR``, not ``-q``, not ``-s``, not an
  xdist worker);
- **lines**: a full line per cell (and per round), each with the estimate: everywhere else (``-q``,
  ``NO_COLOR``, a pipe or a file, CI logs).

Either way a line per round (``trainperf: noise round 2 of 5 (12 cells)``) and a closing line stay in the
output. The estimate of a cell's round is its last round's wall time (its first round's, which also ran
the FLOP and memory steps, until a noise round ran it, scaled by how much faster than their first rounds
the cells that did run a noise round were); a round in a fresh process adds that process's
start-up, taken from the last fresh round (:data:`FRESH_START_S` until one ran). Pure: it writes through
the two callables it is given and reads the clock it is given; it imports neither pytest nor torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

FRESH_START_S = 5.0
"""The assumed start-up of a fresh process (Python, pytest, torch, collection) before one has run."""
PREFIX = "trainperf: "
"""What every progress line starts with."""


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: a time estimate, rounded to what helps."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class RoundsProgress:
    """Says which noise round and cell runs and about how long the rounds have left.

    ``rounds`` are the round numbers to run (``2..N``), ``fresh_rounds`` those among them that run in a
    fresh process, ``estimates`` each cell's seconds per round so far. ``write`` prints a full line;
    ``live`` rewrites the current line in place (None: full lines only).
    The plugin calls :meth:`round` before each round, :meth:`cell` / :meth:`cell_done` around each cell of
    an in-process round, :meth:`round_done` after each round and :meth:`finish` once.
    """

    def __init__(self, rounds: Sequence[int], total: int, estimates: Mapping[str, float],
                 write: Callable[[str], None], live: Callable[[str], None] | None = None,
                 fresh_rounds: Collection[int] = (), clock: Callable[[], float] = time.perf_counter) -> None:
        self._rounds = list(rounds)
        self._fresh_rounds = frozenset(fresh_rounds)
        self._total = total
        self._first = dict(estimates)
        self._last: dict[str, float] = {}
        self._write = write
        self._live = live
        self._clock = clock
        self._started = clock()
        self._fresh_start = FRESH_START_S
        self._round_started = self._started
        self._due: list[str] = []
        self._number = 0
        self._fresh = False
        self._index = 0
        self._shown = False

    def left(self, number: int, due: Sequence[str], done: int = 0, fresh: bool = False) -> float:
        """Seconds the rounds have left from round ``number`` on (``done`` of its cells ``due`` finished),
        assuming the same cells are due in every later round."""
        this = sum(self.estimate(n) for n in due[done:])
        if fresh and done == 0:
            this += self._fresh_start
        later = [r for r in self._rounds if r > number]
        per_round = sum(self.estimate(n) for n in due)
        return this + sum(per_round + (self._fresh_start if r in self._fresh_rounds else 0.0) for r in later)

    def estimate(self, nodeid: str) -> float:
        """Seconds one more round of ``nodeid`` should take."""
        if nodeid in self._last:
            return self._last[nodeid]
        seen = [n for n in self._last if self._first.get(n, 0.0) > 0]
        ratio = sum(self._last[n] for n in seen) / sum(self._first[n] for n in seen) if seen else 1.0
        return self._first.get(nodeid, 0.0) * ratio

    def round(self, number: int, due: Sequence[str], fresh: bool) -> None:
        """Round ``number`` starts on the cells ``due``."""
        self._number, self._due, self._fresh, self._index = number, list(due), fresh, 0
        self._round_started = self._clock()
        n = len(due)
        self._write(f"{PREFIX}noise round {number} of {self._total} ({n} cell{'s' * (n != 1)}"
                    f"{', in a fresh process' if fresh else ''})")
        if fresh:  # one process measures them all: no per-cell progress, the round's estimate instead
            left = duration(self.left(number, due, fresh=True))
            self._say(f"{PREFIX}  round {number} of {self._total}, about {left} left: "
                      f"{n} cell{'s' * (n != 1)} in a fresh process")

    def cell(self, nodeid: str) -> None:
        """A cell of the current (in-process) round starts."""
        self._index += 1
        left = self.left(self._number, self._due, self._index - 1)
        self._say(f"{PREFIX}  round {self._number} of {self._total}, cell {self._index} of {len(self._due)}, "
                  f"about {duration(left)} left: {nodeid}")

    def cell_done(self, nodeid: str, seconds: float) -> None:
        """A cell of the current round took ``seconds``: the estimate of its next round."""
        self._last[nodeid] = seconds

    def round_done(self) -> None:
        """The current round ended (a fresh round: its start-up is learned from its wall time)."""
        if self._fresh:
            spent = self._clock() - self._round_started
            self._fresh_start = max(0.0, spent - sum(self.estimate(n) for n in self._due))
        self._erase()

    def finish(self) -> None:
        """Every round ran (or the rounds stopped): the closing line."""
        self._erase()
        if self._number:
            self._write(f"{PREFIX}noise rounds done in {duration(self._clock() - self._started)}")

    def _say(self, line: str) -> None:
        if self._live is None:
            self._write(line)
        else:
            self._live(line)
            self._shown = True

    def _erase(self) -> None:
        if self._live is not None and self._shown:
            self._live("")
            self._shown = False
