"""Upstream MiniOneRec's calc.py at the pinned commit, the script the cross-check runs by default.

Where it comes from (first match wins), always checked against its pinned git blob id:
1. `root/calc.py`: a local copy of the repository's files (e.g. ../shared/minionerec-upstream);
2. `cache_dir/COMMIT/calc.py`: an earlier download;
3. a download from the repository at the commit (trainer.data.pinned), written to the cache.
A copy whose blob id differs is an error: it is not upstream's file at that commit. When no copy
exists and the download fails (offline), `locate_calc` says why, and the cross-check falls back to
the package's metrics and reports that it did.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.data import pinned

log = logging.getLogger("trainer")
CALC_PATH = "calc.py"  # in the repository


@dataclass(frozen=True)
class UpstreamSource:
    commit: str
    pins: str  # pin file (config/minionerec_pins.yaml)
    repo: str = pinned.DEFAULT_REPO
    root: str | None = None  # local copy of the repository's top-level files
    cache_dir: str = "workdir/minionerec"


@dataclass(frozen=True)
class Located:
    path: Path | None  # None: unavailable (offline, no copy)
    how: str  # where it came from, or why it is unavailable


def _verified_copy(path: Path, pins: dict[str, str]) -> bool:
    """True when `path` is upstream's calc.py; DataError when it exists but is another file."""
    if not path.is_file():
        return False
    pinned.check_pinned(path.read_bytes(), CALC_PATH, pins, str(path))
    return True


def locate_calc(src: UpstreamSource, fetch=None) -> Located:
    """Upstream's calc.py at `src.commit`, verified; DataError when a copy does not match its pin."""
    pins = pinned.load_pins(src.pins, src.commit)
    if src.root and _verified_copy(Path(src.root) / CALC_PATH, pins):
        return Located(Path(src.root) / CALC_PATH, f"local copy {Path(src.root) / CALC_PATH}")
    cached = Path(src.cache_dir) / src.commit / CALC_PATH
    if _verified_copy(cached, pins):
        return Located(cached, f"cached download {cached}")
    try:
        kw = {"fetch": fetch} if fetch else {}
        path = pinned.fetch_pinned(CALC_PATH, cached, src.repo, src.commit, pins, log=log, **kw)
    except pinned.FetchError as e:
        return Located(None, str(e))
    return Located(path, f"downloaded to {path}")

