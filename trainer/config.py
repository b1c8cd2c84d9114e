"""Trainer configuration: one nested YAML, typed `--set dotted.key=value` overrides.

Every key that exists is in DEFAULTS; a config file or override naming any other key is an error
that suggests the nearest valid key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from trainer.config_types import Bool, Choice, ConfigError, Float, Int, List, Spec, Str

__all__ = ["ConfigError", "DEFAULTS", "SCHEMA", "load_config", "parse_value"]

# Defaults target the offline demo (tiny model on synthetic data); experiment YAMLs override them.
DEFAULTS: dict[str, Any] = {
    # A named preset (trainer/recipes.py) laid under the stage's files: `recipe: minionerec` in
    # sft.yaml / rl.yaml gives upstream MiniOneRec's hyperparameters; keys set in files still win.
    "recipe": None,
    "seed": 0,
    "output_dir": "runs/demo",
    # null: the init checkpoint's value (checkpoints carry their model config); from scratch, the
    # default of trainer.model.qwen2.ModelConfig (hidden 64, intermediate 128, 2 layers, 4 heads,
    # 2 KV heads, rope_theta 1e4, rms_norm_eps 1e-6, tied embeddings, 512 positions, float32).
    # A value that contradicts the checkpoint is an error (trainer.model.resolve).
    "model": {
        "vocab_size": None,  # null: the checkpoint's, else the tokenizer's size
        "hidden_size": None,
        "intermediate_size": None,
        "num_layers": None,
        "num_heads": None,
        "num_kv_heads": None,
        "head_dim": None,  # null: hidden_size // num_heads
        "rope_theta": None,
        "rms_norm_eps": None,
        "tie_word_embeddings": None,
        "max_position_embeddings": None,
        "dtype": None,  # compute dtype; null: the checkpoint's (float32 from scratch)
        "param_dtype": None,  # null: the checkpoint's; set: params are cast to it on load
    },
    "data": {
        "dir": "data/demo",  # holds train.csv valid.csv test.csv info.txt index.json item.json
        "max_history": 10,
        "max_prompt_len": 128,  # prompts are left-truncated to this many tokens
        "category": None,  # upstream's category words (e.g. "office products"), for the title-history tasks
    },
    "synthetic": {"num_items": 120, "num_users": 400, "num_groups": 8, "seed": 0},
    "tokenizer": {
        "path": None,  # directory with tokenizer.json; null: train a BPE tokenizer on the data
        "bpe_vocab_size": 1024,
        # true: BPE merges may cross spaces, so the prompt's fixed wording becomes a few tokens
        # (real-data prompts: ~100 tokens -> ~27); the text itself is unchanged
        "bpe_merge_across_spaces": False,
    },
    "init": {"checkpoint": None},  # msgpack params to start from (RL: the SFT best)
    "mesh": {"data": -1, "fsdp": 1},  # -1: all devices not used by other axes
    "train": {
        # train-state checkpoints: dir null = <output_dir>/state; gs://BUCKET/PREFIX survives the VM.
        # Saved every sft.checkpoint_every / checkpoint_every_steps steps and at least every_minutes (0: off).
        "checkpoint": {"dir": None, "every_minutes": 30.0},
        "optimizer": {
            "name": "lion",
            "clip_norm": 1.0,
            "weight_decay": 1e-8,
            "lr_schedule": {
                "type": "warmup_cosine",
                "peak_value": 1e-6,
                "warmup_ratio": 0.05,
                "warmup_steps": None,
                "init_value": 0.0,
                "end_value": 0.0,
            },
        },
    },
    "sft": {
        "steps": 600,
        "batch_size": 32,
        "eval_every": 100,
        "eval_samples": 256,
        "best_metric": "valid/loss",  # or valid/hr@10, valid/ndcg@10 (constrained decoding)
        "checkpoint_every": 100,
        "epochs": None,  # set: steps = epochs * (train sequences // batch_size), as HF Trainer counts
        "early_stopping_patience": None,  # stop after this many evaluations without a better best
        "tasks": ["next_item", "title2sid"],  # trainer/data/tasks.py SFT_TASKS
        "dropout": 0.0,  # of the embedding and each residual branch, in training passes only
    },
    # RL keys sit at the top level like the runbook's smoke run (--set steps=3 --set rollout.n=8).
    "steps": 20,
    "epochs": None,  # set: steps = epochs * (training prompts // rollout.batch_size)
    "eval_every_steps": 0,
    "checkpoint_every_steps": 5,
    "rollout": {
        "batch_size": 8,  # prompts per step (global, across processes)
        "n": 8,  # group size: completions per prompt
        "max_length_sample": 64,  # runbook key; SID responses are always 4 tokens (3 codes + newline)
        "mode": "beam",  # beam | sample
        "temperature": 1.0,
    },
    "rl": {
        "kl_coef": 0.04,
        "clip_eps": 0.2,
        "reward": "ranking",
        "updates_per_rollout": 1,
        "adv_eps": 1e-4,
        "tasks": ["next_item"],  # trainer/data/tasks.py RL_TASKS
        "item_embeddings": None,  # MiniOneRec .npy [num_items, dim] for reward: semantic
        # TRL's SyncRefModelCallback: every N optimizer steps ref = alpha * policy + (1 - alpha) * ref.
        "sync_ref_model": False,
        "ref_model_mixup_alpha": 0.6,
        "ref_model_sync_steps": 512,
    },
    "eval": {
        "split": "test",
        "num_beams": 50,
        "batch_size": 16,
        "max_samples": None,  # null: the whole split
        "prompt": "minionerec",  # minionerec: upstream evaluate.py's EvalSidDataset wording; sft: the SFT wording
    },
    "crosscheck": {"calc_script": None, "tolerance": 1e-6, "python": None},
    "wandb": {"project": "sidrl", "enabled": "auto"},  # auto: on when WANDB_API_KEY is set
}


# What every key accepts (trainer/config_types.py). Keys whose default is null say what else they
# take; counts are >= 1, or >= 0 where 0 means "off". Choices are listed where no registry checks them.
SCHEMA = {
    "recipe": Str(nullable=True),  # checked against trainer/recipes.py RECIPES
    "seed": Int(min=0),
    "output_dir": Str(),
    "model.vocab_size": Int(min=1, nullable=True),
    "model.hidden_size": Int(min=1, nullable=True),
    "model.intermediate_size": Int(min=1, nullable=True),
    "model.num_layers": Int(min=1, nullable=True),
    "model.num_heads": Int(min=1, nullable=True),
    "model.num_kv_heads": Int(min=1, nullable=True),
    "model.head_dim": Int(min=1, nullable=True),
    "model.rope_theta": Float(min=0, exclusive_min=True, nullable=True),
    "model.rms_norm_eps": Float(min=0, exclusive_min=True, nullable=True),
    "model.tie_word_embeddings": Bool(nullable=True),
    "model.max_position_embeddings": Int(min=1, nullable=True),
    "model.dtype": Choice("float32", "bfloat16", "float16", nullable=True),
    "model.param_dtype": Choice("float32", "bfloat16", "float16", nullable=True),
    "data.dir": Str(),
    "data.max_history": Int(min=1, nullable=True),
    "data.max_prompt_len": Int(min=1),
    "data.category": Str(nullable=True),  # null: the title-history SFT tasks refuse to run
    "synthetic.num_items": Int(min=1),
    "synthetic.num_users": Int(min=1),
    "synthetic.num_groups": Int(min=1),
    "synthetic.seed": Int(min=0),
    "tokenizer.path": Str(nullable=True),
    "tokenizer.bpe_vocab_size": Int(min=1),
    "tokenizer.bpe_merge_across_spaces": Bool(),
    "init.checkpoint": Str(nullable=True),
    "mesh.data": Int(min=-1),
    "mesh.fsdp": Int(min=-1),  # -1: every device the data axis leaves
    "train.checkpoint.dir": Str(nullable=True),  # null: <output_dir>/state; or gs://BUCKET/PREFIX
    "train.checkpoint.every_minutes": Float(min=0),  # 0: by steps only
    "train.optimizer.name": Str(),  # checked against trainer/train/optim.py OPTIMIZERS
    "train.optimizer.clip_norm": Float(min=0, nullable=True),  # null or 0: no clipping
    "train.optimizer.weight_decay": Float(min=0),
    "train.optimizer.lr_schedule.type": Str(),  # checked against optim.SCHEDULES
    "train.optimizer.lr_schedule.peak_value": Float(min=0),
    "train.optimizer.lr_schedule.warmup_ratio": Float(min=0, max=1),
    "train.optimizer.lr_schedule.warmup_steps": Int(min=0, nullable=True),  # null: from warmup_ratio
    "train.optimizer.lr_schedule.init_value": Float(min=0),
    "train.optimizer.lr_schedule.end_value": Float(min=0),
    "sft.steps": Int(min=1),
    "sft.batch_size": Int(min=1),
    "sft.eval_every": Float(min=0, exclusive_min=True),  # below 1: a fraction of the steps
    "sft.eval_samples": Int(min=1, nullable=True),  # null: the whole valid split
    "sft.best_metric": Str(),  # checked by trainer/train/sft.py parse_best_metric
    "sft.checkpoint_every": Int(min=1),
    "sft.epochs": Float(min=0, exclusive_min=True, nullable=True),  # null: sft.steps
    "sft.early_stopping_patience": Int(min=1, nullable=True),  # null: never stop early
    "sft.tasks": List(),  # checked against trainer/data/tasks.py SFT_TASKS
    "sft.dropout": Float(min=0, max=1, exclusive_max=True),
    "steps": Int(min=1),
    "epochs": Float(min=0, exclusive_min=True, nullable=True),  # null: steps
    "eval_every_steps": Int(min=0),  # 0: no in-training validation
    "checkpoint_every_steps": Int(min=0),  # 0: no train-state checkpoints
    "rollout.batch_size": Int(min=1),
    "rollout.n": Int(min=1),
    "rollout.max_length_sample": Int(min=1),
    "rollout.mode": Str(),  # checked against trainer/rl/rollout.py MODES
    "rollout.temperature": Float(min=0, exclusive_min=True),
    "rl.kl_coef": Float(min=0),
    "rl.clip_eps": Float(min=0),
    "rl.reward": Str(),  # checked against trainer/rl/reward.py REWARDS
    "rl.updates_per_rollout": Int(min=1),
    "rl.adv_eps": Float(min=0),
    "rl.tasks": List(),  # checked against trainer/data/tasks.py RL_TASKS
    "rl.item_embeddings": Str(nullable=True),  # needed by rl.reward semantic
    "rl.sync_ref_model": Bool(),
    "rl.ref_model_mixup_alpha": Float(min=0, max=1, exclusive_min=True),
    "rl.ref_model_sync_steps": Int(min=1),
    "eval.split": Choice("train", "valid", "test"),
    "eval.num_beams": Int(min=1),
    "eval.batch_size": Int(min=1),
    "eval.max_samples": Int(min=1, nullable=True),  # null: the whole split
    "eval.prompt": Choice("minionerec", "sft"),  # trainer/data/prompts.py EVAL_PROMPTS
    "crosscheck.calc_script": Str(nullable=True),  # null: upstream calc.py at the pinned commit
    "crosscheck.tolerance": Float(min=0),
    "crosscheck.python": Str(nullable=True),  # null: this interpreter
    "wandb.project": Str(),
    "wandb.enabled": Spec(bool, also=("auto",)),
}


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, path + "."))
    return keys


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, _flat_keys(DEFAULTS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    return [k for k in _flat_keys(tree, prefix) if not isinstance(_default_at(k), dict)]


def _check_type(path: str, value, source: str):
    """A value must be what SCHEMA declares for its key (ints pass for floats)."""
    return SCHEMA[path].check(path, value, source)


def _merge(base: dict, update: dict, source: str, prefix: str = "") -> None:
    for k, v in update.items():
        path = f"{prefix}{k}"
        if k not in base:
            raise _unknown_key_error(path, source)
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{path}' must be a mapping, got {v!r}")
            _merge(base[k], v, source, path + ".")
        else:
            base[k] = _check_type(path, v, source)


def _default_at(path: str):
    node = DEFAULTS
    for part in path.split("."):
        node = node[part]
    return node


if sorted(_leaf_keys(DEFAULTS)) != sorted(SCHEMA):  # a key added to one table and not the other
    raise AssertionError(f"trainer.config: DEFAULTS and SCHEMA differ in "
                         f"{sorted(set(_leaf_keys(DEFAULTS)) ^ set(SCHEMA))}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (1e-6, 5E+3): YAML 1.1 (PyYAML)
    makes them strings, which users never mean. Applies in files, --set values and nested lists;
    quoted values stay strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_value(text: str) -> Any:
    """Type an override value the way YAML would: 3 -> int, 1e-6 -> float, true, null, [1, 2]."""
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_override(cfg: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}': expected dotted.key=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node, default_node = cfg, DEFAULTS
    for i, part in enumerate(parts):
        if not isinstance(default_node, dict) or part not in default_node:
            raise _unknown_key_error(key.strip(), "--set")
        if i == len(parts) - 1:
            if isinstance(default_node[part], dict):
                raise ConfigError(f"--set '{key}': is a section; set one of its keys")
            node[part] = _check_type(key.strip(), parse_value(text), "--set")
        else:
            node, default_node = node[part], default_node[part]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def _recipe_layer(name, stage: str | None) -> dict:
    """The preset of recipe `name` for `stage` (sft, rl, ...); {} for a stage it does not cover."""
    from trainer.recipes import RECIPES

    if SCHEMA["recipe"].check("recipe", name, "config") is None:
        return {}
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown '{name}'; valid: {', '.join(sorted(RECIPES))} (or null)")
    return copy.deepcopy(RECIPES[name].get(stage, {}))


def load_config(paths: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = (),
                stage: str | None = None) -> dict:
    """DEFAULTS, then the `recipe`'s preset for `stage`, then each YAML file in order, then each
    `dotted.key=value` override. The recipe is the last one named by a file or an override."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    layers = [(str(p), _read_yaml(Path(p))) for p in paths]
    recipe = None
    for _, loaded in layers:
        recipe = loaded.get("recipe", recipe)
    for assignment in overrides:
        if assignment.split("=", 1)[0].strip() == "recipe" and "=" in assignment:
            recipe = parse_value(assignment.split("=", 1)[1])
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, _recipe_layer(recipe, stage), f"recipe {recipe} ({stage})")
    for source, loaded in layers:
        _merge(cfg, loaded, source)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg
