"""Optimizer builder on the `train.optimizer.*` schema (the runbook's pluggable optimizer).

Defaults reproduce the original hard-coded choice: Lion, clip 1.0, weight decay 1e-8, warmup +
cosine to a 1e-6 peak with 5% warmup.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import optax

from trainer.config import ConfigError

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "lion": lambda lr, wd: optax.lion(lr, weight_decay=wd),
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd),
    "sgd": lambda lr, wd: optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)),
}
SCHEDULES = ("warmup_cosine", "warmup_linear", "constant")


def build_schedule(sched: dict, total_steps: int) -> tuple[optax.Schedule, dict]:
    kind = sched["type"]
    if kind not in SCHEDULES:
        raise ConfigError(f"train.optimizer.lr_schedule.type: unknown '{kind}'; valid: {', '.join(SCHEDULES)}")
    peak = float(sched["peak_value"])
    if kind == "constant":
        return optax.constant_schedule(peak), {"type": kind, "peak_value": peak}
    warmup = sched["warmup_steps"]
    if warmup is None:  # HF TrainingArguments.get_warmup_steps rounds up
        warmup = math.ceil(total_steps * float(sched["warmup_ratio"]))
    warmup = max(0, min(int(warmup), total_steps))
    decay_steps = max(total_steps, warmup + 1)
    init, end = float(sched["init_value"]), float(sched["end_value"])
    if kind == "warmup_cosine":  # HF "cosine": linear warmup, then half a cosine to end_value
        fn = optax.warmup_cosine_decay_schedule(init_value=init, peak_value=peak, warmup_steps=warmup,
                                                decay_steps=decay_steps, end_value=end)
    else:  # HF "linear": linear warmup, then linear decay to end_value at the last step
        fn = optax.join_schedules([optax.linear_schedule(init, peak, max(warmup, 1)),
                                   optax.linear_schedule(peak, end, decay_steps - warmup)], [warmup])
    return fn, {"type": kind, "peak_value": peak, "warmup_steps": warmup, "decay_steps": decay_steps,
                "init_value": init, "end_value": end}


def build_optimizer(opt: dict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule, dict[str, Any]]:
    """Returns (tx, lr schedule, description of what was built for run_summary.json)."""
    name = opt["name"]
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer.name: unknown '{name}'; valid: {', '.join(OPTIMIZERS)}")
    schedule, sched_desc = build_schedule(opt["lr_schedule"], total_steps)
    parts = []
    clip = opt["clip_norm"]
    if clip is not None and float(clip) > 0:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(OPTIMIZERS[name](schedule, float(opt["weight_decay"])))
    desc = {"name": name, "clip_norm": clip, "weight_decay": float(opt["weight_decay"]),
            "lr_schedule": sched_desc, "total_steps": total_steps}
    return optax.chain(*parts), schedule, desc
