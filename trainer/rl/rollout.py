"""Phase 1, rollout: a group of G completions per prompt from the constrained decoder.

`beam` (MiniOneRec's default) returns the G best distinct valid SIDs, best first; `sample` draws G
trie-constrained samples at `rollout.temperature`. Both reuse trainer.decode.beam: one decoder for
evaluation and training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.config import ConfigError
from trainer.decode.beam import constrained_beam_search, constrained_sample
from trainer.decode.trie import SidTrie

MODES = ("beam", "sample")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"rollout.mode: unknown '{mode}'; valid: {', '.join(MODES)}")
    return mode


def rollout(graphdef, params, prompt_ids: jax.Array, prompt_mask: jax.Array, trie: SidTrie,
            rollout_cfg: dict, newline_id: int, eos_id: int, rng: jax.Array) -> jax.Array:
    """Returns sid_index int32 [B, G]: rows of the catalog's SID table, rank order for `beam`."""
    model = nnx.merge(graphdef, params)
    g, mode = int(rollout_cfg["n"]), check_mode(rollout_cfg["mode"])
    if mode == "beam":
        sid_index, _ = constrained_beam_search(model, prompt_ids, prompt_mask, trie, g, newline_id, eos_id,
                                               key="rollout.n")
        return sid_index
    if mode == "sample":
        sid_index, _, _ = constrained_sample(model, prompt_ids, prompt_mask, trie, g, newline_id, rng,
                                             float(rollout_cfg["temperature"]))
        return sid_index
    raise AssertionError("unreachable: check_mode")


def completion_tokens(sid_table: jax.Array, sid_index: jax.Array, newline_id: int, eos_id: int) -> jax.Array:
    """[B, G] SID rows -> [B, G, 5] completion tokens (a, b, c, newline, EOS), what upstream's beam
    search returns and its loss scores."""
    codes = sid_table[sid_index]
    tail = jnp.broadcast_to(jnp.asarray([newline_id, eos_id], codes.dtype), codes.shape[:-1] + (2,))
    return jnp.concatenate([codes, tail], axis=-1)
