"""Phase 3, advantage: group-normalised rewards, (r - mean) / (std + eps) within each prompt's group.

The std is the unbiased sample std (as TRL's GRPO, which MiniOneRec uses). A group whose rewards
are all equal carries no signal and gets advantage 0. Inputs are global arrays, so when groups
span processes the reductions run across them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, eps: float) -> jax.Array:
    """rewards [B, G] -> advantages [B, G]."""
    g = rewards.shape[1]
    mean = rewards.mean(axis=1, keepdims=True)
    if g < 2:
        return jnp.zeros_like(rewards)
    std = jnp.sqrt(((rewards - mean) ** 2).sum(axis=1, keepdims=True) / (g - 1))
    return (rewards - mean) / (std + eps)
