"""Trie-constrained decoding of SIDs: beam search (eval), sampling (RL rollouts), scoring.

Every response is three code tokens constrained by the SID trie, then the forced newline and EOS,
exactly what upstream MiniOneRec's `evaluate.py` generates (`generate(num_beams, length_penalty=0.0)`
to EOS with its `ConstrainedLogitsProcessor`). A token's log-prob is log_softmax over the FULL
vocabulary, then the trie mask (upstream adds -1e6 to disallowed tokens; here they are excluded),
and a beam's score is the sum over its 5 tokens a, b, c, newline, EOS. No temperature or other
processors in beam search.

Each public function runs as one jitted program: one prefill of the prompts, whose K/V are kept once
per prompt and shared by all its beams or samples (nothing is copied per beam), then one cached
decode step per generated token, where each beam keeps only its own <= 4 generated tokens' K/V.
Why it is exact: a beam's attention over [prompt | its own tokens] is one softmax over both parts
(trainer.model.qwen2.Attention.decode), the same numbers a per-beam copy of the cache would give.
The model goes in as nnx.split's (graphdef, state) so the graphdef is a static argument and the
weights are ordinary traced arrays.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.train import losses
from trainer.config import ConfigError
from trainer.model.qwen2 import init_gen_cache, reorder_rows
from trainer.decode.trie import LEVELS, SidTrie, children

NEG_INF = -jnp.inf


def _logp_at(logits, idx):
    """log_softmax(logits, -1) at the vocabulary entries `idx` (take_along_axis on the last axis).

    The full [..., V] log-prob array is never materialised (a 152k-token vocabulary makes it the
    largest tensor of a decode step): only the row's max and log-sum-exp are reduced over V, then
    the gathered entries shifted, with jax.nn.log_softmax's own arithmetic, so the same bits.
    """
    top = jnp.max(logits, axis=-1, initial=-jnp.inf, keepdims=True)
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
    return (jnp.take_along_axis(logits, idx, axis=-1) - top) - log_sum


def _logp_of(logits, token_id: int):
    """log_softmax(logits, -1)[..., token_id] for one fixed token (the newline, EOS)."""
    return _logp_at(logits, jnp.full(logits.shape[:-1] + (1,), token_id, jnp.int32))[..., 0]


def _top_k(x: jax.Array, k: int):
    """top_k along the last axis that tolerates fewer than k entries (pads with -inf)."""
    if x.shape[-1] < k:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k - x.shape[-1])], constant_values=NEG_INF)
    return jax.lax.top_k(x, k)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "newline_id", "eos_id"))
def _beam_search(graphdef, state, prompt_ids, prompt_mask, trie: SidTrie, num_beams: int, newline_id: int,
                 eos_id: int):
    model = nnx.merge(graphdef, state)
    b, k = prompt_ids.shape[0], num_beams
    logits, prompt = model.prefill(prompt_ids, prompt_mask)  # the prompt's K/V once, shared by its K beams
    gen = init_gen_cache(model.cfg, b, k, LEVELS + 1)  # each beam's a, b, c and newline
    logits = logits[:, None, :]  # [B, 1, V]: one live beam per prompt before the first token
    node = jnp.zeros((b, 1), jnp.int32)
    score = jnp.zeros((b, 1), jnp.float32)
    for level in range(LEVELS):
        tok, nxt, valid = children(trie, level, node)  # [B, K_in, W]
        cand = _logp_at(logits, tok) + score[..., None]
        # -inf for padding slots and for descendants of dead (-inf) beams: no duplicates, ever.
        cand = jnp.where(valid, cand, NEG_INF).reshape(b, -1)
        score, flat = _top_k(cand, k)  # [B, K]
        flat = jnp.minimum(flat, tok.shape[1] * tok.shape[2] - 1)  # padded picks: any real slot
        token = jnp.take_along_axis(tok.reshape(b, -1), flat, axis=1)
        node = jnp.take_along_axis(nxt.reshape(b, -1), flat, axis=1)
        if level > 0:  # level 0: every beam extends the same (empty) prefix
            gen = reorder_rows(gen, flat // tok.shape[2])
        logits, gen = model.decode(token, prompt, gen, level)  # [B, K, V]
    # The forced newline and EOS count in the score, as in upstream's generate to EOS. They prune
    # nothing (one allowed token per beam), so the K beams chosen at the last code stay; only
    # their order changes.
    score = score + _logp_of(logits, newline_id)
    logits, _ = model.decode(jnp.full((b, k), newline_id, jnp.int32), prompt, gen, LEVELS)
    score = score + _logp_of(logits, eos_id)
    score, order = jax.lax.top_k(score, k)
    return jnp.take_along_axis(node, order, axis=1), score


def compiled_programs() -> int:
    """How many beam-search programs this process has compiled (one per shape and beam count)."""
    return _beam_search._cache_size()


def check_num_beams(trie: SidTrie, num_beams: int, key: str = "eval.num_beams") -> None:
    if num_beams < 1:
        raise ConfigError(f"{key}={num_beams}: must be >= 1")
    if num_beams > trie.num_sids:
        raise ConfigError(f"{key}={num_beams} but the catalog has only {trie.num_sids} distinct SIDs; "
                          f"beam search returns distinct SIDs, so lower {key} to at most {trie.num_sids}")


def constrained_beam_search(model, prompt_ids, prompt_mask, trie: SidTrie, num_beams: int, newline_id: int,
                            eos_id: int, *, key: str = "eval.num_beams"):
    """Top `num_beams` distinct valid SIDs per prompt, best first.

    prompt_ids/prompt_mask: int [B, P], left padded. Returns (sid_index int32 [B, num_beams], rows of
    the trie's SID table, and scores float32 [B, num_beams], the summed log-probs of a, b, c, the
    newline and EOS: upstream's `sequences_scores` with length_penalty 0).
    """
    check_num_beams(trie, num_beams, key)
    graphdef, state = nnx.split(model)
    return _beam_search(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                        trie, num_beams, int(newline_id), int(eos_id))


def response_logprobs(model, prompt_ids, prompt_mask, sid_tokens, newline_id, eos_id=None):
    """Teacher-forced per-token log-probs of SID responses; not jitted, so it can sit inside a loss.

    sid_tokens: int [B, G, 3] (G candidate SIDs per prompt) or [N, 3] (the same N for every prompt).
    Returns float32 [B, G, 4]: log-probs of a, b, c and the newline, or [B, G, 5] with EOS's when
    `eos_id` is given (`.sum(-1)` is then the beam-search score). One full forward pass over
    prompt + response (no cache), the same computation a training step differentiates.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    sid_tokens = jnp.asarray(sid_tokens, jnp.int32)
    b, p = prompt_ids.shape
    if sid_tokens.ndim == 2:
        sid_tokens = jnp.broadcast_to(sid_tokens[None], (b,) + sid_tokens.shape)
    g = sid_tokens.shape[1]
    tail = [newline_id] if eos_id is None else [newline_id, eos_id]
    response = jnp.concatenate([sid_tokens, jnp.broadcast_to(jnp.array(tail, jnp.int32), (b, g, len(tail)))], -1)
    n = response.shape[-1]
    ids = jnp.concatenate([jnp.repeat(prompt_ids[:, None], g, axis=1), response], axis=-1).reshape(b * g, -1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask[:, None], g, axis=1), jnp.ones((b, g, n), jnp.int32)],
                           axis=-1).reshape(b * g, -1)
    return losses.response_logprobs(model, ids, mask, n).reshape(b, g, n)


