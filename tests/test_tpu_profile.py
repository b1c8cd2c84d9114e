"""The whole workflow through the Cloud TPU profile, offline (issue 6).

`snakemake --profile profiles/tpu results/demo/metrics.json` against stand-ins for the cloud (see
tests/tpu_profile_helpers.py): the `tpu-vm` backend drives the fake `gcloud`, each TPU host runs in its
own directory with nothing shared, and Snakemake's default storage is GCS (fake-gcs-server through
snakemake-storage-plugin-gcs). SFT and RL run as 4 jax processes on the fake v6e-16; evaluation runs
on the fake v6e-8; the handoff rules use the trainer's own GCS client on the same emulator.

Needs snakemake-storage-plugin-gcs (in the `test` extra). Without it, or without git/bash/the
fake-gcs-server binary, the test skips; under CI (env CI set) it fails instead, so it cannot go
silently missing there.
"""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import tpu_profile_helpers as h

TARGET = "results/demo/metrics.json"
CHECKPOINTS = {"sft_best.msgpack", "sft_state_rl_last.msgpack"}


def _require_prerequisites():
    missing = h.missing_prerequisites()
    if missing:
        msg = "offline TPU-profile test needs " + "; ".join(missing)
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_logs(fake_root: Path, lines: int = 25) -> str:
    """Tails of every host's job logs, for a failure message."""
    parts = []
    for log in sorted(fake_root.glob("*/worker*/sidrl/logs/**/*.log")) + sorted(
            fake_root.glob("*/worker*/sidrl/.snakemake/storage/**/logs/**/*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        parts.append(f"--- {log.relative_to(fake_root)} ---\n{tail}")
    return "\n".join(parts)


def _exit_codes(host_home: Path, rule: str) -> list[str]:
    return [p.read_text().strip() for p in (host_home / "sidrl/logs").glob(f"sidrl-*-{rule}-*_worker*.exit")]


def test_tpu_profile_runs_demo_metrics_offline(tmp_path, gcs_emulator, gcs_client, gcs_uri):
    _require_prerequisites()
    checkout, fake_root = tmp_path / "sidrl", tmp_path / "tpus"
    storage, handoff, states = f"{gcs_uri}/workflow", f"{gcs_uri}/handoff", f"{gcs_uri}/train_state"
    sha = h.committed_checkout(checkout, {h.OVERLAY: h.slices_overlay(handoff, _free_port(), states)})
    # each host's ~/.env (the profile's env_file) points it at the emulator, as a real one would hold
    # credentials; and it holds a W&B key, which must appear in no log, summary or receipt
    wandb_key = "wandb-" + os.urandom(12).hex()
    host_env = {"STORAGE_EMULATOR_HOST": gcs_emulator.endpoint, "JAX_PLATFORMS": "cpu",
                "WANDB_API_KEY": wandb_key, "WANDB_MODE": "disabled"}
    h.make_fake_tpu(fake_root, h.TRAIN_TPU, "us-east5-b", 4, "v6e-16", host_env)
    h.make_fake_tpu(fake_root, h.EVAL_TPU, "europe-west4-a", 1, "v6e-8", host_env)

    t0 = time.monotonic()
    r = subprocess.run(h.snakemake_argv(storage, TARGET), cwd=checkout,
                       env=h.snakemake_env(fake_root, gcs_emulator.env, checkout),
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{out[-8000:]}\n{_host_logs(fake_root)}"
    print(f"offline TPU-profile run: {time.monotonic() - t0:.1f} s")

    # placement: training on the 4-host TPU VM, evaluation on the 1-host one, through gcloud
    assert f"(rl_train) -> slice 'train': v6e-16, 4 hosts, TPU VM {h.TRAIN_TPU} in us-east5-b" in out
    assert f"(sft) -> slice 'train': v6e-16, 4 hosts, TPU VM {h.TRAIN_TPU}" in out
    assert f"(evaluate) -> slice 'eval': v6e-8, 1 host, TPU VM {h.EVAL_TPU} in europe-west4-a" in out

    # every artifact lives in the default storage (the emulator bucket) ...
    objects = set(h.object_names(gcs_client, storage))
    for name in (TARGET, "data/demo/train.csv", "runs/demo/sft/sft_best.msgpack", "runs/demo/rl/run_summary.json",
                 "handoff/demo/gcs_copy.json", "workdir/checkpoints/demo/sft_state_rl_last.msgpack",
                 "results/demo/sft/run_summary.json", "results/demo/plots/rl_curves.png"):
        assert name in objects, f"{name} not in {storage}: {sorted(objects)}"
    # ... and none on the machine running Snakemake: no artifact directories, and in its storage cache
    # (kept: --keep-storage-local-copies) only small JSON, CSV, text, logs and plots, never a checkpoint byte
    assert not [d for d in ("data", "runs", "results", "handoff", "workdir") if (checkout / d).exists()]
    assert h.files_named(checkout, CHECKPOINTS) == [] and not list(checkout.rglob("*.msgpack"))
    cached = [p for p in (checkout / ".snakemake/storage").rglob("*") if p.is_file()]
    assert any(p.name == "gcs_copy.json" for p in cached)  # the receipt did come here, for metrics
    assert {p.suffix for p in cached} <= {".json", ".jsonl", ".csv", ".txt", ".png", ".log", ".tsv"}, cached
    assert max(p.stat().st_size for p in cached) < 2 << 20

    # the handoff ran on the hosts: gcs_copy on the train slice's host 0, eval_copy on the eval host
    receipt = h.read_json_object(gcs_client, f"{storage}/handoff/demo/gcs_copy.json")
    assert {k: receipt["uploaded_from"][k] for k in ("tpu_vm", "worker", "slice")} == {
        "tpu_vm": h.TRAIN_TPU, "worker": 0, "slice": "train"}
    assert _exit_codes(fake_root / h.TRAIN_TPU / "worker0", "gcs_copy") == ["0"]
    assert _exit_codes(fake_root / h.EVAL_TPU / "worker0", "eval_copy") == ["0"]
    # training kept its resumable states in GCS while it ran, and dropped them at the end
    assert h.object_names(gcs_client, states) == []

    # SFT and RL ran as 4 jax processes; evaluation as 1 (read back from the bucket)
    rl_run = h.read_json_object(gcs_client, f"{storage}/runs/demo/rl/run_summary.json")
    sft_run = h.read_json_object(gcs_client, f"{storage}/runs/demo/sft/run_summary.json")
    rl_eval = h.read_json_object(gcs_client, f"{storage}/results/demo/rl/run_summary.json")
    assert rl_run["process_count"] == 4 and sft_run["process_count"] == 4
    assert rl_eval["process_count"] == 1
    assert rl_run["steps"] == 2  # --config overrides reached the trainer on the TPU host
    assert rl_run["config"]["train"]["checkpoint"]["dir"] == f"{states}/demo/rl"  # train_state.uri

    metrics = h.read_json_object(gcs_client, f"{storage}/{TARGET}")
    assert metrics["rl_training"]["process_count"] == 4 and metrics["crosscheck"]["passed"] is True
    prov = metrics["provenance"]
    # the checkpoint that was trained, uploaded by gcs_copy, downloaded by eval_copy and evaluated is one file
    assert prov["rl_last_md5"] == prov["eval_checkpoint_md5"] == prov["gcs"]["sft_state_rl_last.msgpack"]["md5"]
    assert prov["rl_init_checkpoint_md5"] == prov["sft_best_md5"]

    # handoff rules wrote through the trainer's GCS client to the same emulator, under handoff.uri
    assert receipt["emulator"] is True and receipt["uri"] == f"{handoff}/demo"
    assert "sft_state_rl_last.msgpack" in h.object_names(gcs_client, f"{handoff}/demo")

    # hosts: each checkout at the commit; host 0 of each slice ran the jobs; followers joined with no files
    train, evalvm = fake_root / h.TRAIN_TPU, fake_root / h.EVAL_TPU
    for home in [train / f"worker{w}" for w in range(4)] + [evalvm / "worker0"]:
        assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=home / "sidrl", capture_output=True,
                              text=True).stdout.strip() == sha
    for rule in ("sft", "rl_train"):
        assert sorted(_exit_codes(train / "worker0", rule) + sum(
            (_exit_codes(train / f"worker{w}", rule) for w in (1, 2, 3)), [])) == ["0"] * 4, rule
    for w in (1, 2, 3):
        follower = train / f"worker{w}"
        assert not (follower / "sidrl/.snakemake").exists()
        assert h.files_named(follower, CHECKPOINTS | {"train.csv"}) == []
    assert _exit_codes(evalvm / "worker0", "evaluate") == ["0", "0"]  # rl and sft

    # the W&B key (CRLF env file) is in no log, summary, receipt or output, here, on a host or in the bucket
    assert h.files_containing([tmp_path, gcs_emulator.root], wandb_key.encode(), {".env"}) == []

    # the bucket is the workflow's state: a second invocation finds everything up to date
    again = subprocess.run(h.snakemake_argv(storage, TARGET, "--dry-run"), cwd=checkout,
                           env=h.snakemake_env(fake_root, gcs_emulator.env, checkout),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr


def test_configfile_overlays_must_be_in_the_synced_commit(tmp_path):
    """Host 0 reads --configfile overlays from its checkout: the executor refuses ones not committed."""
    from snakemake_executor_plugin_tpu.gitsync import git_state, paths_not_committed

    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path / "repo"
    (repo / "profiles").mkdir(parents=True)
    (repo / "profiles/committed.yaml").write_text("a: 1\n")
    h._git(repo, "init", "-q")
    h._git(repo, "add", "-A")
    h._git(repo, "commit", "-qm", "c")
    (repo / "profiles/untracked.yaml").write_text("b: 1\n")
    (repo / "staged.yaml").write_text("c: 1\n")
    h._git(repo, "add", "staged.yaml")
    (tmp_path / "outside.yaml").write_text("d: 1\n")
    state = git_state(str(repo))
    paths = [repo / "profiles/committed.yaml", repo / "profiles/untracked.yaml", repo / "staged.yaml",
             tmp_path / "outside.yaml"]
    assert paths_not_committed(state, paths) == [str(p) for p in paths[1:]]
