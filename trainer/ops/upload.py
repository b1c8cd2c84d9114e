"""Verified no-clobber upload of local files to GCS, and the receipt it writes.

Each object is written with a generation precondition (0 = must not exist; with overwrite, the
generation inspected), so a concurrent writer is never clobbered; an existing object is accepted
only when its size, md5 and crc32c equal the local file's, and every upload is checked against
the checksums GCS stored for that exact generation. See trainer/ops/handoff.py for the contract.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.errors import HandoffError
from trainer.io_utils import atomic_write_json
from trainer.ops.gcs_io import OVERWRITE_HINT, gcs_error, is_emulator, object_uri, parse_gs_uri, progress, wrap
from trainer.ops.receipt import RECEIPT_VERSION, _entry, _mismatch, blob_digest, file_digest

log = logging.getLogger("trainer")


def _upload_one(bucket, path: Path, name: str, overwrite: bool, bar, lock: threading.Lock,
                chunk_size: int | None) -> dict[str, Any]:
    from google.api_core import exceptions as gexc
    from google.cloud.storage.exceptions import DataCorruption

    uri = object_uri(bucket.name, name)
    local = file_digest(path)
    try:
        existing = bucket.get_blob(name)
    except gexc.GoogleAPICallError as e:
        raise gcs_error(e, uri, "looking up") from e

    if existing is not None:
        remote = blob_digest(existing)
        if not _mismatch(local, remote):
            with lock:
                bar.update(local.size)
            log.info("%s: identical object already at %s (generation %s); skipped", path, uri, existing.generation)
            return _entry(path.name, uri, remote, existing.generation, "skipped_identical")
        if not overwrite:
            raise HandoffError(
                f"{uri} already exists with different content than {path}: "
                f"remote {remote.describe()}, local {local.describe()}. "
                f"Refusing to overwrite; {OVERWRITE_HINT} to replace it.")
        precondition, status = int(existing.generation), "overwritten"
    else:
        precondition, status = 0, "uploaded"

    blob = bucket.blob(name, chunk_size=chunk_size)
    try:
        with open(path, "rb") as f:
            # The precondition makes this a no-clobber (0) or compare-and-swap (generation) write.
            blob.upload_from_file(wrap(f, bar, "read"), size=local.size, if_generation_match=precondition)
    except gexc.PreconditionFailed as e:
        # Another writer got there first; accept its object only if it is byte-identical to ours.
        raced = bucket.get_blob(name)
        if raced is not None and not _mismatch(local, blob_digest(raced)):
            log.info("%s: identical object written concurrently at %s; skipped", path, uri)
            return _entry(path.name, uri, blob_digest(raced), raced.generation, "skipped_identical")
        now = blob_digest(raced).describe() if raced is not None else "no object"
        raise HandoffError(
            f"{uri} was changed by someone else while uploading {path} (generation precondition "
            f"{precondition} failed; GCS now has {now}, local {local.describe()}); inspect the object "
            f"and rerun, with overwrite ({OVERWRITE_HINT}) if the local file should win") from e
    except DataCorruption as e:
        raise HandoffError(f"upload of {path} to {uri} was corrupted in transit: {e}; rerun the upload") from e
    except gexc.GoogleAPICallError as e:
        raise gcs_error(e, uri, f"uploading {path} to") from e

    # Verify what GCS stored (its own md5/crc32c of this exact generation) against the local file.
    stored = bucket.get_blob(name, generation=blob.generation)
    if stored is None:
        raise HandoffError(f"{uri} generation {blob.generation} vanished right after upload; rerun the upload")
    remote = blob_digest(stored)
    if diff := _mismatch(local, remote):
        raise HandoffError(
            f"checksum mismatch after uploading {path} to {uri} (generation {stored.generation}): "
            f"local vs GCS: {'; '.join(diff)}. The local file may have changed during upload; rerun with "
            f"overwrite ({OVERWRITE_HINT}) once it is stable")
    log.info("%s -> %s (generation %s, %s)", path, uri, stored.generation, status)
    return _entry(path.name, uri, remote, stored.generation, status)


def uploading_host() -> dict[str, Any]:
    """Where the upload ran: in the TPU profile the train slice's host 0, which holds the checkpoint
    (the executor sets SIDRL_*; the runbook finds that host by grepping logs for `process=0/4`)."""
    import socket

    env = os.environ
    return {"hostname": socket.gethostname(), "tpu_vm": env.get("SIDRL_TPU_NAME"), "zone": env.get("SIDRL_TPU_ZONE"),
            "worker": int(env["SIDRL_WORKER"]) if env.get("SIDRL_WORKER", "").isdigit() else None,
            "slice": env.get("SIDRL_SLICE")}


def upload_files(paths: list[str | Path], uri: str, overwrite: bool = False, workers: int = 4, *,
                 client=None, receipt_path: str | Path | None = None, create_bucket: bool | None = None,
                 chunk_size_mib: int | None = None) -> dict[str, Any]:
    """Upload `paths` to `uri`/<basename> in parallel; return (and optionally write) the receipt.

    client: a google-cloud-storage Client (default: `gcs_emulator.storage_client()`).
    create_bucket: create a missing bucket (default: only on an emulator).
    chunk_size_mib: resumable-upload chunk size (default: the library's; multiple of 256 KiB).
    """
    from trainer.ops import gcs_emulator

    bucket_name, prefix = parse_gs_uri(uri)
    files = [Path(p) for p in paths]
    if not files:
        raise HandoffError("handoff-upload: no files given; pass --files F1 F2 ...")
    for p in files:
        if not p.is_file():
            raise HandoffError(f"file to upload {p} does not exist; the step producing it (rl_train) must finish first")
    names = [p.name for p in files]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise HandoffError(f"two files to upload share the name(s) {dupes}; objects are named by basename")

    client = client or gcs_emulator.storage_client()
    if create_bucket is None:
        create_bucket = is_emulator(client)
    if create_bucket:
        gcs_emulator.ensure_bucket(client, bucket_name)
    bucket = client.bucket(bucket_name)
    chunk = chunk_size_mib * (1 << 20) if chunk_size_mib else None

    lock = threading.Lock()
    entries: list[dict[str, Any] | None] = [None] * len(files)
    errors: list[str] = []
    total = sum(p.stat().st_size for p in files)
    with progress(total, f"upload {uri}") as bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_upload_one, bucket, p, f"{prefix}/{p.name}" if prefix else p.name,
                               overwrite, bar, lock, chunk) for p in files]
        # Let every transfer finish before failing, so a rerun has the least left to do.
        for i, fut in enumerate(futures):
            try:
                entries[i] = fut.result()
            except HandoffError as e:
                errors.append(str(e))
    if errors:
        raise HandoffError("\n".join(errors))

    receipt = {
        "version": RECEIPT_VERSION,
        "uri": f"gs://{bucket_name}/{prefix}" if prefix else f"gs://{bucket_name}",
        "endpoint": client.api_endpoint,
        "emulator": is_emulator(client),
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "uploaded_from": uploading_host(),
        "files": entries,
    }
    if receipt_path is not None:
        atomic_write_json(receipt_path, receipt)
        log.info("receipt written to %s", receipt_path)
    return receipt
