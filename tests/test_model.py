"""trainer.model.qwen2 without torch: config, param layout, causality, left padding, shared-prefix KV cache, beam reorder."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.model.qwen2 import (GenCache, ModelConfig, build_model, init_gen_cache, param_count, params_dict,
                                 reorder_rows)

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, seed=0)
    # Default init has zero biases and unit norms; randomise so every parameter matters.
    state = nnx.state(m, nnx.Param)
    leaves, treedef = jax.tree.flatten(state.to_pure_dict())
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state.replace_by_pure_dict(jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    nnx.update(m, state)
    return m


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def run(model, ids, mask=None):
    # Jitted: one compile per shape is much cheaper than eager op-by-op dispatch on CPU.
    ids = jnp.asarray(ids)
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    return np.asarray(_forward(model, ids, mask))


# ----------------------------------------------------------------------------- config

def test_config_derives_head_dim_and_checks_heads():
    assert CFG.head_dim == 8
    assert ModelConfig(vocab_size=5, hidden_size=32, num_heads=4, head_dim=16).head_dim == 16
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(vocab_size=5, num_heads=4, num_kv_heads=3)


def test_from_dict_takes_vocab_from_tokenizer_only_when_unset():
    assert ModelConfig.from_dict({"vocab_size": None, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1},
                                 vocab_size=77).vocab_size == 77
    assert ModelConfig.from_dict({"vocab_size": 90}, vocab_size=77).vocab_size == 90
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_dict({"vocab_size": None})


def test_hf_config_round_trip():
    cfg = ModelConfig(vocab_size=123, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                      num_kv_heads=1, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    # transformers 5 writes rope_theta only inside rope_parameters.
    hf = cfg.to_hf()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert ModelConfig.from_hf(hf).rope_theta == 5e5


# ----------------------------------------------------------------------------- params

def test_param_layout_tied_and_untied():
    abstract = lambda cfg: nnx.eval_shape(lambda: build_model(cfg))  # noqa: E731 (shapes only, no init)
    untied_cfg = ModelConfig(**{**CFG.to_dict(), "tie_word_embeddings": False})
    tied, untied = params_dict(abstract(CFG)), params_dict(abstract(untied_cfg))
    assert "lm_head" not in tied and untied["lm_head"]["kernel"].shape == (32, 50)
    attn = tied["layers"]["self_attn"]  # layers stacked on a leading axis (the scan's)
    assert attn["q_proj"]["kernel"].shape == (2, 32, 32) and attn["k_proj"]["kernel"].shape == (2, 32, 16)
    assert attn["k_proj"]["bias"].shape == (2, 16) and "bias" not in attn["o_proj"]
    h, i, v, kv = 32, 48, 50, 16
    per_layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert param_count(abstract(CFG)) == v * h + 2 * per_layer + h
    assert param_count(abstract(untied_cfg)) == v * h + 2 * per_layer + h + h * v


# ----------------------------------------------------------------------------- forward

def test_logits_shape_dtype_and_causality(model):
    ids = np.array([[3, 7, 11, 13, 17, 19]])
    logits = run(model, ids)
    assert logits.shape == (1, 6, 50) and logits.dtype == np.float32
    changed = ids.copy()
    changed[0, 4] = 42
    logits2 = run(model, changed)
    np.testing.assert_allclose(logits2[0, :4], logits[0, :4], atol=1e-6)
    assert np.abs(logits2[0, 4:] - logits[0, 4:]).max() > 1e-3


def test_left_padding_matches_unpadded(model):
    seq = np.array([5, 9, 2, 33, 8])
    alone = run(model, seq[None])
    for pad_id in (0, 49):  # the pad id must not matter: the mask does the work
        ids = np.array([[pad_id] * 3 + list(seq), [1, 4, 6, 8, 10, 12, 14, 16]])
        mask = np.array([[0] * 3 + [1] * 5, [1] * 8])
        padded = run(model, ids, mask)
        assert np.isfinite(padded).all()
        np.testing.assert_allclose(padded[0, 3:], alone[0], atol=1e-5)


def test_dropout_only_with_a_key_and_the_same_masks_for_the_same_key(model):
    """SFT's regularizer: no key (every eval, decode and RL pass) is the plain forward pass; a key
    drops the embedding and residual branches, deterministically per key (a resumed run redraws
    the same masks)."""
    ids = jnp.asarray([[5, 9, 2, 33, 8, 1, 4]])
    mask = jnp.ones_like(ids)
    fwd = nnx.jit(lambda m, key, rate: m.hidden_states(ids, mask, rate, key), static_argnums=2)
    plain = np.asarray(fwd(model, None, 0.0))
    np.testing.assert_allclose(np.asarray(fwd(model, None, 0.5)), plain)
    np.testing.assert_allclose(np.asarray(fwd(model, jax.random.key(0), 0.0)), plain)
    a, a_again, b = (np.asarray(fwd(model, jax.random.key(k), 0.5)) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(a - plain).max() > 1e-2 and np.abs(a - b).max() > 1e-2

    from trainer.model.qwen2 import dropout
    x = jnp.ones((200, 100))
    dropped = np.asarray(dropout(x, 0.3, jax.random.key(2)))
    assert np.unique(dropped) == pytest.approx([0.0, 1 / 0.7])  # kept values scaled up
    assert abs((dropped == 0).mean() - 0.3) < 0.02


def test_bf16_compute_runs_close_to_fp32(model):
    cfg = ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"})
    m16 = build_model(cfg)
    nnx.update(m16, nnx.state(model, nnx.Param))
    ids = np.array([[3, 7, 11, 13]])
    lo16 = run(m16, ids)
    lo32 = run(model, ids)
    assert lo16.dtype == np.float32 and np.isfinite(lo16).all()
    assert np.abs(lo16 - lo32).max() < 0.1 * np.abs(lo32).max()


# ----------------------------------------------------------------------------- cache

def _batch():
    ids = np.array([[0, 0, 0, 4, 8, 15, 16, 23, 42],
                    [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    [0, 0, 0, 0, 0, 0, 30, 20, 10]])
    mask = (np.arange(9)[None] >= np.array([[3], [0], [6]])).astype(np.int32)
    return ids, mask


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_rows(graphdef, state, ids, mask, tokens, parents):
    """Prefill once, then feed tokens[:, :, t] to every row, reordering rows by parents[t] first."""
    model = nnx.merge(graphdef, state)
    first, prompt = model.prefill(ids, mask)
    b, r, steps = tokens.shape
    gen = init_gen_cache(model.cfg, b, r, steps)
    out = []
    for t in range(steps):
        gen = reorder_rows(gen, parents[t])
        logits, gen = model.decode(tokens[:, :, t], prompt, gen, t)
        out.append(logits)
    return first, prompt, gen, jnp.stack(out, axis=2)  # [B, R, steps, V]


def test_shared_prefix_decoding_equals_full_sequence(model):
    """3 prompts (two left padded) x 4 rows each, 4 decode steps with a beam-style reorder after
    step 1: every row's logits equal a full causal pass over prompt + that row's own history."""
    ids, mask = _batch()
    rng = np.random.default_rng(0)
    b, r, steps = 3, 4, 4
    tokens = rng.integers(0, 50, size=(b, r, steps))
    parents = np.tile(np.arange(r), (steps, b, 1))
    parents[2] = [[3, 3, 0, 1], [1, 0, 2, 2], [0, 0, 0, 0]]  # before step 2: rows continue other rows
    graphdef, state = nnx.split(model)
    first, prompt, gen, got = _decode_rows(graphdef, state, ids, mask, tokens, parents)
    assert prompt.k.shape == (CFG.num_layers, b, 9, CFG.num_kv_heads, CFG.head_dim)  # once per prompt
    assert gen.k.shape == (CFG.num_layers, b, r, steps, CFG.num_kv_heads, CFG.head_dim)
    np.testing.assert_array_equal(np.asarray(prompt.pos), mask.sum(1))
    full_prompt = run(model, ids, mask)
    np.testing.assert_allclose(np.asarray(first), full_prompt[:, -1], atol=1e-5)
    history = np.zeros((b, r, 0), np.int64)
    for t in range(steps):
        history = np.take_along_axis(history, parents[t][..., None], axis=1)
        history = np.concatenate([history, tokens[:, :, t:t + 1]], axis=2)
        for row in range(r):
            seq = np.concatenate([ids, history[:, row]], axis=1)
            seq_mask = np.concatenate([mask, np.ones((b, t + 1), np.int32)], axis=1)
            full = run(model, seq, seq_mask)
            np.testing.assert_allclose(np.asarray(got)[:, row, t], full[:, -1], atol=1e-5)


def test_reorder_rows_gathers_generated_slots_only(model):
    ids, mask = _batch()
    tokens = np.arange(24).reshape(3, 4, 2) % 50
    parents = np.tile(np.arange(4), (2, 3, 1))
    graphdef, state = nnx.split(model)
    _, _, gen, _ = _decode_rows(graphdef, state, ids, mask, tokens, parents)
    idx = jnp.array([[3, 3, 0, 1], [1, 0, 2, 2], [0, 0, 0, 0]])
    re = reorder_rows(gen, idx)
    expect = np.take_along_axis(np.asarray(gen.k), np.asarray(idx)[None, :, :, None, None, None], axis=2)
    np.testing.assert_array_equal(np.asarray(re.k), expect)
    assert isinstance(re, GenCache) and re.k.shape == gen.k.shape


def test_unrolled_layers_same_logits_and_cost_counts_every_layer():
    """bench/scale_plan.py's cost pass: XLA counts a scan body once; the unrolled twin counts each layer."""
    from trainer.model.qwen2 import Qwen2ForCausalLM

    cfg = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2)
    graphdef, state = nnx.split(build_model(cfg, seed=0))
    ids = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 16

    def compiled():  # a fresh function each time: the trace reads the flag
        fn = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i, jnp.ones_like(i)))
        return fn.lower(state, ids).compile(), fn

    scanned, scanned_fn = compiled()
    Qwen2ForCausalLM.unroll_layers = True
    try:
        unrolled, unrolled_fn = compiled()
    finally:
        Qwen2ForCausalLM.unroll_layers = False
    flops = [float(c.cost_analysis()["flops"]) for c in (scanned, unrolled)]
    # 4 layers hold nearly all the work at this vocabulary: counted once vs four times
    assert 3.0 < flops[1] / flops[0] < 4.5, flops
    np.testing.assert_allclose(np.asarray(unrolled_fn(state, ids)), np.asarray(scanned_fn(state, ids)), atol=1e-5)


