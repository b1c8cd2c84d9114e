"""trainer.model.checkpoint: param msgpack round trip, validation errors, resumable train state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainer.model.checkpoint import (load_into_model, load_params, load_train_state, read_msgpack, save_params,
                                save_train_state)
from trainer.errors import CheckpointError
from trainer.model.qwen2 import ModelConfig, build_model, params_dict

CFG = ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1)


def _tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_params_round_trip_keeps_the_stacked_layers(tmp_path):
    params = params_dict(build_model(CFG, seed=1))
    save_params(tmp_path / "p.msgpack", params)
    assert [p.name for p in tmp_path.iterdir()] == ["p.msgpack"]  # no temp file left behind
    assert read_msgpack(tmp_path / "p.msgpack")["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 16, 24)
    template = params_dict(build_model(CFG, seed=2))
    loaded = load_params(tmp_path / "p.msgpack", template)
    _tree_equal(loaded, params)


def test_per_layer_files_from_before_the_scan_still_load(tmp_path):
    params = jax.tree.map(np.asarray, params_dict(build_model(CFG, seed=1)))
    legacy = {**params, "layers": {str(i): jax.tree.map(lambda x: x[i], params["layers"]) for i in range(2)}}
    save_params(tmp_path / "old.msgpack", legacy)
    assert set(read_msgpack(tmp_path / "old.msgpack")["layers"]) == {"0", "1"}
    _tree_equal(load_params(tmp_path / "old.msgpack", params_dict(build_model(CFG, seed=2))), params)


def test_load_into_model_reproduces_logits(tmp_path):
    src = build_model(CFG, seed=1)
    save_params(tmp_path / "p.msgpack", params_dict(src))
    dst = build_model(CFG, seed=2)
    ids = jnp.array([[1, 2, 3, 4]])
    assert np.abs(np.asarray(dst(ids)[0]) - np.asarray(src(ids)[0])).max() > 0
    load_into_model(dst, tmp_path / "p.msgpack")
    np.testing.assert_array_equal(np.asarray(dst(ids)[0]), np.asarray(src(ids)[0]))


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_msgpack(tmp_path / "nope.msgpack")
    save_params(tmp_path / "p.msgpack", params_dict(build_model(CFG)))
    data = (tmp_path / "p.msgpack").read_bytes()
    (tmp_path / "p.msgpack").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"p\.msgpack: cannot read checkpoint.*truncated"):
        load_params(tmp_path / "p.msgpack", params_dict(build_model(CFG)))


def test_wrong_shape_and_dtype_list_the_keys(tmp_path):
    params = jax.tree.map(np.asarray, params_dict(build_model(CFG)))
    params["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((2, 16, 25), np.float32)
    params["norm"]["weight"] = params["norm"]["weight"].astype(np.float16)
    save_params(tmp_path / "p.msgpack", params)
    with pytest.raises(CheckpointError) as e:
        load_params(tmp_path / "p.msgpack", params_dict(build_model(CFG)))
    msg = str(e.value)
    assert "p.msgpack" in msg
    assert "layers/mlp/up_proj/kernel: shape (2, 16, 25) in file, model expects (2, 16, 24)" in msg
    assert "norm/weight: dtype float16 in file, model expects float32" in msg


def test_missing_and_unexpected_keys(tmp_path):
    untied = ModelConfig(**{**CFG.to_dict(), "tie_word_embeddings": False})
    save_params(tmp_path / "untied.msgpack", params_dict(build_model(untied)))
    with pytest.raises(CheckpointError, match="unexpected lm_head/kernel"):
        load_params(tmp_path / "untied.msgpack", params_dict(build_model(CFG)))
    save_params(tmp_path / "tied.msgpack", params_dict(build_model(CFG)))
    with pytest.raises(CheckpointError, match="missing lm_head/kernel"):
        load_params(tmp_path / "tied.msgpack", params_dict(build_model(untied)))


def _train_state(seed: int):
    params = params_dict(build_model(CFG, seed=seed))
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return {"params": params, "opt_state": opt_state, "step": np.int64(7 + seed),
            "rng": jax.random.key_data(jax.random.key(seed)), "data_pos": {"epoch": 2, "offset": 13 + seed}}


def test_train_state_round_trip_with_optax_state(tmp_path):
    state = _train_state(seed=1)
    save_train_state(tmp_path / "state.msgpack", state)
    restored = load_train_state(tmp_path / "state.msgpack", _train_state(seed=0))
    assert type(restored["opt_state"]) is type(state["opt_state"])  # optax namedtuples survive
    assert int(restored["step"]) == 8 and restored["data_pos"] == {"epoch": 2, "offset": 14}
    _tree_equal(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, state))


def test_corrupt_train_state_is_a_checkpoint_error(tmp_path):
    save_train_state(tmp_path / "state.msgpack", _train_state(seed=1))
    data = (tmp_path / "state.msgpack").read_bytes()
    (tmp_path / "state.msgpack").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"state\.msgpack: cannot restore the train state"):
        load_train_state(tmp_path / "state.msgpack", _train_state(seed=0))
    with pytest.raises(CheckpointError, match="train state not found: .*state.msgpack"):
        load_train_state(tmp_path / "missing" / "state.msgpack", _train_state(seed=0))


def test_train_state_of_another_model_size_is_rejected(tmp_path):
    # flax's from_bytes alone would restore the file's shapes silently.
    bigger = ModelConfig(**{**CFG.to_dict(), "hidden_size": 32})
    save_train_state(tmp_path / "state.msgpack", {"params": params_dict(build_model(bigger)), "step": np.int64(3)})
    want = r"\['params'\]\['embed_tokens'\]\['embedding'\]: shape \(20, 32\) in file, expected \(20, 16\)"
    with pytest.raises(CheckpointError, match=want):
        load_train_state(tmp_path / "state.msgpack", {"params": params_dict(build_model(CFG)), "step": np.int64(0)})
