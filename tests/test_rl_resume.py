"""Kill -9 in the middle of an RL run, rerun the same command: it resumes from the last
train-state checkpoint and ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import glob
import signal
import time
from pathlib import Path

import pytest

from tests.rl_helpers import (launch, load_params, max_param_diff, metrics_rows, rl_argv, rl_base,  # noqa: F401
                              run_rl_inprocess, summary, wait_all)

STEPS = 12
SETS = (f"steps={STEPS}", "checkpoint_every_steps=2", "rollout.batch_size=4", "rollout.n=4",
        "train.optimizer.lr_schedule.peak_value=1e-3")


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_kill_and_rerun_resumes_to_the_same_params(tmp_path, rl_base):  # noqa: F811
    out = tmp_path / "run"
    argv = rl_argv(rl_base, out, *SETS)
    (proc,) = launch(argv, tmp_path, log_dir=tmp_path / "first")
    deadline = time.time() + 300
    # Kill once a checkpoint exists AND a step past it was logged: the rerun must redo that step.
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(str(out / "state/*/train_state.msgpack")) and _logged_steps(out) >= 3:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the run ended (rc={proc.returncode}) before it could be killed mid-run:\n"
                    + (tmp_path / "first/p0.log").read_text()[-3000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _logged_steps(out)
    assert 3 <= killed_at < STEPS
    assert not (out / "sft_state_rl_last.msgpack").exists() and not (out / "run_summary.json").exists()

    wait_all(launch(argv, tmp_path, log_dir=tmp_path / "second"), 600, tmp_path / "second")
    log = (tmp_path / "second/p0.log").read_text()
    resumed = summary(out)["resumed_from_step"]
    assert resumed > 0 and resumed % 2 == 0 and resumed <= killed_at
    assert f"resuming RL from step {resumed}" in log
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, STEPS + 1))  # every step exactly once
    assert not (out / "state").exists()  # train states are dropped once the final outputs exist

    ref = tmp_path / "uninterrupted"
    run_rl_inprocess(rl_base, ref, *SETS)
    assert max_param_diff(load_params(out / "sft_state_rl_last.msgpack"),
                          load_params(ref / "sft_state_rl_last.msgpack")) <= 1e-6
    # the replayed steps logged the same metrics as the uninterrupted run
    for a, b in zip(metrics_rows(out), metrics_rows(ref)):
        assert a["step"] == b["step"] and a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
