"""A job placed on a TPU slice that finds no TPU stops with an error naming the slice, before it
reads anything (trainer.train.distributed.check_backend; the tpu-vm executor sets the variables)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _trainer(env: dict, *argv: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    return subprocess.run([sys.executable, "-m", "trainer", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env}, timeout=300)


def test_job_expecting_a_tpu_on_a_cpu_host_stops_with_a_clear_error(tmp_path):
    env = {"TRAINER_EXPECT_BACKEND": "tpu", "TRAINER_ACCELERATOR": "slice 'eval' (v6e-8)"}
    proc = _trainer(env, "eval", "--checkpoint", str(tmp_path / "nope.msgpack"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "error: slice 'eval' (v6e-8) expects JAX backend 'tpu' but JAX found 'cpu'" in proc.stderr
    assert "jax[tpu]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    # Without the expectation the same command gets as far as the missing checkpoint.
    proc = _trainer({}, "eval", "--checkpoint", str(tmp_path / "nope.msgpack"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "expects JAX backend" not in proc.stderr
