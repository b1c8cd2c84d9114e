"""Phase 2, reward: a registry of reward functions by name (`rl.reward`).

A reward function maps (sid_index [B, G] in rank order, target [B]) to rewards [B, G] and is
written in jax.numpy so it runs on device inside the step. New rewards plug in with
`@register("name")`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from trainer.config import ConfigError

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return add


def get(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ConfigError(f"rl.reward: unknown '{name}'; valid: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


@register("rule")
def rule_reward(sid_index: jax.Array, target: jax.Array) -> jax.Array:
    """1 for the exact target SID, else 0."""
    return (sid_index == target[:, None]).astype(jnp.float32)


@register("ranking")
def ranking_reward(sid_index: jax.Array, target: jax.Array) -> jax.Array:
    """Rule reward plus a rank-aware penalty on wrong completions (MiniOneRec's NDCG-style reward).

    A wrong completion at rank i gets -w_i / sum_j w_j with w_i = 1 / log2(i + 2) (the group's
    weights sum to 1), so confident mistakes cost more. Groups with no correct completion get 0
    everywhere: there is nothing to rank against.
    """
    g = sid_index.shape[1]
    w = 1.0 / jnp.log2(jnp.arange(g, dtype=jnp.float32) + 2.0)
    penalty = -w / w.sum()
    correct = sid_index == target[:, None]
    any_correct = correct.any(axis=1, keepdims=True)
    return correct.astype(jnp.float32) + jnp.where(any_correct & ~correct, penalty[None, :], 0.0)
