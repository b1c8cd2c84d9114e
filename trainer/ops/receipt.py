"""Checksums and the handoff receipt: one source of truth per digest.

A receipt entry carries each digest in two spellings (md5 hex + md5_base64, crc32c base64 +
crc32c_hex). `load_receipt` accepts a receipt only when every spelling decodes and agrees with the
other one, so no check can pass on one spelling while a user reads a different value in the other.
`verify_local` checks a local file's size, md5 and crc32c against the entry.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

from trainer.errors import HandoffError

RECEIPT_VERSION = 1
_READ_CHUNK = 4 << 20
_REQUIRED = ("name", "uri", "size", "md5_base64", "crc32c", "generation")


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



def _entry(name: str, uri: str, d: Digest, generation, status: str) -> dict[str, Any]:
    return {"name": name, "uri": uri, "size": d.size, "md5": d.md5_hex, "md5_base64": d.md5_base64,
            "crc32c": d.crc32c_base64, "crc32c_hex": d.crc32c_hex, "generation": int(generation),
            "status": status}


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
        if not isinstance(entry, dict):
            raise HandoffError(f"handoff receipt {path}: files[{i}] is not an object; rerun the upload step")
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise HandoffError(f"handoff receipt {path}: files[{i}] lacks key(s) {missing}; rerun the upload step")
        if problems := _entry_problems(entry):
            raise HandoffError(f"handoff receipt {path}: files[{i}] ({entry.get('name')}): {'; '.join(problems)}. "
                               "The receipt was edited or damaged; rerun the upload step to rewrite it")
    return receipt


def _decoded(text: Any, nbytes: int) -> bytes | None:
    """The bytes of a base64 digest of `nbytes` bytes, or None when it is not one."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == nbytes else None


def _entry_problems(entry: dict[str, Any]) -> list[str]:
    """Each digest must decode, and its two spellings (when both are present) must agree."""
    problems = []
    size, generation = entry["size"], entry["generation"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        problems.append(f"size {size!r} is not a byte count")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        problems.append(f"generation {generation!r} is not a GCS generation number")
    for label, b64_key, hex_key, nbytes in (("md5", "md5_base64", "md5", 16), ("crc32c", "crc32c", "crc32c_hex", 4)):
        raw = _decoded(entry[b64_key], nbytes)
        if raw is None:
            problems.append(f"{b64_key} {entry[b64_key]!r} is not a base64 {label} ({nbytes} bytes)")
        elif hex_key in entry and str(entry[hex_key]).lower() != raw.hex():
            problems.append(f"{hex_key} {entry[hex_key]!r} disagrees with {b64_key} {entry[b64_key]!r} "
                            f"(= {label} {raw.hex()})")
    return problems


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

