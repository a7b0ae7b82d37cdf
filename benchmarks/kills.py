"""What an interrupted session leaves: SIGKILL and Ctrl-C (SIGINT) at random moments of updates (in
process, isolated, spread over xdist workers) and of a lockstep comparison, then the files, the
children and the temporary directories are checked.

A temporary git repository holds a suite of two test files (a grid of 6 small training cells, and a
test of 4 record-only cells; 3 rounds an update, the third in a fresh process), its baselines made by
one complete update and committed. Each trial
starts one pytest process with its own ``TMPDIR``, waits a random time drawn uniformly over the
duration of an uninterrupted run of that kind, and sends the signal (SIGINT: a second SIGINT 2 s later
if it still runs, as an impatient user would). Then:

* **files damaged**: every file in ``baselines/`` must be read by the store without error;
* **cells lost**: every cell of the committed baselines must still be in the files;
* **temp files in baselines/**: partial writes (``.*.trainperf-tmp-*``) left after the *next* run;
* **children alive**: the session's child processes (isolated cells, lockstep workers, xdist workers)
  still alive 10 s after it died;
* **left in the temp directory**: ``trainperf-*`` directories and registered git worktrees that remain
  after the next measured session (which sweeps them).

Writes a section of ``docs/performance.md``.

    python benchmarks/kills.py --trials 10     # per kind of run; about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verdicts  # noqa: E402  (write_doc: one section of a document between markers)

from pytest_trainperf import store  # noqa: E402

BEGIN, END = "<!-- kills:begin -->", "<!-- kills:end -->"
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
TRAIN = '''
import torch
from torch import nn
import pytest_trainperf as tp


@tp.grid(width=[8, 16, 32], depth=[1, 2])
@tp.tolerance(step_time=10.0)
def test_train(trainperf, width, depth):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(16, width)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    trainperf.train(step, steps=20, warmup=2)
'''
RECORD = '''
import pytest_trainperf as tp


@tp.grid(k=[1, 2, 3, 4])
def test_record(trainperf, k):
    trainperf.record("accuracy", 0.5 + k / 100)
'''
KINDS: dict[str, list[str]] = {
    "update": ["--trainperf-update-baselines"],
    "update --trainperf-isolate": ["--trainperf-update-baselines", "--trainperf-isolate"],
    "update -n 2": ["--trainperf-update-baselines", "-n", "2"],
    "--trainperf-against=HEAD": ["--trainperf-against=HEAD"],
}
SIGNALS = {"SIGKILL": signal.SIGKILL, "Ctrl-C": signal.SIGINT}
GRACE_S = 10.0


@dataclass
class Tally:
    trials: int = 0
    damaged: int = 0
    lost: int = 0
    children: int = 0
    tmp_in_baselines: int = 0
    problems: list[str] = field(default_factory=list)


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=where, check=True, capture_output=True, text=True).stdout.strip()


def pytest(where: Path, args: Sequence[str], tmp: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=where,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=ctrl_c)


def ctrl_c() -> None:
    """In the child: SIGINT raises KeyboardInterrupt, as at a terminal. A process started in the
    background by a shell without job control (``nohup ... &``) inherits SIGINT ignored, and Python
    then installs no handler: a Ctrl-C trial would measure nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cells_in(baselines: Path) -> set[tuple[str, str, str]] | str:
    """Every (file, test, cell) of the baseline files; the error text when a file cannot be read."""
    found: set[tuple[str, str, str]] = set()
    for path in sorted(baselines.rglob("*.json")):
        try:
            parsed = store.read(path)
        except store.BaselineError as exc:
            return str(exc)
        for env in parsed.environments.values():
            found |= {(path.name, test, cell) for test, cell in env.cells}
    return found


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def trial(where: Path, args: Sequence[str], tmp: Path, sig: signal.Signals, after: float,
          committed: set[tuple[str, str, str]], tally: Tally) -> None:
    proc = pytest(where, args, tmp)
    children: list[psutil.Process] = []
    deadline = time.monotonic() + after
    while time.monotonic() < deadline and proc.poll() is None:
        children = descendants(proc.pid) or children
        time.sleep(0.02)
    children = descendants(proc.pid) or children
    if proc.poll() is None:
        proc.send_signal(sig)
        if sig == signal.SIGINT:
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tally.problems.append(f"{' '.join(args)}: did not end within 60 s of {sig.name}")
    _, alive = psutil.wait_procs(children, timeout=GRACE_S)
    tally.trials += 1
    tally.children += len(alive)
    for p in alive:
        p.kill()
    found = cells_in(where / "baselines")
    if isinstance(found, str):
        tally.damaged += 1
        tally.problems.append(found)
        git(where, "checkout", "--", "baselines")
        return
    tally.lost += len(committed - found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per kind of run and signal (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    where = Path(tempfile.mkdtemp(prefix="trainperf-bench-kills-"))
    tmp = where.parent / f"{where.name}-tmp"
    tmp.mkdir()
    try:
        (where / "test_train.py").write_text(TRAIN)
        (where / "test_record.py").write_text(RECORD)
        (where / "pytest.ini").write_text("[pytest]\ntrainperf_threads = 1\ntrainperf_pairs = 10\ntrainperf_rounds = 3\n")
        (where / ".gitignore").write_text("__pycache__/\n.*.trainperf-tmp-*\n")
        git(where, "init", "-q", "-b", "main")
        git(where, "config", "user.email", "bench@example.com")
        git(where, "config", "user.name", "bench")
        if pytest(where, KINDS["update"], tmp).wait() != 0:
            raise SystemExit("the first update failed")
        git(where, "add", "-A")
        git(where, "commit", "-qm", "suite and baselines")
        committed = cells_in(where / "baselines")
        assert isinstance(committed, set) and len(committed) == 10, committed
        rows = []
        for kind, extra in KINDS.items():
            started = time.monotonic()
            if pytest(where, extra, tmp).wait() not in (0, 1):
                raise SystemExit(f"an uninterrupted {kind} run failed")
            duration = time.monotonic() - started
            for name, sig in SIGNALS.items():
                tally = Tally()
                for _ in range(args.trials):
                    trial(where, extra, tmp, sig, rng.uniform(0.0, duration), committed, tally)
                pytest(where, KINDS["update"], tmp).wait()  # the next run: it sweeps what was left
                stray = list((where / "baselines").glob(".*trainperf-tmp*"))
                tally.tmp_in_baselines = len(stray)
                left = [p.name for p in tmp.iterdir() if p.name.startswith("trainperf-")]
                trees = git(where, "worktree", "list", "--porcelain").count("worktree ") - 1
                rows.append(f"| `{kind}` | {name} | {tally.trials} | {duration:.0f} | {tally.damaged} | "
                            f"{tally.lost} | {tally.children} | {tally.tmp_in_baselines} | {len(left)} + {trees} |")
                print(rows[-1], *tally.problems, sep="\n", flush=True)
                git(where, "checkout", "--", "baselines")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        section = "\n".join([
            BEGIN,
            "## Interrupted sessions (`benchmarks/kills.py`)",
            "",
            f"A suite of 10 cells (6 training, 4 record-only) with committed baselines; each trial interrupts one "
            f"run at a moment drawn uniformly over an uninterrupted run's duration (seed {args.seed}; "
            f"{os.cpu_count()} cores, load average {load:.1f} at the end). *Damaged*: baseline files the store "
            "then refuses. *Lost*: committed cells missing from the files. *Children alive*: the session's child "
            "processes still running 10 s after it died. *Left*: `trainperf-*` temporary directories + "
            "registered git worktrees remaining after the next update (which sweeps what a killed session left). "
            "*Partial files*: `.*.trainperf-tmp-*` files in `baselines/` after that update.",
            "",
            "| run | signal | trials | run length (s) | files damaged | cells lost | children alive | "
            "partial files in baselines/ | left |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            END,
        ])
        verdicts.write_doc(args.out, section, BEGIN, END)
        print(section)
    finally:
        shutil.rmtree(where, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
