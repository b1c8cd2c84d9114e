"""GCS handoff of the rl_last checkpoint: verified no-clobber upload, receipt, verified download.

Replaces the runbook's `gsutil -m cp -n FILES $GCS_PREFIX/{ds}/` (train host) and
`gsutil -m cp -n $GCS_PREFIX/{ds}/sft_state_rl_last.msgpack DEST` (eval host), adding what `-n`
lacks: an existing object is accepted only when its md5 and crc32c equal the local file's, and
every transfer is checked against checksums computed here.

Upload (`upload_files`): each object is written with a generation precondition (0 = must not
exist; with overwrite, the generation we inspected), so a concurrent writer is never clobbered.
GCS makes an object visible only when its upload completes, so a killed upload leaves nothing,
and a rerun still compares every existing object with the local checksums before accepting it.
The receipt (JSON, written atomically) records per file: name, uri, size, md5 (hex and the
base64 GCS reports), crc32c (base64 as GCS reports, and hex), generation and status
(uploaded | skipped_identical | overwritten), plus the endpoint and a timestamp.

Download (`download_verified`): reads exactly the receipt's generation into a temporary file next
to the destination, verifies size, md5 and crc32c against the receipt, then renames it into place.

CLI:
  python -m trainer handoff-upload --files F1 F2 ... --uri gs://bucket/prefix/office \
      --receipt handoff/office/gcs_copy.json [--overwrite] [--emulator-root DIR]
  python -m trainer handoff-download --receipt handoff/office/gcs_copy.json \
      --name sft_state_rl_last.msgpack --dest workdir/checkpoints/office/sft_state_rl_last.msgpack \
      [--emulator-root DIR]
With --emulator-root the local GCS emulator serving DIR is used (started when needed); without
it real GCS with Application Default Credentials (or STORAGE_EMULATOR_HOST when set).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import google_crc32c

from trainer.errors import HandoffError
from trainer.io_utils import atomic_write_json

log = logging.getLogger("trainer")

RECEIPT_VERSION = 1
OVERWRITE_HINT = "set `handoff.overwrite: true` in the workflow config (or pass --overwrite)"
_READ_CHUNK = 4 << 20


# ---------------------------------------------------------------- checksums


@dataclass(frozen=True)
class Digest:
    size: int
    md5_base64: str  # GCS's md5Hash form
    crc32c_base64: str  # GCS's crc32c form (big-endian uint32, base64)

    @property
    def md5_hex(self) -> str:
        return base64.b64decode(self.md5_base64).hex()

    @property
    def crc32c_hex(self) -> str:
        return base64.b64decode(self.crc32c_base64).hex()

    def describe(self) -> str:
        return f"size {self.size}, md5 {self.md5_hex}, crc32c {self.crc32c_base64}"


def file_digest(path: str | Path) -> Digest:
    """Size, md5 and crc32c of a local file in one read."""
    md5, crc, size = hashlib.md5(), google_crc32c.Checksum(), 0
    with open(path, "rb") as f:
        while block := f.read(_READ_CHUNK):
            md5.update(block)
            crc.update(block)
            size += len(block)
    return Digest(size, base64.b64encode(md5.digest()).decode(), base64.b64encode(crc.digest()).decode())


def blob_digest(blob) -> Digest:
    """The checksums GCS reports for an object (loaded metadata)."""
    return Digest(int(blob.size or 0), blob.md5_hash or "", blob.crc32c or "")


def entry_digest(entry: dict[str, Any]) -> Digest:
    return Digest(int(entry["size"]), entry["md5_base64"], entry["crc32c"])


def _mismatch(a: Digest, b: Digest) -> list[str]:
    """Human-readable differences, each naming both values."""
    out = []
    if a.size != b.size:
        out.append(f"size {a.size} vs {b.size}")
    if a.md5_base64 != b.md5_base64:
        out.append(f"md5 {a.md5_hex or '(none)'} vs {b.md5_hex or '(none)'}")
    if a.crc32c_base64 != b.crc32c_base64:
        out.append(f"crc32c {a.crc32c_base64 or '(none)'} vs {b.crc32c_base64 or '(none)'}")
    return out


# ---------------------------------------------------------------- URIs and clients


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b/' -> ('bucket', 'a/b'); the prefix may be empty."""
    if not uri.startswith("gs://") or len(uri) <= 5 or uri[5] == "/":
        raise HandoffError(f"GCS URI '{uri}' must look like gs://BUCKET/PREFIX (e.g. gs://my-bucket/rl/office)")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def _object_uri(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{name}"


def is_emulator(client) -> bool:
    return "googleapis.com" not in (client.api_endpoint or "")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # disable=None: bars only on a terminal, never in Snakemake log files.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


def _wrap(stream, bar, method: str):
    from tqdm.utils import CallbackIOWrapper

    return CallbackIOWrapper(bar.update, stream, method)


def _gcs_error(e: Exception, uri: str, action: str) -> HandoffError:
    from google.api_core import exceptions as gexc

    if isinstance(e, gexc.Forbidden):
        hint = "check that your credentials may access this bucket (`gcloud auth application-default login`)"
    elif isinstance(e, gexc.NotFound):
        hint = "check that the bucket exists and the URI is spelled right"
    else:
        hint = "check the network/endpoint and rerun; completed files are skipped on rerun"
    return HandoffError(f"{action} {uri} failed: {e}; {hint}")


# ---------------------------------------------------------------- upload


def _upload_one(bucket, path: Path, name: str, overwrite: bool, bar, lock: threading.Lock,
                chunk_size: int | None) -> dict[str, Any]:
    from google.api_core import exceptions as gexc
    from google.cloud.storage.exceptions import DataCorruption

    uri = _object_uri(bucket.name, name)
    local = file_digest(path)
    try:
        existing = bucket.get_blob(name)
    except gexc.GoogleAPICallError as e:
        raise _gcs_error(e, uri, "looking up") from e

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
            blob.upload_from_file(_wrap(f, bar, "read"), size=local.size, if_generation_match=precondition)
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
        raise _gcs_error(e, uri, f"uploading {path} to") from e

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


def _entry(name: str, uri: str, d: Digest, generation, status: str) -> dict[str, Any]:
    return {"name": name, "uri": uri, "size": d.size, "md5": d.md5_hex, "md5_base64": d.md5_base64,
            "crc32c": d.crc32c_base64, "crc32c_hex": d.crc32c_hex, "generation": int(generation),
            "status": status}


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
    with _progress(total, f"upload {uri}") as bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
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
        "files": entries,
    }
    if receipt_path is not None:
        atomic_write_json(receipt_path, receipt)
        log.info("receipt written to %s", receipt_path)
    return receipt


