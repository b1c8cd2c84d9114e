"""Which model a stage builds: the checkpoint's own config, with `model.*` only allowed to repeat it.

A checkpoint saved by this project (or imported from Hugging Face) carries its model config
(trainer.model.checkpoint.MODEL_KEY), so users point a stage at a checkpoint and set nothing else.
An architecture key set in the config that differs from the checkpoint is an error naming both
values. `model.dtype` (compute) and `model.param_dtype` are run settings: unset, they follow the
checkpoint; set, params are cast on load (e.g. fp32 master weights from a bf16 checkpoint).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.config import ConfigError
from trainer.model.qwen2 import ModelConfig

# Keys fixed by the weights (and by what the weights were trained with): never overridable.
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
RUN_SETTINGS = ("dtype", "param_dtype")


def from_settings(settings: dict, vocab_size: int | None = None) -> ModelConfig:
    """A new model (SFT from scratch): config keys set, ModelConfig's defaults for the rest."""
    try:
        return ModelConfig.from_dict({k: v for k, v in settings.items() if v is not None}, vocab_size=vocab_size)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.*: {e}") from e


def resolve(settings: dict, stored: dict | None, source: str | Path, tokenizer_size: int | None = None) -> ModelConfig:
    """The model of checkpoint `source` (its stored config), checked against the config's `model.*`.

    `stored` None (a file written before checkpoints carried their config): `model.*` as given,
    vocab from the tokenizer, exactly as before.
    """
    if stored is None:
        return from_settings(settings, tokenizer_size)
    clashes = [f"model.{k}={settings[k]!r} but {source} holds a model with {k}={stored.get(k)!r}"
               for k in ARCHITECTURE if settings.get(k) is not None and settings[k] != stored.get(k)]
    if clashes:
        raise ConfigError("; ".join(clashes) + ". The model comes from the checkpoint: remove these keys from "
                          "the config, or point the stage at the checkpoint they describe")
    merged = {k: stored[k] for k in ARCHITECTURE if k in stored}
    for k in RUN_SETTINGS:
        merged[k] = settings.get(k) or stored.get(k) or getattr(ModelConfig, k)
    cfg = ModelConfig(**merged)
    if tokenizer_size is not None and tokenizer_size > cfg.vocab_size:
        from trainer.errors import CheckpointError
        raise CheckpointError(f"{source}: the tokenizer has {tokenizer_size} tokens but the checkpoint's vocab_size "
                              f"is {cfg.vocab_size}; use the tokenizer saved with this checkpoint")
    return cfg


def load_checkpoint(path: str | Path, settings: dict, tokenizer_size: int | None = None):
    """Process 0: (ModelConfig, host params) of checkpoint `path`, in the resolved param dtype."""
    import jax.numpy as jnp

    from trainer.model import checkpoint
    from trainer.model.hf_io import param_shapes

    tree, stored = checkpoint.read_checkpoint(path)
    cfg = resolve(settings, stored, path, tokenizer_size)
    in_file = dataclasses.replace(cfg, param_dtype=stored.get("param_dtype", cfg.param_dtype)) if stored else cfg
    params = checkpoint.params_from_tree(tree, param_shapes(in_file), path)
    if in_file.param_dtype != cfg.param_dtype:
        import jax
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.param_dtype)), params)
    return cfg, params
