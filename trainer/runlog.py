"""Per-step metrics: a jsonl file in the run directory and, optionally, Weights & Biases.

Only process 0 logs. W&B is on when `wandb.enabled` is true, or "auto" and WANDB_API_KEY is set;
the key is read by wandb from the environment and never written anywhere by us.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from trainer.io_utils import atomic_write_text


log = logging.getLogger("trainer")


class RunLog:
    def __init__(self, out_dir: str | Path, cfg: dict, active: bool, name: str, resume_step: int = 0,
                 saved: str | None = None):
        self.active = active
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Snakemake deletes a job's outputs before a rerun, so a resumed run takes the lines up to
        # its checkpoint from the copy `saved` with the train state; later lines are produced again.
        kept = [l for l in saved.splitlines() if l and json.loads(l).get("step", 0) <= resume_step] \
            if resume_step and saved else []
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))  # then appended line by line
        enabled = cfg["wandb"]["enabled"]
        if enabled is True or (enabled == "auto" and os.environ.get("WANDB_API_KEY")):
            try:
                import wandb
                self.wandb = wandb.init(project=cfg["wandb"]["project"], name=name, resume="allow",
                                        config={k: v for k, v in cfg.items() if k != "wandb"})
            except Exception as e:  # logging must never kill a training run
                log.warning("W&B logging disabled: %s", e)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def snapshot(self) -> str:
        """The lines logged so far, saved with a train-state checkpoint."""
        return self.path.read_text() if self.active else ""

    def history(self) -> list[dict]:
        if not self.active or not self.path.exists():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l]

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
