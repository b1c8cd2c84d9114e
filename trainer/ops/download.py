"""Download of a receipt's exact object generation to a local file, verified before it appears.

The bytes go to a temporary file next to the destination (mode like every other output),
are checked against the receipt's size, md5 and crc32c, and only then renamed into place.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.errors import HandoffError
from trainer.io_utils import atomic_file
from trainer.ops.gcs_io import OVERWRITE_HINT, gcs_error, parse_gs_uri, progress, wrap
from trainer.ops.receipt import _mismatch, blob_digest, entry_digest, file_digest, load_receipt, receipt_entry

log = logging.getLogger("trainer")


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
    with atomic_file(dest, suffix=".part") as (f, tmp):
        try:
            with progress(want.size, f"download {name}") as bar:
                blob.download_to_file(wrap(f, bar, "write"), if_generation_match=generation, checksum=None)
            f.flush()
        except (gexc.NotFound, gexc.PreconditionFailed) as e:
            raise _changed_object_error(client, bucket_name, obj, entry, receipt_path) from e
        except gexc.GoogleAPICallError as e:
            raise gcs_error(e, entry["uri"], "downloading") from e
        if diff := _mismatch(file_digest(tmp), want):
            raise HandoffError(
                f"download of {entry['uri']} (generation {generation}) to {dest} does not match receipt "
                f"{receipt_path}: downloaded vs receipt: {'; '.join(diff)}. The object or the transfer is "
                "corrupt; nothing was written. Rerun the download; if it persists, rerun the upload with "
                f"overwrite ({OVERWRITE_HINT})")
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

