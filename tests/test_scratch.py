"""What a killed session leaves behind (issue 18): its children die with it, and the next measured
session removes its temporary directories and unregisters its git worktree, with a one-line note.
The processes, the SIGKILL and the git worktrees are real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch  # noqa: F401  (loaded before pytester's in-process runs, as conftest.py expects)
from gitrepo import WORKLOAD, git

from pytest_trainperf import scratch

POLL_S = 0.05
WAIT_S = 120.0


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def worktrees(repo: Path) -> int:
    return git(repo, "worktree", "list", "--porcelain").count("worktree ")


def make_repo(where: Path) -> None:
    (where / "work.py").write_text(WORKLOAD.format(sleep=0))
    git(where, "init", "-q", "-b", "main")
    git(where, "config", "user.email", "t@example.com")
    git(where, "config", "user.name", "t")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "first")


def test_only_directories_whose_maker_is_gone_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    gone = root / f"trainperf-isolate-{dead_pid()}-abc"
    (gone / "tmp").mkdir(parents=True)
    (gone / "tmp" / "outcome.json").write_text("{}")
    mine = root / f"trainperf-round-{os.getpid()}-abc"  # this live session's own
    mine.mkdir()
    other = root / "pytest-of-someone"  # not ours
    other.mkdir()
    stray = root / f"trainperf-lockstep-{dead_pid()}-file"  # a file, not a directory: not ours either
    stray.write_text("x")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / f"trainperf-against-{sleeper.pid}-abc"  # a live session's
        live.mkdir()
        reused = root / f"trainperf-index-{sleeper.pid}-old"  # made long before that process started
        reused.mkdir()
        started = psutil.Process(sleeper.pid).create_time()
        os.utime(reused, (started - 3600, started - 3600))

        swept = scratch.sweep(root)
        assert sorted(p.name for p in root.iterdir()) == sorted([mine.name, other.name, stray.name, live.name])
        assert scratch.sweep(root) == scratch.Swept()  # nothing more to remove while that session lives
    finally:
        sleeper.kill()
        sleeper.wait()
    assert swept.directories == 2 and swept.worktrees == 0
    assert swept.line().startswith("removed 2 temporary directories left by a session that did not end (pid ")
    assert scratch.Swept().line() == ""
    assert scratch.sweep(root).owners == (sleeper.pid,)  # once that session has ended, its directory goes


def test_a_worktree_left_in_a_directory_is_unregistered(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo)
    root = tmp_path / "tmp"
    holder = root / f"trainperf-against-{dead_pid()}-abc"
    holder.mkdir(parents=True)
    git(repo, "worktree", "add", "--detach", "--quiet", str(holder / "tree"), "HEAD")
    assert worktrees(repo) == 2

    swept = scratch.sweep(root)

    assert swept.directories == 1 and swept.worktrees == 1
    assert "1 of them holding a git worktree (unregistered)" in swept.line()
    assert not holder.exists() and worktrees(repo) == 1


SLOW_TEST = """
import time
import pytest_trainperf as tp
from work import build


@tp.tolerance(step_time=0.5)
def test_w(trainperf):
    step = build()

    def slow():
        time.sleep(0.05)
        return step()

    trainperf.train(slow, steps=200, warmup=1)
"""


def test_a_sigkilled_session_leaves_nothing_the_next_run_does_not_remove(pytester: pytest.Pytester,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    where = pytester.path
    pytester.makeini("[pytest]\ntrainperf_threads = 1\ntrainperf_pairs = 20\n")
    make_repo(where)
    (where / "test_w.py").write_text(SLOW_TEST)
    (where / ".gitignore").write_text("__pycache__/\n")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "a slow test")
    private = where.parent / f"{where.name}-tmp"
    private.mkdir()
    env = {**os.environ, "TMPDIR": str(private)}
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                                "--trainperf-against=HEAD", "test_w.py"], cwd=where, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and session.poll() is None:  # until both lockstep workers run
            workers = psutil.Process(session.pid).children()
            if len(workers) >= 2 and worktrees(where) == 2:
                break
            time.sleep(POLL_S)
        assert len(workers) >= 2 and worktrees(where) == 2, "the session never started its two workers"
        session.send_signal(signal.SIGKILL)
        session.wait()
    finally:
        session.kill()
        session.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == []  # the workers died with their session (PR_SET_PDEATHSIG)
    left = sorted(p.name.rsplit("-", 2)[0] for p in private.iterdir())
    assert left == ["trainperf-against", "trainperf-lockstep"] and worktrees(where) == 2

    monkeypatch.setattr(tempfile, "tempdir", str(private))  # the next run, with the same temp directory
    result = pytester.runpytest("--trainperf-update-baselines", "-p", "no:cacheprovider", "test_w.py",
                                "-k", "not_a_test")
    result.stdout.fnmatch_lines([f"trainperf: removed 2 temporary directories, 1 of them holding a git "
                                 f"worktree (unregistered) left by a session that did not end (pid {session.pid}) "
                                 f"in {private}"])
    assert list(private.iterdir()) == [] and worktrees(where) == 1