# ---------------------------------------------------------------- receipt and download


def load_receipt(receipt_path: str | Path) -> dict[str, Any]:
    path = Path(receipt_path)
    try:
        receipt = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise HandoffError(f"handoff receipt {path} does not exist; run the upload step (handoff-upload) first") from e
    except (OSError, ValueError) as e:
        raise HandoffError(f"handoff receipt {path} is unreadable or not JSON ({e}); rerun the upload step") from e
    if not isinstance(receipt, dict) or not isinstance(receipt.get("files"), list):
        raise HandoffError(f"handoff receipt {path} has no 'files' list; rerun the upload step to rewrite it")
    for i, entry in enumerate(receipt["files"]):
        missing = [k for k in ("name", "uri", "size", "md5_base64", "crc32c", "generation") if k not in entry]
        if missing:
            raise HandoffError(f"handoff receipt {path}: files[{i}] lacks key(s) {missing}; rerun the upload step")
    return receipt


def receipt_entry(receipt: dict[str, Any], name: str, receipt_path: str | Path = "receipt") -> dict[str, Any]:
    for entry in receipt["files"]:
        if entry["name"] == name:
            return entry
    have = [e["name"] for e in receipt["files"]]
    raise HandoffError(f"handoff receipt {receipt_path} has no file named '{name}' (it has {have})")


def verify_local(receipt_path: str | Path, name: str, path: str | Path) -> dict[str, Any]:
    """Raise HandoffError unless `path` matches the receipt's size, md5 and crc32c for `name`."""
    entry = receipt_entry(load_receipt(receipt_path), name, receipt_path)
    path = Path(path)
    if not path.is_file():
        raise HandoffError(f"local copy {path} of {entry['uri']} is missing; run handoff-download")
    if diff := _mismatch(file_digest(path), entry_digest(entry)):
        raise HandoffError(f"local copy {path} does not match receipt {receipt_path} for {entry['uri']}: "
                           f"local vs receipt: {'; '.join(diff)}; delete it and rerun handoff-download")
    return entry


def download_verified(receipt_path: str | Path, name: str, dest: str | Path, *, client=None) -> dict[str, Any]:
    """Fetch the receipt's generation of `name` to `dest`, verified; return the entry plus status.

    status: 'up_to_date' (dest already matched; nothing fetched) or 'downloaded'.
    """
    from google.api_core import exceptions as gexc

    from trainer.ops import gcs_emulator

    receipt = load_receipt(receipt_path)
    entry = receipt_entry(receipt, name, receipt_path)
    want = entry_digest(entry)
    dest = Path(dest)
    if dest.is_file():
        diff = _mismatch(file_digest(dest), want)
        if not diff:
            log.info("%s already matches receipt %s; nothing to download", dest, receipt_path)
            return {**entry, "status": "up_to_date"}
        log.warning("local copy %s differs from receipt (local vs receipt: %s); downloading it again",
                    dest, "; ".join(diff))

    client = client or gcs_emulator.storage_client()
    bucket_name, obj = parse_gs_uri(entry["uri"])
    generation = int(entry["generation"])
    # Pinning the generation reads exactly the bytes the receipt describes; a replaced object 404s.
    blob = client.bucket(bucket_name).blob(obj, generation=generation)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f, _progress(want.size, f"download {name}") as bar:
                blob.download_to_file(_wrap(f, bar, "write"), if_generation_match=generation, checksum=None)
                f.flush()
                os.fsync(f.fileno())
        except (gexc.NotFound, gexc.PreconditionFailed) as e:
            raise _changed_object_error(client, bucket_name, obj, entry, receipt_path) from e
        except gexc.GoogleAPICallError as e:
            raise _gcs_error(e, entry["uri"], "downloading") from e
        got = file_digest(tmp)
        if diff := _mismatch(got, want):
            raise HandoffError(
                f"download of {entry['uri']} (generation {generation}) to {dest} does not match receipt "
                f"{receipt_path}: downloaded vs receipt: {'; '.join(diff)}. The object or the transfer is "
                "corrupt; nothing was written. Rerun the download; if it persists, rerun the upload with "
                f"overwrite ({OVERWRITE_HINT})")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("%s -> %s (generation %d, md5 %s, crc32c %s verified)", entry["uri"], dest, generation,
             want.md5_hex, want.crc32c_base64)
    return {**entry, "status": "downloaded"}


