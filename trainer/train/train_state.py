"""Resumable training: data order as a function of step, and train-state checkpoints.

The state holds params, optimizer state and progress together, so a kill can never pair new
params with an old step. Data order and RNG keys derive from (seed, step), so nothing else needs
saving for an exact replay. States live in a durable store (trainer.train.state_store):
`train.checkpoint.dir` (GCS in the TPU profile) or `<output_dir>/state`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from trainer.io_utils import atomic_write_text
from trainer.model import checkpoint
from trainer.train.state_store import METRICS, STATE, AsyncWriter, Schedule, open_store

log = logging.getLogger("trainer")


# Keys that do not change what training computes; everything else must match to resume.
_NOT_TRAINING = ("output_dir", "wandb", "eval", "crosscheck")


def config_digest(cfg: dict) -> str:
    """Identity of a training configuration: a rerun with another config (more steps, another
    learning rate) starts fresh instead of resuming someone else's state."""
    relevant = {k: v for k, v in cfg.items() if k not in _NOT_TRAINING}
    relevant["train"] = {k: v for k, v in cfg["train"].items() if k != "checkpoint"}  # where/how often: not what
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def clear(out_dir: str | Path) -> None:
    """Drop resumable states, and the outputs an earlier run left aside, once this run's final
    outputs are written."""
    shutil.rmtree(Path(out_dir) / "state", ignore_errors=True)
    shutil.rmtree(Path(out_dir) / PREVIOUS_DIR, ignore_errors=True)


PREVIOUS_DIR = "previous"
SUMMARY_FILE = "run_summary.json"  # written last by every run: its presence marks finished outputs
_RETIRED = "retired"  # in previous/: every output of the earlier run has been moved there


def retire_outputs(out_dir: str | Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Process 0, first thing in a run: move a finished earlier run's outputs to OUT/previous/.

    A kill of this run can then never leave the earlier outputs looking like its own, and they are
    kept (not deleted) until this run's outputs are complete. Outputs count as a finished run only
    beside their run_summary.json, so it moves first; `previous/retired` marks the move complete,
    so a kill in between is completed by the next start, and files this run writes later (a kill
    while it wrote its final outputs) are never taken for the earlier run's."""
    out = Path(out_dir)
    prev = out / PREVIOUS_DIR
    if (prev / _RETIRED).is_file():
        return []
    if (out / SUMMARY_FILE).is_file():
        prev.mkdir(parents=True, exist_ok=True)
        os.replace(out / SUMMARY_FILE, prev / SUMMARY_FILE)  # from here on nothing in OUT looks finished
    elif not (prev / SUMMARY_FILE).is_file():
        return []  # no finished earlier run here
    moved = [n for n in names if (out / n).is_file()]
    for name in moved:
        os.replace(out / name, prev / name)
    atomic_write_text(prev / _RETIRED, "")
    log.info("moved the previous run's outputs to %s before starting", prev)
    return moved


def store_for(out_dir: str | Path, cfg: dict):
    """The durable store of this run's train states (see trainer.train.state_store)."""
    location = cfg["train"]["checkpoint"]["dir"] or Path(out_dir) / "state"
    return open_store(location, config_digest(cfg))


def save_async(writer: AsyncWriter, host_state: dict, metrics_text: str, before: tuple = ()) -> None:
    """Process 0: write `before` (name, bytes producer) pairs, the log lines, then the state."""
    files = [*before, (METRICS, metrics_text.encode), (STATE, lambda: checkpoint.train_state_bytes(host_state))]
    writer.submit(files, f"train state of step {int(host_state['step'])}")


def schedule(every_steps: int, cfg: dict) -> Schedule:
    return Schedule(every_steps, cfg["train"]["checkpoint"]["every_minutes"])


def batch_rows(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of a global batch: a fresh permutation each epoch, a pure function of step."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size:(pos + 1) * batch_size]


def to_host(params, opt_state, step: int, extra: dict | None = None) -> dict | None:
    """The state as host numpy arrays on process 0, None elsewhere (every process must call it:
    sharded arrays are gathered one at a time, see checkpoint.host_tree_on_main)."""
    extra = {k: np.float64(v) for k, v in (extra or {}).items()}
    host = checkpoint.host_tree_on_main({"params": params, "opt_state": opt_state})
    return None if host is None else {**host, "step": np.int64(step), "extra": extra}


def load(store, params, opt_state, extra_keys: tuple[str, ...] = ()) -> dict | None:
    """Process 0 only: the latest state in `store`, or None. The template is built from shapes,
    so no collective is involved."""
    data = store.read(STATE)
    if data is None:
        return None
    zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)
    template = {"params": zeros(params), "opt_state": zeros(opt_state), "step": np.int64(0),
                "extra": {k: np.float64(0) for k in extra_keys}}
    return checkpoint.train_state_from_bytes(data, template, f"{store.where}/{STATE}")


def resume(store, params, opt_state, extra_keys: tuple[str, ...] = ()):
    """Every process: (params, opt_state, step, extra) from the latest state in `store`, placed like
    the live params/opt_state, or None when there is none. Process 0 reads the store; the arrays
    reach the others one at a time (distributed.broadcast_arrays), never as a pickled tree."""
    from trainer.train import distributed

    kept = {}

    def read():
        host = load(store, params, opt_state, extra_keys)
        if host is None:
            return None
        kept["arrays"] = {"params": host["params"], "opt_state": host["opt_state"]}
        return int(host["step"]), {k: float(v) for k, v in host["extra"].items()}

    meta = distributed.on_main(read)
    if meta is None:
        return None
    live = {"params": params, "opt_state": opt_state}
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), live)
    arrays = distributed.broadcast_arrays(kept.get("arrays"), template, jax.tree.map(lambda x: x.sharding, live))
    return arrays["params"], arrays["opt_state"], meta[0], meta[1]
