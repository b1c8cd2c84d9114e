"""Files of the MiniOneRec repository at a pinned commit, kept only when their git blob id matches.

The pin file (config/minionerec_pins.yaml) names the commit and {path in the repository: git blob
id}. A file is read from REPO at COMMIT (a GitHub URL maps to raw.githubusercontent.com; any other
base, e.g. a mirror or file:///dir, is read as BASE/COMMIT/PATH) and written, atomically, only
when sha1("blob <size>\\0" + bytes) equals its pin (what `git hash-object FILE` prints), so a
failed or tampered download never leaves a file a rerun would take as valid.
"""
from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

from trainer.errors import DataError
from trainer.io_utils import atomic_write_bytes

GITHUB = "https://github.com/"
DEFAULT_REPO = "https://github.com/AkaliKong/MiniOneRec"


class FetchError(DataError):
    """The file could not be fetched at all (offline, not found); nothing was written."""


def git_blob_id(blob: bytes) -> str:
    """The id git gives these bytes as a file (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


def raw_url(repo: str, commit: str, path: str) -> str:
    """URL of `path` (relative to the repository root) at `commit`."""
    repo = repo.rstrip("/")
    if repo.endswith(".git"):
        repo = repo[: -len(".git")]
    if repo.startswith(GITHUB):
        owner_repo = repo[len(GITHUB):]
        if owner_repo.count("/") != 1:
            raise DataError(f"minionerec_download.repo '{repo}' must look like https://github.com/OWNER/REPO")
        return f"https://raw.githubusercontent.com/{owner_repo}/{commit}/{path}"
    return f"{repo}/{commit}/{path}"


def load_pins(path: str | Path, commit: str) -> dict[str, str]:
    """{path in the repository: git blob id} from the pin file, which must be for `commit`."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: pin file not found; set minionerec_download.pins in config/config.yaml") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise DataError(f"{path}: expected keys 'commit' and 'files' ({{path in the repository: git blob id}})")
    if str(doc.get("commit")) != commit:
        raise DataError(f"{path}: pins are for commit {doc.get('commit')}, but the download asks for commit {commit}; "
                        "pin the same commit in config.yaml (minionerec_download.commit) or update the pin file")
    return {str(k): str(v).lower() for k, v in doc["files"].items()}


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 (https or file:// only)
        return resp.read()


def pin_of(path: str, pins: dict[str, str], source: str) -> str:
    if path not in pins:
        raise DataError(f"{source}: no pinned git blob id for '{path}' in the pin file; add it there "
                        "(`git hash-object FILE` of the file at the pinned commit)")
    return pins[path]


def check_pinned(blob: bytes, path: str, pins: dict[str, str], source: str) -> str:
    """The blob id of `blob`; DataError naming both ids when it is not the pin of `path`."""
    want = pin_of(path, pins, source)
    got = git_blob_id(blob)
    if got != want:
        raise DataError(f"{source}: git blob id {got} does not match the pinned {want} for '{path}'; "
                        "nothing was written. Check minionerec_download.commit and the pin file")
    return got


def fetch_pinned(path: str, dest: str | Path, repo: str, commit: str, pins: dict[str, str],
                 fetch=_fetch, log=None) -> Path:
    """Download `path` at `commit` to `dest`, verified against its pin (FetchError: unreachable)."""
    pin_of(path, pins, str(dest))  # before any network access
    url = raw_url(repo, commit, path)
    try:
        blob = fetch(url)
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a malformed URL
        raise FetchError(f"downloading {url} failed: {e}; check the network or place the file at {dest}") from None
    got = check_pinned(blob, path, pins, url)
    atomic_write_bytes(dest, blob)
    if log:
        log.info("downloaded %s -> %s (git blob %s verified)", url, dest, got)
    return Path(dest)
