"""GCS plumbing shared by upload and download: gs:// URIs, progress bars, error messages."""
from __future__ import annotations

from trainer.errors import HandoffError

OVERWRITE_HINT = "set `handoff.overwrite: true` in the workflow config (or pass --overwrite)"


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b/' -> ('bucket', 'a/b'); the prefix may be empty."""
    if not uri.startswith("gs://") or len(uri) <= 5 or uri[5] == "/":
        raise HandoffError(f"GCS URI '{uri}' must look like gs://BUCKET/PREFIX (e.g. gs://my-bucket/rl/office)")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def object_uri(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{name}"


def is_emulator(client) -> bool:
    return "googleapis.com" not in (client.api_endpoint or "")


def progress(total: int, desc: str):
    from tqdm import tqdm

    # disable=None: bars only on a terminal, never in Snakemake log files.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


def wrap(stream, bar, method: str):
    from tqdm.utils import CallbackIOWrapper

    return CallbackIOWrapper(bar.update, stream, method)


def gcs_error(e: Exception, uri: str, action: str) -> HandoffError:
    from google.api_core import exceptions as gexc

    if isinstance(e, gexc.Forbidden):
        hint = "check that your credentials may access this bucket (`gcloud auth application-default login`)"
    elif isinstance(e, gexc.NotFound):
        hint = "check that the bucket exists and the URI is spelled right"
    else:
        hint = "check the network/endpoint and rerun; completed files are skipped on rerun"
    return HandoffError(f"{action} {uri} failed: {e}; {hint}")

