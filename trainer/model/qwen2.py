"""Qwen2 / Qwen2.5 causal LM in Flax NNX, with a KV cache for decoding.

Matches Hugging Face `Qwen2ForCausalLM` numerically: RMSNorm in fp32, rotate-half RoPE, grouped
query attention with q/k/v bias, SwiGLU MLP, tied or untied LM head. Kernels are stored [in, out]
(HF stores [out, in]; trainer.model.hf_io transposes).

Positions come from the attention mask (cumsum - 1), so left-padded batches get the same positions
as unpadded sequences. The cache is a plain pytree passed in and returned, which keeps decode
loops jittable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

_NEG = -1e30  # finite mask value: fully masked rows (left padding) stay NaN-free


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_dict(cls, d: dict, vocab_size: int | None = None) -> "ModelConfig":
        d = dict(d)
        if vocab_size is not None and d.get("vocab_size") is None:
            d["vocab_size"] = vocab_size
        if d.get("vocab_size") is None:
            raise ValueError("model.vocab_size is unknown: set it or give a tokenizer")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )

    def to_hf(self) -> dict:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
        }


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


def reorder_cache(cache: KVCache, idx: jax.Array) -> KVCache:
    """Gather batch rows (beam search keeps the cache rows of the surviving beams)."""
    return cache.replace(k=cache.k[:, idx], v=cache.v[:, idx], mask=cache.mask[idx], pos=cache.pos[idx])


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


def build_model(cfg: ModelConfig, seed: int = 0) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed))


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def params_dict(model: nnx.Module) -> dict[str, Any]:
    """The parameter pytree as nested plain dicts (the msgpack checkpoint layout)."""
    return nnx.state(model, nnx.Param).to_pure_dict()
