"""Phase 2, reward: a registry of reward functions by name (`rl.reward`), as upstream rl.py's.

A reward function maps (sid_index [B, G] in rank order, target [B]) to rewards [B, G] and is
written in jax.numpy so it runs on device inside the step. New rewards plug in with
`@register("name")`; one that takes a keyword `sid_embeddings` gets the catalog's item
embeddings (rl.item_embeddings, see load_sid_embeddings) bound by `get`.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from trainer.config import ConfigError
from trainer.errors import DataError

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return add


def needs_embeddings(name: str) -> bool:
    return name in REWARDS and "sid_embeddings" in inspect.signature(REWARDS[name]).parameters


def get(name: str, sid_embeddings=None) -> RewardFn:
    if name not in REWARDS:
        raise ConfigError(f"rl.reward: unknown '{name}'; valid: {', '.join(sorted(REWARDS))}")
    if needs_embeddings(name):
        if sid_embeddings is None:
            raise ConfigError(f"rl.reward: '{name}' needs item embeddings; set rl.item_embeddings to "
                              "MiniOneRec's <Category>.emb-qwen-td.npy")
        return functools.partial(REWARDS[name], sid_embeddings=jnp.asarray(sid_embeddings))
    return REWARDS[name]


def load_sid_embeddings(path: str | Path, catalog) -> np.ndarray:
    """float32 [num_sids, dim], unit rows: the .npy row of each SID's item, as upstream picks it.

    Upstream (rl.py semantic_reward) indexes the embedding array by the item's line in info.txt,
    the last line when several items share a SID.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: item embeddings not found (rl.item_embeddings); MiniOneRec writes them as "
                        "data/Amazon/index/<Category>.emb-qwen-td.npy")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a numpy .npy array ({e})") from None
    n_lines = len(catalog.item_to_sid)
    if emb.ndim != 2 or emb.shape[0] < n_lines:
        raise DataError(f"{path}: expected a [num_items, dim] array with at least the {n_lines} items of "
                        f"info.txt, got shape {emb.shape}; use the embeddings of the same dataset")
    row = {sid: line for line, sid in enumerate(catalog.item_to_sid.values())}  # last line wins
    out = emb[[row[sid] for sid in catalog.sids]].astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)


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


@register("ranking_only")
def ranking_only_reward(sid_index: jax.Array, target: jax.Array) -> jax.Array:
    """The ranking reward's penalty term alone (upstream's ndcg_rule_reward): 0 for the target,
    -w_i / sum_j w_j for a wrong completion at rank i when the group holds the target, else 0."""
    return ranking_reward(sid_index, target) - rule_reward(sid_index, target)


@register("semantic")
def semantic_reward(sid_index: jax.Array, target: jax.Array, *, sid_embeddings: jax.Array) -> jax.Array:
    """Cosine similarity of the completion's and the target's item embeddings (unit rows)."""
    return jnp.einsum("bgd,bd->bg", sid_embeddings[sid_index], sid_embeddings[target])
