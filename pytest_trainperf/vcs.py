"""git, as the runners that measure another revision and the baselines that know their code need it.

A baseline records the code it measured (:class:`~pytest_trainperf.records.Source`): the commit checked
out at the update and the id of the tree the update measured (the tracked files as they were, uncommitted
changes included, less the baselines directory). :func:`measured_commit` finds a commit whose tree is
that tree, or says why there is none. Every call goes through :func:`git` (``--end-of-options`` where a
user's revision is passed); no shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_trainperf import scratch
from pytest_trainperf.records import Source

SHORT_SHA = 12
"""Hex digits of a commit shown in the report."""
SEARCHED_COMMITS = 200
"""Commits, newest first from HEAD, searched for the one whose tree a baseline measured."""


class GitError(Exception):
    """A git command that failed: the command and git's own message."""


def git(args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    """The output of ``git <args>`` in ``cwd``, stripped; raises :class:`GitError` with git's message."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, env={**os.environ, **env} if env else None)
    except OSError as exc:
        raise GitError(f"git could not be run ({exc}); expected git on PATH") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        raise GitError(f"`git {' '.join(args)}` failed: {message[0] if message else ''}")
    return done.stdout.strip()


@dataclass(frozen=True)
class Trees:
    """The two trees of a comparison."""

    toplevel: Path
    """The top of this checkout (``git rev-parse --show-toplevel``)."""
    ref: str
    """The revision as the user named it."""
    ref_sha: str
    """The commit it resolves to."""
    head_sha: str
    """The commit this checkout is at."""
    dirty: bool
    """Whether this checkout has uncommitted changes (untracked files not ignored count too)."""

    @property
    def label(self) -> str:
        """How the report names the comparison: ``main (1a2b3c4d5e6f), in lockstep; this tree: ...``."""
        here = self.head_sha[:SHORT_SHA] + (" + uncommitted changes" if self.dirty else "")
        return f"{self.ref} ({self.ref_sha[:SHORT_SHA]}), in lockstep; this tree: {here}"


def resolve_trees(rootpath: Path, ref: str) -> Trees:
    """Find the repository of ``rootpath`` and resolve ``ref`` in it; :class:`GitError` says what failed."""
    try:
        toplevel = Path(git(["rev-parse", "--show-toplevel"], rootpath))
    except GitError as exc:
        raise GitError(f"the rootdir {rootpath} is not in a git repository ({exc})") from None
    try:
        ref_sha = git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"], toplevel)
    except GitError:
        raise GitError(f"{ref!r} is no branch, tag or commit of the repository at {toplevel} "
                       "(`git rev-parse` cannot resolve it)") from None
    try:
        head_sha = git(["rev-parse", "--verify", "HEAD"], toplevel)
    except GitError:
        raise GitError(f"the repository at {toplevel} has no commit yet to compare from") from None
    dirty = bool(git(["status", "--porcelain", "--untracked-files=normal"], toplevel))
    return Trees(toplevel=toplevel.resolve(), ref=ref, ref_sha=ref_sha, head_sha=head_sha, dirty=dirty)


def add_worktree(toplevel: Path, sha: str) -> Path:
    """Check ``sha`` out, detached, into a new temporary directory; returns the worktree's path."""
    holder = scratch.directory("against")
    tree = holder / "tree"
    try:
        git(["worktree", "add", "--detach", "--quiet", str(tree), sha], toplevel)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    return tree


def remove_worktree(toplevel: Path, tree: Path) -> None:
    """Remove a worktree made by :func:`add_worktree` and its directory; prune git's record of it.
    Never raises: this runs while a session ends, maybe after Ctrl-C."""
    for args in (["worktree", "remove", "--force", str(tree)], ["worktree", "prune"]):
        try:
            git(args, toplevel)
        except GitError:
            pass
    shutil.rmtree(tree.parent, ignore_errors=True)


def toplevel(path: Path) -> Path | None:
    """The top of the git checkout holding ``path``; None outside git (or without git)."""
    try:
        return Path(git(["rev-parse", "--show-toplevel"], path)).resolve()
    except GitError:
        return None


def _tree(top: Path, fill: Sequence[str], exclude: Path | None, env: Mapping[str, str]) -> str:
    """The id of the tree that a scratch index holds after ``fill`` (a git command), less ``exclude``."""
    with tempfile.TemporaryDirectory(prefix=f"{scratch.PREFIX}index-{os.getpid()}-") as index_dir:
        index = {**env, "GIT_INDEX_FILE": str(Path(index_dir) / "index")}
        git(fill, top, index)
        if exclude is not None:
            git(["rm", "-r", "-q", "-f", "--cached", "--ignore-unmatch", "--", str(exclude)], top, index)
        return git(["write-tree"], top, index)


def snapshot(path: Path, exclude: Path) -> Source | None:
    """What code the checkout holding ``path`` has now: HEAD and the id of the working tree's tree
    (its tracked files as they are now, less ``exclude``, the baselines directory); None outside git or
    before the first commit."""
    top = toplevel(path)
    if top is None:
        return None
    try:
        head = git(["rev-parse", "--verify", "HEAD"], top)
        rel = _inside(exclude, top)
        tree = _working_tree(top, rel)
    except GitError:
        return None
    return Source(commit=head, tree=tree)


def _working_tree(top: Path, exclude: Path | None) -> str:
    """The id of the working tree's tree: a copy of the checkout's index (files added with ``git add``
    count; only changed files are hashed again) with the changes of every tracked file, less ``exclude``.
    Untracked files do not count: scratch files and outputs left in the checkout must not make the
    measured tree one that no commit can hold."""
    with tempfile.TemporaryDirectory(prefix=f"{scratch.PREFIX}index-{os.getpid()}-") as index_dir:
        env = {"GIT_INDEX_FILE": str(Path(index_dir) / "index")}
        real = Path(git(["rev-parse", "--git-path", "index"], top))
        real = real if real.is_absolute() else top / real
        if real.exists():
            shutil.copyfile(real, env["GIT_INDEX_FILE"])
        git(["add", "-u", "--", "."], top, env)
        if exclude is not None:
            git(["rm", "-r", "-q", "-f", "--cached", "--ignore-unmatch", "--", str(exclude)], top, env)
        return git(["write-tree"], top, env)


def _inside(path: Path, top: Path) -> Path | None:
    try:
        return path.resolve().relative_to(top)
    except ValueError:
        return None


@dataclass(frozen=True)
class Found:
    """Where the code a baseline measured is, or why it cannot be had."""

    commit: str | None
    """The commit whose tree is the measured tree; None when there is none to be had."""
    reason: str = ""
    """Why there is none, and the fix (empty when found)."""


def measured_commit(path: Path, source: Source, exclude: Path) -> Found:
    """The commit of the checkout holding ``path`` whose tree (less ``exclude``) is the tree that
    ``source`` measured: HEAD at the update, or the commit that brought the update's changes (and its
    baselines, usually); searched newest first among :data:`SEARCHED_COMMITS` commits of HEAD."""
    top = toplevel(path)
    if top is None:
        return Found(None, f"{path} is not in a git checkout")
    rel = _inside(exclude, top)
    try:
        shallow = git(["rev-parse", "--is-shallow-repository"], top) == "true"
        known = _has_commit(top, source.commit)
        candidates = git(["rev-list", f"--max-count={SEARCHED_COMMITS}", "HEAD"], top).split()
        if known:
            candidates = [source.commit, *[c for c in candidates if c != source.commit]]
        for commit in candidates:
            if _tree(top, ["read-tree", commit], rel, {}) == source.tree:
                return Found(commit)
    except GitError as exc:
        return Found(None, f"git could not search the history ({exc})")
    short = source.commit[:SHORT_SHA]
    if not known and shallow:
        return Found(None, f"this is a shallow clone without {short}, the commit the baseline was updated at "
                           "(fetch the history: actions/checkout with fetch-depth: 0, or git fetch --unshallow)")
    if not known:
        return Found(None, f"{short}, the commit the baseline was updated at, is not in this clone's history "
                           "(a rewritten history, or an update made elsewhere)")
    return Found(None, f"no commit holds the code the baseline measured: it was updated from {short} with "
                       "changes never committed as they were measured (update the baselines from a committed "
                       "tree, and commit them with the code)")


def _has_commit(top: Path, sha: str) -> bool:
    try:
        git(["cat-file", "-e", f"{sha}^{{commit}}"], top)
    except GitError:
        return False
    return True