def test_eval_casts_matmul_weights_once_with_bit_identical_logits(model):
    """Eval stores Linear kernels/biases in the compute dtype (half the reads of fp32 masters); every
    matmul cast them to it anyway, so logits are bit-identical. Norms and the embedding stay fp32."""
    from trainer.model.qwen2 import matmul_weights_in_compute_dtype

    cfg = dataclasses.replace(CFG, dtype="bfloat16")  # bf16 compute over fp32 master weights
    masters = params_dict(model)  # the module fixture's randomised fp32 params, biases included
    cast = matmul_weights_in_compute_dtype(masters, cfg)
    assert cast["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert cast["layers"]["self_attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
    assert cast["layers"]["input_layernorm"]["weight"].dtype == jnp.float32
    assert cast["embed_tokens"]["embedding"].dtype == jnp.float32
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 9)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :4].set(0)  # a left-padded row too

    def logits(params):  # full-sequence logits and the prefill's last-position logits
        m = build_model(cfg, seed=0)
        state = nnx.state(m, nnx.Param)
        state.replace_by_pure_dict(params)
        nnx.update(m, state)
        last, _ = jax.jit(lambda m, i, k: m.prefill(i, k))(m, ids, mask)
        return run(m, ids, mask), np.asarray(last)

    for got, want in zip(logits(cast), logits(masters)):
        np.testing.assert_array_equal(got, want)
    # only ever narrows: an fp32 compute model keeps a bf16 checkpoint's bytes
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), masters)
    kept = matmul_weights_in_compute_dtype(bf16, CFG)
    assert kept["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
