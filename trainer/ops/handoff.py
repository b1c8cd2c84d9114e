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

Modules: trainer/ops/upload.py (upload + receipt), download.py (verified download), receipt.py
(checksums, receipt reading and its consistency), gcs_io.py (URIs, progress, error messages).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from trainer.errors import HandoffError
from trainer.ops.download import download_verified
from trainer.ops.gcs_io import OVERWRITE_HINT, is_emulator, parse_gs_uri
from trainer.ops.receipt import Digest, file_digest, load_receipt, receipt_entry, verify_local
from trainer.ops.upload import upload_files

__all__ = ["Digest", "OVERWRITE_HINT", "download_verified", "file_digest", "is_emulator", "load_receipt",
           "parse_gs_uri", "receipt_entry", "upload_files", "verify_local"]


@contextlib.contextmanager
def _client_for(emulator_root: str | None) -> Iterator[Any]:
    """A storage client for the command's duration; with an emulator root, the emulator is held
    (started if needed) while the command runs and stopped when its last holder ends."""
    from trainer.ops import gcs_emulator

    if not emulator_root:
        yield gcs_emulator.storage_client()
        return
    with gcs_emulator.serving(emulator_root) as endpoint:
        yield gcs_emulator.storage_client(endpoint)


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
        with _client_for(args.emulator_root) as client:
            receipt = upload_files(args.files, args.uri, args.overwrite, args.workers, client=client,
                                   receipt_path=args.receipt, chunk_size_mib=args.chunk_mib)
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
    with _client_for(args.emulator_root) as client:
        for name in args.name:
            dest = Path(args.dest) / name if len(args.name) > 1 else Path(args.dest)
            try:
                result = download_verified(args.receipt, name, dest, client=client)
            except HandoffError:
                if args.emulator_root:  # objects the emulator cannot see: name that cause instead
                    from trainer.ops.emulator_xattrs import check_object_metadata

                    check_object_metadata(Path(args.emulator_root) / "data")
                raise
            print(f"{result['status']}: {result['uri']} -> {dest}")
    return 0
