"""Atomic file writes, checksums and logging shared by every stage.

A killed job must never leave a file that looks complete: every output is written to a temporary
name in the same directory and renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[tuple[BinaryIO, Path]]:
    """Yield (file, temporary path) next to `path`; on a clean exit the bytes are fsynced, given
    the mode every output has (0666 & ~umask; mkstemp makes 0600) and renamed to `path`. An
    exception (a failed check inside the block included) removes the temporary file instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # outputs are shared artifacts
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as (f, _):
        f.write(data)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Put a copy of `src` at `dst` atomically, keeping `src` (a hard link when the filesystem
    allows, so a multi-GB checkpoint costs no copy)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        with atomic_file(dst) as (f, _), open(src, "rb") as s:
            shutil.copyfileobj(s, f)
        return
    os.replace(tmp, dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, error: type[Exception], hint: str) -> Any:
    """Parse a JSON file; a missing or malformed file raises `error` naming it and `hint`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found; {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}); {hint}") from None


def md5_file(path: str | Path, chunk: int = 1 << 20, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return md5_file(path, algorithm="sha256")


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr and, when given, to a file (the Snakemake rule's `log:`)."""
    logger = logging.getLogger("trainer")
    logger.setLevel(level)
    logger.propagate = False  # libraries may configure the root logger; print each line once
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger
