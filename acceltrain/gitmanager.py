"""Run an experiment on another branch or commit without touching the user's working tree.

``GitManager.branch_context("exp")`` checks the branch out into a temporary ``git worktree``
(a second working directory of the same repository), changes into it for the duration of the
``with`` block and removes it afterwards. The user's working tree, index, HEAD and stash are
never written: uncommitted edits stay where they are, and nothing has to be stashed.

Example:
    >>> git = GitManager("~/project")
    >>> with git.branch_context("lr-warmup") as ws:
    ...     subprocess.run([sys.executable, "train.py"], check=True)  # the branch's train.py
    >>> ws.commit                                                      # what ran, recorded
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import UserError

__all__ = ["BranchWorkspace", "GitManager", "GitOperationError"]


class GitOperationError(UserError):
    """A git command failed (the message names the command and git's first line of error)."""


@dataclass(frozen=True)
class BranchWorkspace:
    """Where ``branch_context`` checked the code out, and which commit that is."""

    branch: str
    commit: str
    path: Path  # the temporary worktree's directory matching ``GitManager.repo_path``
    root: Path  # the temporary worktree's top


class GitManager:
    """Git operations for experiment isolation, on the repository that holds ``repo_path``.

    Args:
        repo_path: A directory inside a git repository.
    """

    def __init__(self, repo_path: str | Path):
        self.repo_path = Path(repo_path).expanduser().resolve()
        if shutil.which("git") is None:
            raise GitOperationError("git not found on PATH")
        top = self._git("rev-parse", "--show-toplevel", check=False)
        if top.returncode != 0:
            raise GitOperationError(f"{self.repo_path}: not inside a git repository")
        self.root = Path(top.stdout.strip())
        self.history: list[BranchWorkspace] = []  # every context entered, in order
        self._active: BranchWorkspace | None = None

    def _git(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        # GIT_OPTIONAL_LOCKS=0: reads must not even refresh the user's index stat cache.
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        proc = subprocess.run(["git", "-C", str(cwd or self.repo_path), *args], capture_output=True, text=True,
                              env=env, timeout=120)
        if check and proc.returncode != 0:
            first = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[0]
            raise GitOperationError(f"git {' '.join(args)}: {first}")
        return proc

    def _resolve(self, ref: str) -> str | None:
        proc = self._git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def current_commit(self) -> str:
        """The commit HEAD points at in the user's tree."""
        return self._git("rev-parse", "HEAD").stdout.strip()

    def current_branch(self) -> str:
        """The user's branch name (``HEAD`` when detached)."""
        return self._git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip()

    def branch_exists(self, branch_name: str) -> bool:
        return self._git("show-ref", "--verify", "--quiet", f"refs/heads/{branch_name}", check=False).returncode == 0

    def create_branch(self, branch_name: str, base_branch: str | None = None) -> bool:
        """Create ``branch_name`` at ``base_branch`` (default HEAD) without checking it out.

        Returns False when it exists already."""
        if self.branch_exists(branch_name):
            return False
        self._git("branch", "--", branch_name, *([base_branch] if base_branch else []))
        return True

    @contextlib.contextmanager
    def branch_context(self, branch_name: str, create_if_not_exists: bool = True) -> Iterator[BranchWorkspace]:
        """Work on ``branch_name`` (a branch, tag or commit) in a temporary worktree.

        Inside the block the current directory is the worktree's counterpart of ``repo_path``;
        the previous directory, and the user's tree, are as they were afterwards. A branch that
        does not exist is created at HEAD when ``create_if_not_exists`` (a new ref only; the
        user's checkout is not switched), else :class:`GitOperationError`.
        """
        commit = self._resolve(branch_name)
        if commit is None:
            if not create_if_not_exists:
                raise GitOperationError(f"branch_context: {branch_name!r} is neither a branch nor a commit of {self.root}")
            self.create_branch(branch_name)
            commit = self._resolve(branch_name)
        tmp = Path(tempfile.mkdtemp(prefix="acceltrain-worktree-"))
        tree = tmp / self.root.name
        # --detach: the branch may be checked out in the user's tree already (git refuses a
        # branch checked out twice), and commits made here must not move it behind the user's back.
        self._git("worktree", "add", "--detach", "--quiet", str(tree), commit)
        workspace = BranchWorkspace(branch_name, commit, tree / self.repo_path.relative_to(self.root), tree)
        self.history.append(workspace)
        previous = os.getcwd()
        outer, self._active = self._active, workspace
        try:
            os.chdir(workspace.path)
            yield workspace
        finally:
            os.chdir(previous)
            self._active = outer
            self._git("worktree", "remove", "--force", str(tree), check=False)
            self._git("worktree", "prune", check=False)
            shutil.rmtree(tmp, ignore_errors=True)

    def commit_changes(self, message: str, files: list[str] | None = None, add_all: bool = False) -> str:
        """Commit ``files`` (or, with ``add_all``, every change); returns the new commit.

        Inside ``branch_context`` this commits in the temporary worktree (detached: no branch
        moves); outside it, in the user's checkout, as the documented API does."""
        cwd = self._active.path if self._active is not None else self.repo_path
        if add_all:
            self._git("add", "--all", cwd=cwd)
        elif files:
            self._git("add", "--", *files, cwd=cwd)
        self._git("commit", "--quiet", "-m", message, cwd=cwd)
        return self._git("rev-parse", "HEAD", cwd=cwd).stdout.strip()
