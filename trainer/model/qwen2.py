"""Qwen2 / Qwen2.5 causal LM in Flax NNX, with a KV cache for decoding.

Matches Hugging Face `Qwen2ForCausalLM` numerically: RMSNorm in fp32, rotate-half RoPE, grouped
query attention with q/k/v bias, SwiGLU MLP, tied or untied LM head. Kernels are stored [in, out]
(HF stores [out, in]; trainer.model.hf_io transposes).

Positions come from the attention mask (cumsum - 1), so left-padded batches get the same positions
as unpadded sequences. The layers are stacked and run by `jax.lax.scan` (compile time independent
of depth). Decoding uses two caches, plain pytrees passed in and returned (jittable loops): the
prompt's K/V once per prompt (`PromptCache`) and a few slots per beam/sample for the tokens it
generated (`GenCache`); attention combines both in one softmax.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
        """Keys set to None take the dataclass default (config `model.*: null`)."""
        d = {k: v for k, v in d.items() if v is not None}
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
class PromptCache:
    """The prompt's keys and values, stored once per prompt and shared by all its beams/samples."""
    k: jax.Array  # [layers, batch, prompt_len, kv_heads, head_dim]
    v: jax.Array
    mask: jax.Array  # [batch, prompt_len] 1 = real token (prompts are left padded)
    pos: jax.Array  # [batch] position id of the first generated token (the real prompt length)


@struct.dataclass
class GenCache:
    """Keys and values of the tokens each row (beam or sample) has generated: a few slots only."""
    k: jax.Array  # [layers, batch, rows, slots, kv_heads, head_dim]
    v: jax.Array


def init_gen_cache(cfg: ModelConfig, batch: int, rows: int, slots: int) -> GenCache:
    shape = (cfg.num_layers, batch, rows, slots, cfg.num_kv_heads, cfg.head_dim)
    return GenCache(k=jnp.zeros(shape, jnp.dtype(cfg.dtype)), v=jnp.zeros(shape, jnp.dtype(cfg.dtype)))


def reorder_rows(gen: GenCache, parent: jax.Array) -> GenCache:
    """Row r of prompt b continues row parent[b, r] (beam search): gathers only the generated slots."""
    idx = parent[None, :, :, None, None, None]
    return gen.replace(k=jnp.take_along_axis(gen.k, idx, axis=2), v=jnp.take_along_axis(gen.v, idx, axis=2))


def shard_rows(x: jax.Array) -> jax.Array:
    """Under an abstract mesh (trainer.train.parallel.rows_over), split x's rows over every mesh axis.

    FSDP shards the embedding over its hidden dimension when the vocabulary does not divide the
    mesh (151,665 + SID tokens rarely does); the lookup's layout would then propagate and every chip
    would compute the whole batch. Without a mesh context (or with indivisible rows) a no-op.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))


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


def _softmax_parts(parts: list[jax.Array], dtype) -> list[jax.Array]:
    """One softmax over the concatenation of `parts` (last axis), returned split the same way."""
    scores = jnp.concatenate(parts, axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    bounds = np.cumsum([p.shape[-1] for p in parts])[:-1]
    return jnp.split(probs, bounds, axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.q_proj = _linear(cfg, cfg.hidden_size, h * d, True, rngs)
        self.k_proj = _linear(cfg, cfg.hidden_size, kv * d, True, rngs)
        self.v_proj = _linear(cfg, cfg.hidden_size, kv * d, True, rngs)
        self.o_proj = _linear(cfg, h * d, cfg.hidden_size, False, rngs)

    def _qkv(self, x, positions):
        """x [B, T, hidden] -> q [B, T, kv_heads, groups, D], k and v [B, T, kv_heads, D]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = rope(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = q.reshape(b, t, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        return q, k, v

    def _scores(self, spec, q, k):
        """q·k / sqrt(head_dim) in float32 (scaled after the product, as transformers does)."""
        return jnp.einsum(spec, q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(self.cfg.head_dim))

    def __call__(self, x, positions, key_mask):
        """Causal self-attention over the whole sequence; also returns its keys and values."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, positions)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (key_mask[:, None, :] > 0)  # [B, T, T]
        scores = self._scores("btkgd,bskd->bkgts", q, k)
        scores = jnp.where(allowed[:, None, None], scores, _NEG)
        (probs,) = _softmax_parts([scores], x.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, -1)
        return self.o_proj(out), k, v

    def decode(self, x, positions, prompt_k, prompt_v, prompt_mask, gen_k, gen_v, filled: int):
        """One new token for each of R rows per prompt against the shared prompt cache.

        x [B, R, hidden]; prompt_k/v [B, P, kv, D] (once per prompt: the R rows' queries are
        batched against it, nothing is copied per row); gen_k/v [B, R, S, kv, D], of which the
        first `filled` slots hold this row's earlier tokens. One softmax spans prompt, earlier
        tokens and the token itself. Returns the output and this token's k, v [B, R, kv, D].
        """
        b, r, _ = x.shape
        q, k, v = self._qkv(x, positions)  # R plays the time axis: [B, R, kv, g, D]
        s_prompt = self._scores("brkgd,bpkd->brkgp", q, prompt_k.astype(q.dtype))
        s_prompt = jnp.where(prompt_mask[:, None, None, None, :] > 0, s_prompt, _NEG)
        s_gen = self._scores("brkgd,brskd->brkgs", q, gen_k.astype(q.dtype))
        s_gen = jnp.where(jnp.arange(gen_k.shape[2]) < filled, s_gen, _NEG)
        s_self = self._scores("brkgd,brkd->brkg", q, k)[..., None]
        p_prompt, p_gen, p_self = _softmax_parts([s_prompt, s_gen, s_self], x.dtype)
        out = (jnp.einsum("brkgp,bpkd->brkgd", p_prompt, prompt_v.astype(x.dtype))
               + jnp.einsum("brkgs,brskd->brkgd", p_gen, gen_v.astype(x.dtype))
               + p_self * v[:, :, :, None, :])
        return self.o_proj(out.reshape(b, r, -1)), k, v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (kept values scaled by 1/(1-rate)); identity without a key or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.mlp = MLP(cfg, rngs)

    def _residual(self, x, attn, rate: float = 0.0, key=None):
        """x + attn + mlp, each branch dropped out (GPT-2's residual dropout) when given a key."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x = x + dropout(attn, rate, keys[0])
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), rate, keys[1])

    def __call__(self, x, positions, key_mask, rate: float = 0.0, key=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), positions, key_mask)
        return self._residual(x, attn, rate, key), (k, v)

    def decode(self, x, positions, prompt_k, prompt_v, prompt_mask, gen_k, gen_v, filled: int):
        attn, k, v = self.self_attn.decode(self.input_layernorm(x), positions, prompt_k, prompt_v, prompt_mask,
                                           gen_k, gen_v, filled)
        return self._residual(x, attn), (k, v)


