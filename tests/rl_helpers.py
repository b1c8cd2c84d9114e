"""Shared fixtures of the RL tests: a tiny synthetic dataset and a quick (under-trained) SFT
checkpoint, built once per pytest process, plus helpers to run `python -m trainer rl` on 1..N
local processes (followers in empty directories) and to read what a run wrote.

Import the fixture into a test module with `from tests.rl_helpers import rl_base  # noqa: F401`.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "config/trainer/demo/base.yaml"
RL_CONFIG = REPO / "config/trainer/demo/rl.yaml"
SFT_CONFIG = REPO / "config/trainer/demo/sft.yaml"

# Small enough for seconds of SFT on 2 cores, structured enough for RL to have something to learn.
DATA = {"num_items": 60, "num_users": 160, "num_groups": 4, "seed": 0}
SFT_SETS = ("sft.batch_size=32", "sft.checkpoint_every=100000",
            "sft.eval_samples=64", "sft.tasks=[next_item]")


@functools.cache
def build_base(root: str, sft_steps: int = 60) -> dict:
    """Dataset + SFT checkpoint under `root` (cached: built once per process and root).

    60 SFT steps leave the tiny model at its loss plateau (it has learned the SID format and the
    catalog, not yet to read the history): enough for the mechanics tests."""
    from trainer.train import sft
    from trainer.config import load_config
    from trainer.data.synthetic import generate

    root = Path(root)
    data = root / "data"
    generate(data, DATA["num_items"], DATA["num_users"], DATA["num_groups"], DATA["seed"])
    out = root / "sft"
    cfg = load_config([BASE_CONFIG, SFT_CONFIG], list(SFT_SETS) + [f"sft.steps={sft_steps}", f"sft.eval_every={sft_steps}",
                                                                    f"output_dir={out}"])
    sft.run(cfg, str(data))
    return {"data": data, "sft": out, "checkpoint": out / "sft_best.msgpack", "root": root}


@pytest.fixture(scope="session")
def rl_base(tmp_path_factory) -> dict:
    return build_base(str(tmp_path_factory.getbasetemp() / "rl_base"))


def rl_sets(base: dict, out: str | Path, *sets: str) -> list[str]:
    """--set overrides of an RL run from the base SFT checkpoint (later sets win)."""
    fixed = [f"output_dir={out}", f"init.checkpoint={base['checkpoint']}", f"tokenizer.path={base['sft']}"]
    return fixed + list(sets)


def rl_argv(base: dict, out: str | Path, *sets: str) -> list[str]:
    """`rl ...` argv (what `python -m trainer` takes), with the demo config files."""
    argv = ["rl", "--config", str(BASE_CONFIG), "--config", str(RL_CONFIG), "--data", str(base["data"])]
    for s in rl_sets(base, out, *sets):
        argv += ["--set", s]
    return argv


def run_rl_inprocess(base: dict, out: str | Path, *sets: str) -> dict:
    from trainer.config import load_config
    from trainer.rl import loop

    cfg = load_config([BASE_CONFIG, RL_CONFIG], rl_sets(base, out, *sets))
    return loop.run(cfg, str(base["data"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    for k in ("TRAINER_COORDINATOR", "TRAINER_NUM_PROCESSES", "TRAINER_PROCESS_ID"):
        e.pop(k, None)
    e.update(extra)
    return e


def launch(argv: list[str], cwd: Path, follower_dirs: list[Path] = (), log_dir: Path | None = None,
           extra_env: dict | None = None) -> list:
    """Start process 0 (`python -m trainer ARGV` in cwd) and one `follow` per follower dir.

    Returns the Popen objects, process 0 first; output goes to log_dir/p{i}.log (default cwd).
    """
    n = 1 + len(follower_dirs)
    log_dir = Path(log_dir or cwd)
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = {}
    if n > 1:
        cluster = {"TRAINER_COORDINATOR": f"127.0.0.1:{free_port()}", "TRAINER_NUM_PROCESSES": str(n)}
    procs = []
    for i, (d, args) in enumerate([(cwd, argv)] + [(f, ["follow"]) for f in follower_dirs]):
        extra = dict(cluster, TRAINER_PROCESS_ID=str(i)) if n > 1 else {}
        extra.update(extra_env or {})
        with open(log_dir / f"p{i}.log", "w") as logf:
            procs.append(subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=d, env=env(**extra),
                                          stdout=logf, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list, timeout: float, log_dir: Path) -> None:
    """Wait for every process; on failure or timeout kill the rest and show process 0's log."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes is None or any(codes):
        logs = "\n".join(f"--- p{i}.log\n" + _tail(log_dir / f"p{i}.log") for i in range(len(procs)))
        pytest.fail(f"exit codes {codes} (None: timeout after {timeout}s)\n{logs}")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def load_params(path: Path) -> dict[str, np.ndarray]:
    """Flat {key/path: array} of a msgpack params file."""
    from trainer.model.checkpoint import _flatten, read_checkpoint

    return {k: np.asarray(v) for k, v in _flatten(read_checkpoint(path)[0]).items()}


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l]


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "run_summary.json").read_text())
