"""Checkpoints: flax msgpack of the parameter pytree, and resumable train states.

Parameter files hold nested dicts with string keys; the decoder layers are stacked on a leading
axis (`layers/self_attn/q_proj/kernel` is [num_layers, in, out]), as the model holds them, and,
under MODEL_KEY, the model configuration as a JSON string, so a checkpoint says which model it is
and every later stage builds that model (trainer.model.resolve). Files written before the layer
scan (one subtree per layer, `layers/0/self_attn/...`) are still read: `stack_layers` converts
them on load. Loading checks the tree, every shape and dtype against the model built from config,
so a checkpoint of the wrong model or a truncated file fails with a message instead of a silent
mis-load. Saving from a multi-process run fetches one array at a time to process 0 alone
(host_tree_on_main): no process holds a second full copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from trainer.errors import CheckpointError
from trainer.io_utils import atomic_write_bytes

MODEL_KEY = "__model_config__"  # JSON of trainer.model.qwen2.ModelConfig.to_dict()


def _to_str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _to_str_keys(v) for k, v in tree.items()}
    return tree


def _like_template(loaded, template):
    """Map string keys back to the template's keys (NNX uses int keys for layer lists)."""
    if isinstance(template, dict):
        return {k: _like_template(loaded[str(k)], v) for k, v in template.items()}
    return loaded


def _flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
    else:
        out[prefix.rstrip("/")] = tree
    return out


def params_to_bytes(params: dict, model: dict | None = None) -> bytes:
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _to_str_keys(params))
    if model is not None:
        host = {**host, MODEL_KEY: json.dumps(model, sort_keys=True)}
    return serialization.msgpack_serialize(host)


def save_params(path: str | Path, params: dict, model: dict | None = None) -> None:
    """Write a param pytree (nested dicts of host arrays) atomically, with its model config."""
    atomic_write_bytes(path, params_to_bytes(params, model))


def host_tree_on_main(tree):
    """Every process calls it; process 0 gets the tree as host numpy arrays, the others None.

    Arrays process 0 holds whole (replicated ones) are copied locally without any collective;
    sharded ones are gathered one array at a time, so a follower holds at most one extra array.
    """
    main = jax.process_index() == 0

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            host = np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return host if main else None
        if not main:
            return None
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    out = jax.tree.map(fetch, tree)
    return out if main else None


def read_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """(param tree, model config dict or None for files written without one)."""
    tree = read_msgpack(path)
    model = tree.pop(MODEL_KEY, None) if isinstance(tree, dict) else None
    if model is not None:
        try:
            model = json.loads(model)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its {MODEL_KEY} entry is not JSON ({e}); the file is corrupt") from e
    return tree, model


def model_config_of(path: str | Path) -> dict | None:
    """The model config a checkpoint was saved with (None: an older file without one)."""
    return read_checkpoint(path)[1]


def read_msgpack(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types for truncated/corrupt data
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); the file is truncated or "
            "not a flax msgpack file. Re-copy it or rerun the step that produced it.") from e


def check_against(loaded: dict, template: dict, path: str | Path) -> None:
    """Raise CheckpointError listing every missing/unexpected key and shape/dtype mismatch."""
    want = _flatten(_to_str_keys(template))
    got = _flatten(loaded) if isinstance(loaded, dict) else {}
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    for k in sorted(want.keys() & got.keys()):
        w, g = want[k], got[k]
        if tuple(np.shape(g)) != tuple(w.shape):
            problems.append(f"{k}: shape {tuple(np.shape(g))} in file, model expects {tuple(w.shape)}")
        elif np.asarray(g).dtype != np.dtype(w.dtype):
            problems.append(f"{k}: dtype {np.asarray(g).dtype} in file, model expects {np.dtype(w.dtype)}")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(
            f"{path}: checkpoint does not match the configured model (check model.* in the config "
            f"and the tokenizer's vocab size):\n  {shown}")


def stack_layers(tree: dict) -> dict:
    """Per-layer layout (`layers/{0,1,...}/...`, files written before the scan) -> stacked layout.

    Anything else is returned unchanged."""
    layers = tree.get("layers") if isinstance(tree, dict) else None
    if not isinstance(layers, dict) or not layers or not all(str(k).isdigit() for k in layers):
        return tree
    order = sorted(layers, key=lambda k: int(k))
    if [int(k) for k in order] != list(range(len(order))):
        return tree  # gaps: leave it for check_against to report
    try:
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[layers[k] for k in order])
    except ValueError:
        return tree  # layers of different structure or shapes: reported by check_against
    return {**tree, "layers": stacked}


def load_params(path: str | Path, template: dict) -> dict:
    """Read params from `path`, validated against `template` (a param pytree of the same model)."""
    return params_from_tree(read_checkpoint(path)[0], template, path)


def params_from_tree(loaded: dict, template: dict, path: str | Path) -> dict:
    """A read param tree (either layer layout), validated against `template`, with its keys."""
    loaded = stack_layers(loaded)
    check_against(loaded, template, path)
    return _like_template(loaded, template)


def load_into_model(model: nnx.Module, path: str | Path) -> None:
    state = nnx.state(model, nnx.Param)
    params = load_params(path, state.to_pure_dict())
    state.replace_by_pure_dict(params)
    nnx.update(model, state)


def train_state_bytes(state: dict) -> bytes:
    """Resumable state (params, optimizer state, step, data position: any pytree) as flax msgpack."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    return serialization.to_bytes(host)


def save_train_state(path: str | Path, state: dict) -> None:
    atomic_write_bytes(path, train_state_bytes(state))


def load_train_state(path: str | Path, template: dict) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"train state not found: {path}")
    return train_state_from_bytes(path.read_bytes(), template, str(path))


def train_state_from_bytes(data: bytes, template: dict, where: str) -> dict:
    try:
        restored = serialization.from_bytes(template, data)
    except Exception as e:
        raise CheckpointError(
            f"{where}: cannot restore the train state ({type(e).__name__}: {e}); delete it to start "
            "over or check that the config did not change the model or optimizer.") from e
    # from_bytes takes the file's arrays as they are: a state saved for another model size would
    # load "successfully" with the wrong shapes, so compare every array leaf with the template.
    problems = []

    def check(key, got, want):
        if hasattr(want, "shape") and tuple(np.shape(got)) != tuple(want.shape):
            problems.append(
                f"{jax.tree_util.keystr(key)}: shape {tuple(np.shape(got))} in file, expected {tuple(want.shape)}")
        elif hasattr(want, "dtype") and hasattr(got, "dtype") and np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(f"{jax.tree_util.keystr(key)}: dtype {got.dtype} in file, expected {want.dtype}")

    jax.tree_util.tree_map_with_path(check, restored, template)
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(
            f"{where}: train state does not match the configured model/optimizer (delete it to start over, "
            f"or restore the config it was written with):\n  {shown}")
    return restored
