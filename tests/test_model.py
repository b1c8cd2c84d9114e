"""trainer.model.qwen2 without torch: config, param layout, causality, left padding, KV cache, beam reorder."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.model.qwen2 import (KVCache, ModelConfig, build_model, init_cache, param_count, params_dict,
                           reorder_cache)

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
def _forward(model, ids, mask, cache):
    return model(ids, mask, cache)


def run(model, ids, mask=None, cache=None):
    # Jitted: one compile per shape is much cheaper than eager op-by-op dispatch on CPU.
    ids = jnp.asarray(ids)
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    logits, cache = _forward(model, ids, mask, cache)
    return np.asarray(logits), cache


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
    attn = tied["layers"][1]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (32, 32) and attn["k_proj"]["kernel"].shape == (32, 16)
    assert attn["k_proj"]["bias"].shape == (16,) and "bias" not in attn["o_proj"]
    h, i, v, kv = 32, 48, 50, 16
    per_layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert param_count(abstract(CFG)) == v * h + 2 * per_layer + h
    assert param_count(abstract(untied_cfg)) == v * h + 2 * per_layer + h + h * v


# ----------------------------------------------------------------------------- forward

def test_logits_shape_dtype_and_causality(model):
    ids = np.array([[3, 7, 11, 13, 17, 19]])
    logits, cache = run(model, ids)
    assert logits.shape == (1, 6, 50) and logits.dtype == np.float32 and cache is None
    changed = ids.copy()
    changed[0, 4] = 42
    logits2, _ = run(model, changed)
    np.testing.assert_allclose(logits2[0, :4], logits[0, :4], atol=1e-6)
    assert np.abs(logits2[0, 4:] - logits[0, 4:]).max() > 1e-3


def test_left_padding_matches_unpadded(model):
    seq = np.array([5, 9, 2, 33, 8])
    alone, _ = run(model, seq[None])
    for pad_id in (0, 49):  # the pad id must not matter: the mask does the work
        ids = np.array([[pad_id] * 3 + list(seq), [1, 4, 6, 8, 10, 12, 14, 16]])
        mask = np.array([[0] * 3 + [1] * 5, [1] * 8])
        padded, _ = run(model, ids, mask)
        assert np.isfinite(padded).all()
        np.testing.assert_allclose(padded[0, 3:], alone[0], atol=1e-5)


def test_bf16_compute_runs_close_to_fp32(model):
    cfg = ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"})
    m16 = build_model(cfg)
    nnx.update(m16, nnx.state(model, nnx.Param))
    ids = np.array([[3, 7, 11, 13]])
    lo16, _ = run(m16, ids)
    lo32, _ = run(model, ids)
    assert lo16.dtype == np.float32 and np.isfinite(lo16).all()
    assert np.abs(lo16 - lo32).max() < 0.1 * np.abs(lo32).max()


# ----------------------------------------------------------------------------- cache

def _batch():
    ids = np.array([[0, 0, 0, 4, 8, 15, 16, 23, 42],
                    [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    [0, 0, 0, 0, 0, 0, 30, 20, 10]])
    mask = (np.arange(9)[None] >= np.array([[3], [0], [6]])).astype(np.int32)
    return ids, mask


@pytest.mark.parametrize("chunks", [(9,), (4, 1, 1, 1, 1, 1), (2, 3, 4)])
def test_cache_decoding_equals_full_sequence(model, chunks):
    ids, mask = _batch()
    full, _ = run(model, ids, mask)
    cache = init_cache(CFG, 3, 12)
    pieces, start = [], 0
    for size in chunks:
        logits, cache = run(model, ids[:, start:start + size], mask[:, start:start + size], cache)
        pieces.append(logits)
        start += size
    assert int(cache.index) == 9
    np.testing.assert_array_equal(np.asarray(cache.pos), mask.sum(1))
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :9], mask)
    assert not np.asarray(cache.mask)[:, 9:].any()
    got = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=1e-5)


def test_cache_step_is_jittable(model):
    ids, mask = _batch()
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tok, cache):
        logits, cache = nnx.merge(graphdef, state)(tok, jnp.ones_like(tok), cache)
        return logits, cache

    cache = init_cache(CFG, 3, 10)
    _, cache = run(model, ids, mask, cache)
    nxt = jnp.array([[7], [7], [7]])
    jitted, cache_j = step(state, nxt, cache)
    eager, _ = run(model, nxt, None, cache)
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-5)
    assert isinstance(cache_j, KVCache) and int(cache_j.index) == 10


def test_reorder_cache_gathers_rows(model):
    ids, mask = _batch()
    cache = init_cache(CFG, 3, 10)
    _, cache = run(model, ids, mask, cache)
    idx = jnp.array([2, 0, 0])
    re = reorder_cache(cache, idx)
    np.testing.assert_array_equal(np.asarray(re.k), np.asarray(cache.k)[:, [2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(re.v), np.asarray(cache.v)[:, [2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(re.mask), np.asarray(cache.mask)[[2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(re.pos), np.asarray(cache.pos)[[2, 0, 0]])
    assert int(re.index) == int(cache.index)
    # Decoding the next token from the reordered cache equals a full pass over the reordered prompts.
    nxt = np.array([[11], [12], [13]])
    step, _ = run(model, nxt, None, re)
    full_ids = np.concatenate([ids[[2, 0, 0]], nxt], axis=1)
    full_mask = np.concatenate([mask[[2, 0, 0]], np.ones((3, 1), np.int32)], axis=1)
    full, _ = run(model, full_ids, full_mask)
    np.testing.assert_allclose(step[:, -1], full[:, -1], atol=1e-5)
