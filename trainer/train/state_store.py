"""Durable train states: where a killed or preempted run resumes from, on this host or a new one.

A store is a location, a local directory or `gs://BUCKET/PREFIX` (`train.checkpoint.dir`; default
`<output_dir>/state`), holding one sub-location per training configuration (its digest) with
`train_state.msgpack` and `metrics.jsonl`, the log lines that state covers. Every write is atomic:
locally a temporary file renamed into place, on GCS one object upload (an object becomes visible
only once complete). Only process 0 writes; `AsyncWriter` does the serialization and the write on a
background thread, so a training step waits only for the (collective) gather of the state to host.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from trainer.errors import CheckpointError
from trainer.io_utils import atomic_write_bytes

log = logging.getLogger("trainer")
STATE, METRICS = "train_state.msgpack", "metrics.jsonl"


class LocalStore:
    def __init__(self, root: str | Path, digest: str):
        self.root = Path(root)
        self.dir = self.root / digest
        self.where = str(self.dir)

    def read(self, name: str) -> bytes | None:
        path = self.dir / name
        return path.read_bytes() if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.dir / name, data)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class GcsStore:
    """Objects under gs://BUCKET/PREFIX/DIGEST/ through google-cloud-storage (honours STORAGE_EMULATOR_HOST)."""

    def __init__(self, uri: str, digest: str):
        from trainer.ops.handoff import parse_gs_uri

        bucket, prefix = parse_gs_uri(uri)
        self.prefix = prefix.strip("/")
        if not self.prefix:  # clear() removes everything under the prefix
            raise CheckpointError(f"train.checkpoint.dir={uri}: give a prefix inside the bucket, e.g. "
                                  f"gs://{bucket}/sidrl/train_state")
        self.bucket_name = bucket
        self.dir = f"{self.prefix}/{digest}"
        self.where = f"gs://{bucket}/{self.dir}"
        self._bucket = None

    @property
    def bucket(self):
        """Created on first use: followers build the store too but never touch GCS."""
        if self._bucket is None:
            from trainer.ops.gcs_emulator import storage_client

            self._bucket = storage_client().bucket(self.bucket_name)
        return self._bucket

    def _error(self, e: Exception, action: str, name: str) -> CheckpointError:
        return CheckpointError(f"{self.where}/{name}: cannot {action} the train state ({type(e).__name__}: {e}); "
                               "check train.checkpoint.dir and this host's GCS credentials")

    def read(self, name: str) -> bytes | None:
        from google.api_core import exceptions as gexc

        try:
            return self.bucket.blob(f"{self.dir}/{name}").download_as_bytes()
        except gexc.NotFound:
            return None
        except Exception as e:
            raise self._error(e, "read", name) from e

    def write(self, name: str, data: bytes) -> None:
        try:
            self.bucket.blob(f"{self.dir}/{name}").upload_from_string(data, content_type="application/octet-stream")
        except Exception as e:
            raise self._error(e, "write", name) from e

    def clear(self) -> None:
        for blob in self.bucket.list_blobs(prefix=f"{self.prefix}/"):
            blob.delete()


def open_store(location: str | Path, digest: str):
    if str(location).startswith("gs://"):
        return GcsStore(str(location), digest)
    return LocalStore(location, digest)


class AsyncWriter:
    """Process 0's background writer: at most one save in flight; a failed save fails the next call."""

    def __init__(self, store):
        self.store = store
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _write(self, files: list[tuple[str, Callable[[], bytes]]], what: str) -> None:
        try:
            t, size = time.time(), 0
            for name, make in files:  # in order: the train state last, once what it refers to is there
                data = make()
                self.store.write(name, data)
                size += len(data)
            log.info("%s saved to %s (%.1f MB, %.2f s in the background)", what, self.store.where, size / 1e6,
                     time.time() - t)
        except BaseException as e:  # re-raised on the training thread
            self._error = e

    def submit(self, files: list[tuple[str, Callable[[], bytes]]], what: str) -> None:
        """Write `files` (name, bytes producer) in order on the background thread."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(files, what), name="train-state-writer",
                                        daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e


class Schedule:
    """When to save: every `every_steps` steps and at least every `every_minutes` minutes (0 = off).

    Every process must agree (saving gathers the state, a collective), so process 0's clock decides."""

    def __init__(self, every_steps: int, every_minutes: float):
        self.every_steps = int(every_steps)
        self.every_s = float(every_minutes) * 60
        self.last = time.monotonic()

    def due(self, done: int, steps: int) -> bool:
        if done >= steps:
            return False  # the final outputs follow at once
        by_steps = self.every_steps > 0 and done % self.every_steps == 0
        by_time = False
        if self.every_s > 0 and not by_steps:
            from trainer.train import distributed

            late = time.monotonic() - self.last >= self.every_s
            by_time = bool(distributed.broadcast_scalar(np.int32(late)))
        if by_steps or by_time:
            self.last = time.monotonic()
        return by_steps or by_time