def _changed_object_error(client, bucket_name: str, obj: str, entry: dict, receipt_path) -> HandoffError:
    uri = entry["uri"]
    current = client.bucket(bucket_name).get_blob(obj)
    was = f"generation {entry['generation']} ({entry_digest(entry).describe()})"
    if current is None:
        return HandoffError(f"{uri} no longer exists (receipt {receipt_path} recorded {was}); rerun the upload step")
    return HandoffError(
        f"{uri} changed after receipt {receipt_path} was written: receipt has {was}, GCS now has generation "
        f"{current.generation} ({blob_digest(current).describe()}). Rerun the upload step to refresh the receipt "
        "if the new object is intended")


# ---------------------------------------------------------------- CLI


def _client_for(emulator_root: str | None):
    from trainer.ops import gcs_emulator

    if emulator_root:
        return gcs_emulator.storage_client(gcs_emulator.ensure_running(emulator_root))
    return gcs_emulator.storage_client()


def main(argv: list[str]) -> int:
    from trainer.cli import base_parser
    from trainer.io_utils import setup_logging

    command, rest = argv[0], argv[1:]
    emu_help = "use the local GCS emulator serving DIR (started if needed) instead of real GCS"
    if command == "handoff-upload":
        p = base_parser(command, "upload files to GCS without clobbering, verify checksums, write a receipt")
        p.add_argument("--files", nargs="+", required=True, help="local files; objects are named by basename")
        p.add_argument("--uri", required=True, help="destination prefix, gs://BUCKET/PREFIX")
        p.add_argument("--receipt", required=True, help="receipt JSON to write (e.g. handoff/office/gcs_copy.json)")
        p.add_argument("--overwrite", action="store_true", help="replace existing objects whose content differs")
        p.add_argument("--workers", type=int, default=4, help="parallel uploads (default 4)")
        p.add_argument("--chunk-mib", type=int, default=None, help="resumable upload chunk size in MiB")
        p.add_argument("--emulator-root", default=None, metavar="DIR", help=emu_help)
        args = p.parse_args(rest)
        setup_logging(args.log)
        receipt = upload_files(args.files, args.uri, args.overwrite, args.workers,
                               client=_client_for(args.emulator_root), receipt_path=args.receipt,
                               chunk_size_mib=args.chunk_mib)
        for e in receipt["files"]:
            print(f"{e['status']:>17}  {e['uri']}  md5={e['md5']} crc32c={e['crc32c']} gen={e['generation']}")
        return 0

    p = base_parser(command, "download files named in a handoff receipt and verify their checksums")
    p.add_argument("--receipt", required=True, help="receipt JSON written by handoff-upload")
    p.add_argument("--name", required=True, nargs="+", help="file name(s) in the receipt, e.g. sft_state_rl_last.msgpack")
    p.add_argument("--dest", required=True, help="local path to write (a directory when several names are given)")
    p.add_argument("--emulator-root", default=None, metavar="DIR", help=emu_help)
    args = p.parse_args(rest)
    setup_logging(args.log)
    receipt = load_receipt(args.receipt)
    if receipt.get("emulator") and not args.emulator_root and not os.environ.get("STORAGE_EMULATOR_HOST"):
        raise HandoffError(f"receipt {args.receipt} was written against the local GCS emulator "
                           f"({receipt.get('endpoint')}); pass --emulator-root DIR to read from it")
    if args.emulator_root and receipt.get("emulator") is False:
        raise HandoffError(f"receipt {args.receipt} points at real GCS ({receipt.get('endpoint')}); "
                           "drop --emulator-root to download from it")
    client = _client_for(args.emulator_root)
    for name in args.name:
        dest = Path(args.dest) / name if len(args.name) > 1 else Path(args.dest)
        result = download_verified(args.receipt, name, dest, client=client)
        print(f"{result['status']}: {result['uri']} -> {dest}")
    return 0
