"""Trie-constrained decoding of SIDs: beam search (eval), sampling (RL rollouts), scoring.

Every response is exactly 4 tokens: three code tokens constrained by the SID trie, then the forced
newline. A token's log-prob is log_softmax over the FULL vocabulary (as transformers' beam search
computes it before masking), and a SID's score is the sum over its 4 tokens. No temperature,
length penalty or other processors in beam search.

Each public function runs as one jitted program (prefill once, KV cache expanded to one row per
beam or sample, 3 cached decode steps). The model goes in as nnx.split's (graphdef, state) so the
graphdef is a static argument and the weights are ordinary traced arrays.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.train import losses
from trainer.config import ConfigError
from trainer.model.qwen2 import KVCache, init_cache
from trainer.decode.trie import LEVELS, SidTrie, children

NEG_INF = -jnp.inf


def _gather_beams(cache: KVCache, parent: jax.Array, first_slot: int) -> KVCache:
    """Cache rows are [batch * beams]; give each new beam its parent's generated-token slots.

    Beams of one prompt share the same prompt slots, mask and position (every beam has fed the
    same number of tokens), so only the slots from `first_slot` on (at most 3) differ and are
    gathered; copying the whole cache per step would dominate the decode time. `parent` [B, K]
    indexes beams within the same prompt, so a batch-sharded cache stays local to its shard.
    """
    b, k = parent.shape

    def take(x):  # [L, B*K, slots, H, D]
        tail = x[:, :, first_slot:]
        tail = tail.reshape((x.shape[0], b, k) + tail.shape[2:])
        idx = parent.reshape((1, b, k) + (1,) * (tail.ndim - 3))
        tail = jnp.take_along_axis(tail, idx, axis=2).reshape((x.shape[0], b * k) + tail.shape[3:])
        return jax.lax.dynamic_update_slice_in_dim(x, tail, first_slot, axis=2)

    return cache.replace(k=take(cache.k), v=take(cache.v))


def _repeat_rows(cache: KVCache, times: int) -> KVCache:
    """[B] rows -> [B * times] rows (each prompt's prefilled cache, once per beam/sample)."""
    rep = lambda x, axis: jnp.repeat(x, times, axis=axis)
    return cache.replace(k=rep(cache.k, 1), v=rep(cache.v, 1), mask=rep(cache.mask, 0), pos=rep(cache.pos, 0))


def _prefill(model, prompt_ids, prompt_mask):
    b, p = prompt_ids.shape
    cache = init_cache(model.cfg, b, p + LEVELS)  # the prompt, then the 3 code tokens we feed back
    logits, cache = model(prompt_ids, prompt_mask, cache)
    return jax.nn.log_softmax(logits[:, -1], axis=-1), cache


def _step(model, tokens, cache):
    """Feed one token per row; returns next-token log-probs [rows, V]."""
    logits, cache = model(tokens[:, None], jnp.ones((tokens.shape[0], 1), jnp.int32), cache)
    return jax.nn.log_softmax(logits[:, -1], axis=-1), cache


def _top_k(x: jax.Array, k: int):
    """top_k along the last axis that tolerates fewer than k entries (pads with -inf)."""
    if x.shape[-1] < k:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k - x.shape[-1])], constant_values=NEG_INF)
    return jax.lax.top_k(x, k)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "newline_id"))
def _beam_search(graphdef, state, prompt_ids, prompt_mask, trie: SidTrie, num_beams: int, newline_id: int):
    model = nnx.merge(graphdef, state)
    b, k = prompt_ids.shape[0], num_beams
    logp, cache = _prefill(model, prompt_ids, prompt_mask)
    logp = logp[:, None, :]  # [B, 1, V]: one live beam per prompt before the first token
    node = jnp.zeros((b, 1), jnp.int32)
    score = jnp.zeros((b, 1), jnp.float32)
    for level in range(LEVELS):
        tok, nxt, valid = children(trie, level, node)  # [B, K_in, W]
        cand = jnp.take_along_axis(logp, tok, axis=-1) + score[..., None]
        # -inf for padding slots and for descendants of dead (-inf) beams: no duplicates, ever.
        cand = jnp.where(valid, cand, NEG_INF).reshape(b, -1)
        score, flat = _top_k(cand, k)  # [B, K]
        flat = jnp.minimum(flat, tok.shape[1] * tok.shape[2] - 1)  # padded picks: any real slot
        parent = flat // tok.shape[2]
        token = jnp.take_along_axis(tok.reshape(b, -1), flat, axis=1)
        node = jnp.take_along_axis(nxt.reshape(b, -1), flat, axis=1)
        if level == 0:
            cache = _repeat_rows(cache, k)
        else:
            cache = _gather_beams(cache, parent, prompt_ids.shape[1])
        logp, cache = _step(model, token.reshape(-1), cache)
        logp = logp.reshape(b, k, -1)
    score = score + logp[:, :, newline_id]  # the forced newline counts in the score
    score, order = jax.lax.top_k(score, k)
    return jnp.take_along_axis(node, order, axis=1), score


def check_num_beams(trie: SidTrie, num_beams: int, key: str = "eval.num_beams") -> None:
    if num_beams < 1:
        raise ConfigError(f"{key}={num_beams}: must be >= 1")
    if num_beams > trie.num_sids:
        raise ConfigError(f"{key}={num_beams} but the catalog has only {trie.num_sids} distinct SIDs; "
                          f"beam search returns distinct SIDs, so lower {key} to at most {trie.num_sids}")