def _stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose params carry a leading layer axis (what `jax.lax.scan` runs over).

    The layers are built one by one first, so the random init draws exactly what a per-layer
    model would (same seeds, same weights as before the scan).
    """
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.to_pure_dict(nnx.state(layer)) for layer in layers]
    stacked = nnx.state(layers[0])
    nnx.replace_by_pure_dict(stacked, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    return nnx.merge(graphdef, stacked)


class Qwen2ForCausalLM(nnx.Module):
    """Layers are one stacked DecoderLayer run by `jax.lax.scan`: every program compiles one layer
    body whatever the depth. Param tree: `layers/<module>/<param>` with a leading [num_layers] axis."""

    # True unrolls the scan into straight-line layers: the same math, compiled per layer. Only for
    # bench/scale_plan.py's cost pass: XLA's cost_analysis counts a loop body once, not per trip.
    unroll_layers: bool = False

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt,
            embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = _stack_layers([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)

    def _scan(self, step, x, per_layer_inputs=None):
        """x -> step(layer, x, inputs_l) for each layer in turn; returns (x, stacked per-layer outputs)."""
        graphdef, state = nnx.split(self.layers)

        # Rematerialised: a backward pass keeps only each layer's input and recomputes the rest,
        # or the 28 layers' saved activations overflow a 32 GiB chip at the RL batch
        # (bench/scale_plan.py: rl_update 43.8 GiB per chip without it). No-op without a backward.
        @jax.checkpoint
        def body(carry, xs):
            layer_state, inputs = xs
            return step(nnx.merge(graphdef, layer_state), carry, inputs)

        return jax.lax.scan(body, x, (state, per_layer_inputs), unroll=self.unroll_layers)

    def embed(self, ids):
        """Embedding rows of `ids` in the compute dtype. The rows are gathered, then cast: nnx.Embed
        casts the whole table first, which for Qwen2.5's 152k x 1536 fp32 table is 1.4 GB of HBM
        traffic per call (bench/hlo_bytes.py) for the few rows used. Same values either way."""
        return jnp.take(self.embed_tokens.embedding[...], ids, axis=0).astype(jnp.dtype(self.cfg.dtype))

    def _run(self, input_ids, attention_mask, keep_kv: bool, dropout_rate: float = 0.0, dropout_key=None):
        attention_mask = attention_mask.astype(jnp.int32)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        x = shard_rows(self.embed(input_ids))
        layer_keys = None
        if dropout_key is not None and dropout_rate > 0.0:  # one key for the embedding, one per layer
            embed_key, *layer_keys = jax.random.split(dropout_key, self.cfg.num_layers + 1)
            x, layer_keys = dropout(x, dropout_rate, embed_key), jnp.stack(layer_keys)

        def step(layer, x, key):
            x, kv = layer(x, positions, attention_mask, dropout_rate, key)
            return x, (kv if keep_kv else None)

        x, kv = self._scan(step, x, layer_keys)
        return self.norm(x), kv

    def hidden_states(self, input_ids, attention_mask, dropout_rate: float = 0.0, dropout_key=None):
        """Final-norm hidden states [B, T, hidden] of a full causal pass (training, scoring). With
        `dropout_key`, the embedding and each residual branch are dropped out at `dropout_rate`."""
        return self._run(input_ids, attention_mask, False, dropout_rate, dropout_key)[0]

    def prefill(self, input_ids, attention_mask) -> tuple[jax.Array, PromptCache]:
        """Run left-padded prompts once: next-token logits [B, V] (last position only) and their cache."""
        x, (k, v) = self._run(input_ids, attention_mask, keep_kv=True)
        mask = attention_mask.astype(jnp.int32)
        return self.logits(x[:, -1]), PromptCache(k=k, v=v, mask=mask, pos=mask.sum(axis=1))

    def decode(self, tokens, prompt: PromptCache, gen: GenCache, step: int) -> tuple[jax.Array, GenCache]:
        """Feed token [B, R] as every row's generated token number `step` (0-based, static).

        Returns logits [B, R, V] and `gen` with this token's keys/values written in place at slot
        `step` (one dynamic_update_slice per array, not a rebuilt cache).
        """
        positions = prompt.pos[:, None] + step + jnp.zeros_like(tokens)

        def body(layer, x, inputs):
            pk, pv, gk, gv = inputs
            return layer.decode(x, positions, pk, pv, prompt.mask, gk, gv, step)

        x, (k, v) = self._scan(body, shard_rows(self.embed(tokens)), (prompt.k, prompt.v, gen.k, gen.v))
        at = (0, 0, 0, step, 0, 0)
        gen = gen.replace(k=jax.lax.dynamic_update_slice(gen.k, k[:, :, :, None].astype(gen.k.dtype), at),
                          v=jax.lax.dynamic_update_slice(gen.v, v[:, :, :, None].astype(gen.v.dtype), at))
        return self.logits(self.norm(x)), gen

    def logits(self, x):
        """fp32 logits whatever the compute dtype: log-probs, the RL ratio and beam scores differ in
        the last bits of 150k-way softmaxes, which bf16 (8-bit mantissa) does not resolve. Only the
        few positions that reach the vocabulary come here (see trainer.train.losses)."""
        w = self.embed_tokens.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head.kernel[...]
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

    def __call__(self, input_ids, attention_mask=None):
        """Logits [B, T, V] of a full causal pass."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return self.logits(self.hidden_states(input_ids, attention_mask))


def build_model(cfg: ModelConfig, seed: int = 0) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed))


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def matmul_weights_in_compute_dtype(params: dict, cfg: ModelConfig) -> dict:
    """For inference: Linear kernels and biases cast once to the compute dtype `cfg.dtype`.

    Every matmul casts them to that dtype anyway (nnx.Linear promotes its operands to `dtype`), so
    outputs are bit-identical while each decoder pass reads half the bytes of fp32 master weights.
    Norm weights (applied in fp32) and the embedding (the fp32 logits read it) keep their dtype.
    Works on arrays and ShapeDtypeStructs alike. Training must keep updating the masters instead.
    """
    dtype = jnp.dtype(cfg.dtype)

    def cast(path, x):
        if getattr(path[-1], "key", None) not in ("kernel", "bias") or jnp.dtype(x.dtype).itemsize <= dtype.itemsize:
            return x  # only ever narrows: a bf16 checkpoint under fp32 compute stays bf16 in memory
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def params_dict(model: nnx.Module) -> dict[str, Any]:
    """The parameter pytree as nested plain dicts (the msgpack checkpoint layout)."""
    return nnx.state(model, nnx.Param).to_pure_dict()
