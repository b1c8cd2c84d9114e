"""The emulator's objects must keep their extended attributes.

fake-gcs-server's filesystem backend stores an object's bytes in a file and its metadata (name,
generation, checksums) in that file's `user.metadata` extended attribute. A copy made without
xattrs (plain cp, scp, some filesystems) keeps the bytes and drops the metadata: the server then
does not list the object at all, and a download would report it as deleted. This check names it.
"""
from __future__ import annotations

import os
from pathlib import Path

from trainer.errors import HandoffError

METADATA_XATTR = "user.metadata"


def check_object_metadata(data_dir: str | Path) -> None:
    """Raise HandoffError naming the first object file of `data_dir` that lacks its metadata."""
    data_dir = Path(data_dir)
    if not hasattr(os, "getxattr") or not data_dir.is_dir():
        return
    bare = []
    for bucket in (d for d in data_dir.iterdir() if d.is_dir()):
        for path in (p for p in bucket.rglob("*") if p.is_file()):
            try:
                os.getxattr(path, METADATA_XATTR)
            except OSError:
                bare.append(path)
    if bare:
        raise HandoffError(
            f"GCS emulator state {data_dir}: {len(bare)} object file(s) have no '{METADATA_XATTR}' extended "
            f"attribute (e.g. {bare[0]}), so the emulator cannot see them: the directory was copied without "
            "extended attributes (plain cp/scp, or a filesystem without xattrs). Copy it again with "
            "`cp -a` or `rsync -aX`, or rerun the upload step to write the objects afresh")
