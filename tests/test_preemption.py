"""Preemption: every process of a 2-host RL job is killed mid-run and both hosts' directories are
wiped (a new VM). The rerun resumes from the train state in durable storage (fake-gcs-server,
`train.checkpoint.dir=gs://...`) and ends where an uninterrupted run ends."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.rl_helpers import (BASE_CONFIG, RL_CONFIG, launch, load_params, max_param_diff, metrics_rows,  # noqa: F401
                              rl_base, run_rl_inprocess, summary, wait_all)
from tests.tpu_profile_helpers import object_names

STEPS = 6
# SGD: the update is linear in the gradient, so 2 processes and 1 differ only by fp32 reduction order
SETS = (f"steps={STEPS}", "checkpoint_every_steps=2", "rollout.batch_size=4", "rollout.n=4",
        "train.optimizer.name=sgd", "train.optimizer.lr_schedule.peak_value=0.5")


def _fresh_hosts(tmp_path: Path, base: dict) -> tuple[Path, Path]:
    """Host 0 with its inputs (what its Snakemake job fetches), host 1 empty: nothing else survives."""
    p0, p1 = tmp_path / "host0", tmp_path / "host1"
    for d in (p0, p1):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    (p0 / "data").symlink_to(base["data"])
    (p0 / "sft").symlink_to(base["sft"])
    return p0, p1


def _argv(state_uri: str) -> list[str]:
    argv = ["rl", "--config", str(BASE_CONFIG), "--config", str(RL_CONFIG), "--data", "data",
            "--set", "output_dir=out", "--set", "init.checkpoint=sft/sft_best.msgpack", "--set", "tokenizer.path=sft",
            "--set", f"train.checkpoint.dir={state_uri}"]
    for s in SETS:
        argv += ["--set", s]
    return argv


def test_killed_job_on_wiped_hosts_resumes_from_gcs(tmp_path, rl_base, gcs_emulator, gcs_client, gcs_uri):  # noqa: F811
    state_uri = f"{gcs_uri}/train_state"
    argv, env = _argv(state_uri), gcs_emulator.env
    p0, p1 = _fresh_hosts(tmp_path, rl_base)
    procs = launch(argv, p0, [p1], tmp_path / "first", extra_env=env)
    deadline = time.time() + 300
    logged = lambda: len((p0 / "out/metrics.jsonl").read_text().splitlines()) if (p0 / "out/metrics.jsonl").exists() else 0
    # kill once a state is in GCS and a step past it was logged: the rerun must redo that step
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(n.endswith("/train_state.msgpack") for n in object_names(gcs_client, state_uri)) and logged() >= 3:
            break
        time.sleep(0.05)
    if any(p.poll() is not None for p in procs):
        pytest.fail("the run ended before it could be killed:\n" + (tmp_path / "first/p0.log").read_text()[-3000:])
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert logged() < STEPS and not (p0 / "out/sft_state_rl_last.msgpack").exists()

    p0, p1 = _fresh_hosts(tmp_path, rl_base)  # a new VM: local disks gone, GCS kept
    wait_all(launch(argv, p0, [p1], tmp_path / "second", extra_env=env), 600, tmp_path / "second")
    resumed = summary(p0 / "out")["resumed_from_step"]
    assert resumed > 0 and resumed % 2 == 0
    assert f"resuming RL from step {resumed} ({state_uri}/" in (tmp_path / "second/p0.log").read_text()
    assert [r["step"] for r in metrics_rows(p0 / "out")] == list(range(1, STEPS + 1))  # every step exactly once
    assert not list((p0 / "out").glob("state")) and not list(p1.iterdir())  # nothing local; the follower wrote nothing
    assert object_names(gcs_client, state_uri) == []  # states are dropped once the final outputs exist

    ref = tmp_path / "uninterrupted"
    run_rl_inprocess(rl_base, ref, *SETS)
    diff = max_param_diff(load_params(p0 / "out/sft_state_rl_last.msgpack"), load_params(ref / "sft_state_rl_last.msgpack"))
    assert diff <= 1e-6, diff  # test_rl_resume's tolerance
    assert max_param_diff(load_params(ref / "sft_state_rl_last.msgpack"), load_params(rl_base["checkpoint"])) > 1e-4
