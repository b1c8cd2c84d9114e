"""The local git state that TPU VM hosts are synced to (no shared filesystem needed)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snakemake_executor_plugin_tpu.slices import SliceConfigError


@dataclass(frozen=True)
class GitState:
    toplevel: str
    prefix: str  # the workflow directory relative to the repo root ("" at the root)
    sha: str
    dirty: list[str]  # modified tracked files


def _git(args: list[str], cwd: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SliceConfigError(f"git {' '.join(args)} failed in {cwd}: {out.stderr.strip()}; the tpu-vm backend "
                               "syncs hosts to the local git commit, so run from a git checkout "
                               "(or set code_sync: none on the slice)")
    return out.stdout


def git_state(cwd: str = ".") -> GitState:
    cwd = os.path.abspath(cwd)
    top = _git(["rev-parse", "--show-toplevel"], cwd).strip()
    prefix = _git(["rev-parse", "--show-prefix"], cwd).strip().rstrip("/")
    sha = _git(["rev-parse", "HEAD"], cwd).strip()
    dirty = [line[3:] for line in _git(["status", "--porcelain", "--untracked-files=no"], cwd).splitlines()
             if line.strip()]
    return GitState(top, prefix, sha, dirty)


def check_clean(state: GitState, allow_dirty: bool) -> str | None:
    """Refuse a dirty tree (hosts would run other code than this checkout); returns a warning if allowed."""
    if not state.dirty:
        return None
    files = ", ".join(state.dirty[:10]) + (" ..." if len(state.dirty) > 10 else "")
    if not allow_dirty:
        raise SliceConfigError(
            f"the git tree {state.toplevel} has uncommitted changes ({files}); TPU VM hosts run the committed "
            f"code of {state.sha[:12]}, so commit first, or pass --tpu-allow-dirty to run that commit anyway")
    return f"uncommitted changes ({files}) are NOT shipped; TPU VM hosts run commit {state.sha[:12]}"


def make_bundle(state: GitState, dest_dir: str | os.PathLike) -> Path:
    """A git bundle with HEAD, created once per commit."""
    dest = Path(dest_dir).absolute() / f"{state.sha}.bundle"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        _git(["bundle", "create", "-q", str(tmp), "HEAD"], state.toplevel)
        os.replace(tmp, dest)
    return dest


def paths_not_committed(state: GitState, paths) -> list[str]:
    """Of `paths` (files TPU VM hosts read from their checkout, e.g. --configfile overlays), those
    missing from the commit the hosts are synced to (untracked, only staged, or outside the repo)."""
    missing = []
    for p in paths:
        rel = os.path.relpath(os.path.realpath(p), os.path.realpath(state.toplevel))
        found = not rel.startswith("..") and subprocess.run(
            ["git", "cat-file", "-e", f"{state.sha}:{rel}"], cwd=state.toplevel, capture_output=True).returncode == 0
        if not found:
            missing.append(str(p))
    return missing