@functools.partial(jax.jit, static_argnames=("graphdef", "newline_id", "eos_id"))
def _sequence_logprobs(graphdef, state, prompt_ids, prompt_mask, sid_tokens, newline_id, eos_id):
    return response_logprobs(nnx.merge(graphdef, state), prompt_ids, prompt_mask, sid_tokens, newline_id, eos_id)


def sequence_logprobs(model, prompt_ids, prompt_mask, sid_tokens, newline_id, eos_id=None):
    """Jitted `response_logprobs`: float32 [B, G, 4] or, with `eos_id`, [B, G, 5] whose `.sum(-1)`
    is the beam-search score."""
    graphdef, state = nnx.split(model)
    return _sequence_logprobs(graphdef, state, jnp.asarray(prompt_ids, jnp.int32),
                              jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(sid_tokens, jnp.int32),
                              int(newline_id), None if eos_id is None else int(eos_id))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "newline_id"))
def _sample(graphdef, state, prompt_ids, prompt_mask, trie: SidTrie, rng, temperature, num_samples, newline_id):
    model = nnx.merge(graphdef, state)
    b, g = prompt_ids.shape[0], num_samples
    logits, prompt = model.prefill(prompt_ids, prompt_mask)  # shared by the prompt's G samples
    gen = init_gen_cache(model.cfg, b, g, LEVELS)
    logits = jnp.broadcast_to(logits[:, None], (b, g, logits.shape[-1]))  # [B, G, V]
    node = jnp.zeros((b, g), jnp.int32)
    token_logp, codes = [], []
    for level, key in enumerate(jax.random.split(rng, LEVELS)):
        tok, nxt, valid = children(trie, level, node)  # [B, G, W]
        child_logp = _logp_at(logits, tok)
        # Sample among the node's children only; log_softmax over the vocab is a per-row shift,
        # so this is the model's distribution at `temperature` restricted to the trie.
        pick = jax.random.categorical(key, jnp.where(valid, child_logp / temperature, NEG_INF), axis=-1)
        token = jnp.take_along_axis(tok, pick[..., None], axis=-1)[..., 0]
        node = jnp.take_along_axis(nxt, pick[..., None], axis=-1)[..., 0]
        token_logp.append(jnp.take_along_axis(child_logp, pick[..., None], axis=-1)[..., 0])
        codes.append(token)
        logits, gen = model.decode(token, prompt, gen, level)
    token_logp.append(_logp_of(logits, newline_id))
    return node, jnp.stack(codes, -1), jnp.stack(token_logp, -1)


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
