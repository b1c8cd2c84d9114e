"""trainer.train.optim: every optimizer name trains, LR schedules have the documented values, bad names fail."""
from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import optax
import pytest

from trainer.config import DEFAULTS, ConfigError
from trainer.train.optim import OPTIMIZERS, build_optimizer, build_schedule


def opt_cfg(**over) -> dict:
    cfg = copy.deepcopy(DEFAULTS["train"]["optimizer"])
    sched = over.pop("lr_schedule", {})
    cfg.update(over)
    cfg["lr_schedule"].update(sched)
    return cfg


def test_defaults_are_the_runbook_choice():
    _, _, desc = build_optimizer(opt_cfg(), total_steps=100)
    assert desc["name"] == "lion" and desc["clip_norm"] == 1.0 and desc["weight_decay"] == 1e-8
    assert desc["lr_schedule"]["peak_value"] == 1e-6 and desc["lr_schedule"]["warmup_steps"] == 5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_minimises_a_quadratic(name):
    target = jnp.array([1.0, -2.0, 0.5])
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
    # Decaying LR: Lion's fixed-size sign steps only settle once the rate shrinks.
    tx, schedule, desc = build_optimizer(
        opt_cfg(name=name, weight_decay=0.0, lr_schedule={"type": "warmup_cosine", "peak_value": 0.1,
                                                          "warmup_steps": 5}), total_steps=100)
    assert desc["name"] == name and float(schedule(5)) == pytest.approx(0.1)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    start = float(loss(params))

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(100):
        params, state = step(params, state)
    assert float(loss(params)) < 0.01 * start


def test_clip_norm_bounds_the_first_update():
    # SGD at lr 1: the update is the (clipped) gradient itself.
    grads = {"w": jnp.array([30.0, 40.0])}  # norm 50
    for clip, want_norm in ((1.0, 1.0), (None, 50.0), (0, 50.0)):
        tx, _, _ = build_optimizer(opt_cfg(name="sgd", clip_norm=clip, weight_decay=0.0,
                                           lr_schedule={"type": "constant", "peak_value": 1.0}), 10)
        updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)})
        assert float(optax.global_norm(updates)) == pytest.approx(want_norm, rel=1e-5)


def test_warmup_cosine_values():
    sched = {"type": "warmup_cosine", "peak_value": 1e-3, "warmup_ratio": 0.1, "warmup_steps": None,
             "init_value": 1e-5, "end_value": 2e-5}
    fn, desc = build_schedule(sched, total_steps=200)
    assert desc["warmup_steps"] == 20 and desc["decay_steps"] == 200
    approx = lambda v: pytest.approx(v, rel=1e-5)  # noqa: E731 (fp32 schedule values)
    assert float(fn(0)) == approx(1e-5)
    assert float(fn(10)) == approx((1e-5 + 1e-3) / 2)  # linear warmup midpoint
    assert float(fn(20)) == approx(1e-3)
    assert float(fn(110)) == approx((1e-3 + 2e-5) / 2)  # cosine midpoint
    assert float(fn(200)) == approx(2e-5)
    assert float(fn(10_000)) == approx(2e-5)


def test_warmup_steps_explicit_overrides_ratio_and_is_clamped():
    base = {"type": "warmup_cosine", "peak_value": 1.0, "warmup_ratio": 0.5, "init_value": 0.0, "end_value": 0.0}
    _, derived = build_schedule({**base, "warmup_steps": None}, total_steps=40)
    fn, explicit = build_schedule({**base, "warmup_steps": 4}, total_steps=40)
    assert derived["warmup_steps"] == 20 and explicit["warmup_steps"] == 4
    assert float(fn(4)) == pytest.approx(1.0) and float(fn(2)) == pytest.approx(0.5)
    _, clamped = build_schedule({**base, "warmup_steps": 99}, total_steps=40)
    assert clamped["warmup_steps"] == 40 and clamped["decay_steps"] == 41


def test_constant_schedule():
    fn, desc = build_schedule({"type": "constant", "peak_value": 3e-4}, total_steps=10)
    assert desc == {"type": "constant", "peak_value": 3e-4}
    assert [float(fn(s)) for s in (0, 5, 1000)] == pytest.approx([3e-4] * 3)


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ConfigError, match=r"train\.optimizer\.name: unknown 'adam'; valid: lion, adamw, sgd"):
        build_optimizer(opt_cfg(name="adam"), total_steps=10)


def test_unknown_schedule_type():
    with pytest.raises(ConfigError,
                       match=r"lr_schedule\.type: unknown 'linear'; valid: warmup_cosine, warmup_linear, constant"):
        build_optimizer(opt_cfg(lr_schedule={"type": "linear"}), total_steps=10)


@pytest.mark.parametrize("kind,hf_name", [("warmup_linear", "linear"), ("warmup_cosine", "cosine")])
def test_schedules_equal_hf_trainers(kind, hf_name):
    # upstream's SFT (HF default "linear", 20 warmup steps) and RL ("cosine", warmup_ratio 0.03)
    import torch
    from transformers import get_scheduler

    total = 200
    sched = {"type": kind, "peak_value": 1.0, "warmup_steps": 20 if kind == "warmup_linear" else None,
             "warmup_ratio": 0.03}
    fn, desc = build_schedule(opt_cfg(lr_schedule=sched)["lr_schedule"], total)
    warmup = 20 if kind == "warmup_linear" else math.ceil(total * 0.03)  # HF get_warmup_steps rounds up
    assert desc["warmup_steps"] == warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler(hf_name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert float(fn(step)) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-6), step
        opt.step()
        hf.step()
