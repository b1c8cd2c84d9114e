"""A frozen copy of the decoder as it was before the shared-prefix cache and the layer scan
(main at c9245c1), kept only so bench/decode.py and bench/rl_step.py can time "before" and
"after" in the same run. Not used by the package.

What it does (and the package no longer does): every beam gets its own copy of the prompt's KV
cache (`_repeat_rows`), each decode step re-stacks the whole cache of every layer (`jnp.stack`),
and the layers are a Python loop (one copy per layer in every compiled program). Its scores are
the upstream definition (a, b, c, newline, EOS), so its top-K lists equal the package's.
Params come in the package's stacked layout and are split per layer here (`from_stacked`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from trainer.decode.trie import LEVELS, SidTrie, children
from trainer.model.qwen2 import ModelConfig

_NEG = -1e30

NEG_INF = -jnp.inf
@struct.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array
    mask: jax.Array  # [batch, slots] 1 where a real token was written
    pos: jax.Array  # [batch] position id the next real token gets
    index: jax.Array  # scalar: next slot to write (same for every row; prompts are left padded)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), jnp.int32),
        pos=jnp.zeros((batch,), jnp.int32),
        index=jnp.array(0, jnp.int32),
    )


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding (HF layout). x: [B, T, H, D], positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.q_proj = _linear(cfg, cfg.hidden_size, h * d, True, rngs)
        self.k_proj = _linear(cfg, cfg.hidden_size, kv * d, True, rngs)
        self.v_proj = _linear(cfg, cfg.hidden_size, kv * d, True, rngs)
        self.o_proj = _linear(cfg, h * d, cfg.hidden_size, False, rngs)

    def __call__(self, x, positions, keys_cache, values_cache, key_mask, write_index):
        cfg = self.cfg
        b, t, _ = x.shape
        q = rope(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if keys_cache is None:
            keys, values, slot0 = k, v, 0
        else:
            keys = jax.lax.dynamic_update_slice(keys_cache, k.astype(keys_cache.dtype), (0, write_index, 0, 0))
            values = jax.lax.dynamic_update_slice(values_cache, v.astype(values_cache.dtype), (0, write_index, 0, 0))
            slot0 = write_index
        s = keys.shape[1]
        query_slots = slot0 + jnp.arange(t)
        allowed = (jnp.arange(s)[None, :] <= query_slots[:, None])[None] & (key_mask[:, None, :] > 0)  # [B,T,S]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
        scores = jnp.where(allowed[:, None, None], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(x.dtype)).reshape(b, t, -1)
        return self.o_proj(out), keys, values


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, keys_cache, values_cache, key_mask, write_index):
        attn, keys, values = self.self_attn(
            self.input_layernorm(x), positions, keys_cache, values_cache, key_mask, write_index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, keys, values


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt,
            embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)

    def hidden_states(self, input_ids, attention_mask, cache: KVCache | None = None):
        attention_mask = attention_mask.astype(jnp.int32)
        offsets = jnp.cumsum(attention_mask, axis=1) - 1
        if cache is None:
            positions = jnp.maximum(offsets, 0)
            key_mask, write_index = attention_mask, 0
        else:
            positions = jnp.maximum(cache.pos[:, None] + offsets, 0)
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
            write_index = cache.index
        x = self.embed_tokens(input_ids)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kc = None if cache is None else cache.k[i]
            vc = None if cache is None else cache.v[i]
            x, keys, values = layer(x, positions, kc, vc, key_mask, write_index)
            new_k.append(keys)
            new_v.append(values)
        x = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=jnp.stack(new_k), v=jnp.stack(new_v), mask=key_mask,
                pos=cache.pos + attention_mask.sum(axis=1), index=cache.index + input_ids.shape[1])
        return x, new_cache

    def logits(self, x):
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x, new_cache = self.hidden_states(input_ids, attention_mask, cache)
        return self.logits(x), new_cache


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
    cache = init_cache(model.cfg, b, p + LEVELS + 1)  # the prompt, then the 3 code tokens we feed back
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


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "newline_id", "eos_id"))
def _beam_search(graphdef, state, prompt_ids, prompt_mask, trie: SidTrie, num_beams: int, newline_id: int,
                 eos_id: int):
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
    logp, cache = _step(model, jnp.full((b * k,), newline_id, jnp.int32), cache)  # then EOS (upstream's score)
    score = score + logp.reshape(b, k, -1)[:, :, eos_id]
    score, order = jax.lax.top_k(score, k)
    return jnp.take_along_axis(node, order, axis=1), score




def from_stacked(cfg: ModelConfig, params: dict) -> Qwen2ForCausalLM:
    """The legacy model holding `params` (the package's layout: layers stacked on axis 0)."""
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    per_layer = dict(params)
    stacked = per_layer.pop("layers")
    per_layer["layers"] = {i: jax.tree.map(lambda x: np.asarray(x)[i], stacked) for i in range(cfg.num_layers)}
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(per_layer)
    nnx.update(model, state)
    return model


def beam_search(model, prompt_ids, prompt_mask, trie: SidTrie, num_beams: int, newline_id: int, eos_id: int):
    """(sid_index [B, K], scores [B, K]) exactly as trainer.decode.beam.constrained_beam_search."""
    graphdef, state = nnx.split(model)
    return _beam_search(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
                        trie, num_beams, int(newline_id), int(eos_id))
