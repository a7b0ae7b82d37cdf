"""The plugin's temporary directories, and the sweep of those a killed session left behind.

Every temporary directory the plugin makes (an isolated cell's, a noise round's, a lockstep pair's,
a worktree's holder, a scratch git index) is named ``trainperf-<kind>-<pid>-<random>``: ``pid`` is
the process that made it. A session that ends, normally, on failure or on Ctrl-C, removes its own.
One that is SIGKILLed cannot (its children die with it: see
:func:`pytest_trainperf.runners.children.death`), so the next measured session removes them:

- a directory is removed only when its maker is gone: no process has its pid, the process of that
  pid is a zombie, or that process started after the directory last changed (the pid was reused);
  a directory of another user, or of a live session (another CI job, an xdist worker), is kept;
- a worktree checked out there (``--trainperf-against``, side-by-side confirmation) is unregistered
  from its repository too (``git worktree prune`` in the repository its ``.git`` file names).

It imports neither pytest nor torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "trainperf-"
"""The start of every temporary directory's name."""
NAME = re.compile(rf"^{PREFIX}(?P<kind>[a-z]+)-(?P<pid>[0-9]{{1,10}})-")
"""A temporary directory's name: its kind and the pid of the process that made it."""
CLOCK_SLACK_S = 1.0
"""Seconds allowed between a directory's last change and its maker's start time (clock granularity)."""


def directory(kind: str, parent: Path | None = None) -> Path:
    """A new temporary directory of ``kind`` (``isolate``, ``round``, ``lockstep``, ``against``,
    ``index``), named after this process so that a later session can tell when it was orphaned."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}-", dir=parent))


def gone(pid: int, changed: float) -> bool:
    """Whether the process that made a directory last changed at ``changed`` (epoch seconds) is gone."""
    import psutil  # type: ignore[import-untyped]

    if pid == os.getpid():
        return False
    try:
        process = psutil.Process(pid)
        return bool(process.status() == psutil.STATUS_ZOMBIE
                or process.create_time() > changed + CLOCK_SLACK_S)  # the pid was reused since
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, OSError):
        return False  # cannot tell: keep it


@dataclass(frozen=True)
class Swept:
    """What a sweep removed."""

    directories: int = 0
    """Temporary directories removed."""
    worktrees: int = 0
    """Git worktrees among them, unregistered from their repositories."""
    owners: tuple[int, ...] = ()
    """The pids of the sessions that left them."""

    def line(self) -> str:
        """The one-line note; empty when nothing was removed."""
        if not self.directories:
            return ""
        trees = (f", {self.worktrees} of them holding a git worktree (unregistered)" if self.worktrees else "")
        pids = ", ".join(str(p) for p in self.owners)
        return (f"removed {self.directories} temporary director{'ies' if self.directories != 1 else 'y'}"
                f"{trees} left by a session that did not end (pid {pids}) in {tempfile.gettempdir()}")


def _worktree_repository(holder: Path) -> Path | None:
    """The git directory of the repository that a worktree checked out in ``holder`` belongs to."""
    for dot_git in (holder / "tree" / ".git", holder / ".git"):
        try:
            text = dot_git.read_text(encoding="utf-8", errors="replace")[:4096]
        except OSError:
            continue
        if text.startswith("gitdir: "):
            registered = Path(text[len("gitdir: "):].strip())
            if registered.parent.name == "worktrees":  # <repository>/.git/worktrees/<name>
                return registered.parent.parent
    return None


def sweep(root: Path | None = None) -> Swept:
    """Remove the plugin's temporary directories under ``root`` (the temp directory) whose maker is
    gone, and unregister the worktrees they held. Never raises: what cannot be removed is kept."""
    root = Path(tempfile.gettempdir()) if root is None else root
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed = trees = 0
    owners: list[int] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return Swept()
    for entry in entries:
        found = NAME.match(entry.name)
        if found is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or (uid is not None and info.st_uid != uid):
                continue
        except OSError:
            continue
        pid = int(found["pid"])
        if not gone(pid, info.st_mtime):
            continue
        repository = _worktree_repository(Path(entry.path))
        shutil.rmtree(entry.path, ignore_errors=True)
        if os.path.exists(entry.path):
            continue
        removed += 1
        if pid not in owners:
            owners.append(pid)
        if repository is not None:
            trees += 1
            try:
                subprocess.run(["git", "--git-dir", str(repository), "worktree", "prune"], capture_output=True,
                               check=False, timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass
    return Swept(directories=removed, worktrees=trees, owners=tuple(sorted(owners)))