def constrained_beam_search(model, prompt_ids, prompt_mask, trie: SidTrie, num_beams: int, newline_id: int,
                            *, key: str = "eval.num_beams"):
    """Top `num_beams` distinct valid SIDs per prompt, best first.

    prompt_ids/prompt_mask: int [B, P], left padded. Returns (sid_index int32 [B, num_beams], rows of
    the trie's SID table, and scores float32 [B, num_beams], the summed log-probs of the 4 tokens).
    """
    check_num_beams(trie, num_beams, key)
    graphdef, state = nnx.split(model)
    return _beam_search(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                        trie, num_beams, int(newline_id))


def response_logprobs(model, prompt_ids, prompt_mask, sid_tokens, newline_id):
    """Teacher-forced per-token log-probs of SID responses; not jitted, so it can sit inside a loss.

    sid_tokens: int [B, G, 3] (G candidate SIDs per prompt) or [N, 3] (the same N for every prompt).
    Returns float32 [B, G, 4]: log-probs of a, b, c and the newline. One full forward pass over
    prompt + response (no cache), the same computation a training step differentiates.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    sid_tokens = jnp.asarray(sid_tokens, jnp.int32)
    b, p = prompt_ids.shape
    if sid_tokens.ndim == 2:
        sid_tokens = jnp.broadcast_to(sid_tokens[None], (b,) + sid_tokens.shape)
    g = sid_tokens.shape[1]
    response = jnp.concatenate([sid_tokens, jnp.full((b, g, 1), newline_id, jnp.int32)], axis=-1)  # [B,G,4]
    ids = jnp.concatenate([jnp.repeat(prompt_ids[:, None], g, axis=1), response], axis=-1).reshape(b * g, -1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask[:, None], g, axis=1), jnp.ones((b, g, 4), jnp.int32)],
                           axis=-1).reshape(b * g, -1)
    return losses.response_logprobs(model, ids, mask, LEVELS + 1).reshape(b, g, LEVELS + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "newline_id"))
def _sequence_logprobs(graphdef, state, prompt_ids, prompt_mask, sid_tokens, newline_id):
    return response_logprobs(nnx.merge(graphdef, state), prompt_ids, prompt_mask, sid_tokens, newline_id)


def sequence_logprobs(model, prompt_ids, prompt_mask, sid_tokens, newline_id):
    """Jitted `response_logprobs`: float32 [B, G, 4]; `.sum(-1)` is the beam-search score."""
    graphdef, state = nnx.split(model)
    return _sequence_logprobs(graphdef, state, jnp.asarray(prompt_ids, jnp.int32),
                              jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(sid_tokens, jnp.int32),
                              int(newline_id))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "newline_id"))
def _sample(graphdef, state, prompt_ids, prompt_mask, trie: SidTrie, rng, temperature, num_samples, newline_id):
    model = nnx.merge(graphdef, state)
    b, g = prompt_ids.shape[0], num_samples
    logp, cache = _prefill(model, prompt_ids, prompt_mask)
    logp = jnp.repeat(logp, g, axis=0)  # [B*G, V]
    cache = _repeat_rows(cache, g)
    node = jnp.zeros((b * g,), jnp.int32)
    token_logp, codes = [], []
    for level, key in enumerate(jax.random.split(rng, LEVELS)):
        tok, nxt, valid = children(trie, level, node)  # [B*G, W]
        child_logp = jnp.take_along_axis(logp, tok, axis=-1)
        # Sample among the node's children only; log_softmax over the vocab is a per-row shift,
        # so this is the model's distribution at `temperature` restricted to the trie.
        pick = jax.random.categorical(key, jnp.where(valid, child_logp / temperature, NEG_INF), axis=-1)
        token = jnp.take_along_axis(tok, pick[:, None], axis=1)[:, 0]
        node = jnp.take_along_axis(nxt, pick[:, None], axis=1)[:, 0]
        token_logp.append(jnp.take_along_axis(child_logp, pick[:, None], axis=1)[:, 0])
        codes.append(token)
        logp, cache = _step(model, token, cache)
    token_logp.append(logp[:, newline_id])
    return (node.reshape(b, g), jnp.stack(codes, -1).reshape(b, g, LEVELS),
            jnp.stack(token_logp, -1).reshape(b, g, LEVELS + 1))


def constrained_sample(model, prompt_ids, prompt_mask, trie: SidTrie, num_samples: int, newline_id: int,
                       rng: jax.Array, temperature: float = 1.0):
    """`num_samples` trie-constrained samples per prompt (RL rollouts; duplicates allowed).

    Returns (sid_index int32 [B, G], sid_tokens int32 [B, G, 3], token_logprobs float32 [B, G, 4]).
    token_logprobs are the model's own log-probs (full-vocab log_softmax at temperature 1, as
    `sequence_logprobs` computes them) of a, b, c and the newline, not the sampling distribution's.
    """
    if num_samples < 1:
        raise ConfigError(f"number of samples per prompt must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {temperature}")
    graphdef, state = nnx.split(model)
    return _sample(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                   trie, rng, jnp.float32(temperature), num_samples, int(newline_id))
