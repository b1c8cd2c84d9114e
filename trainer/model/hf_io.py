"""Hugging Face interop: import an HF Qwen2 checkpoint into our param pytree, export ours back.

No torch at runtime: tensors are read and written with `safetensors.numpy` (bf16 via ml_dtypes).
HF stores linear weights [out, in]; our kernels are [in, out], so every kernel is transposed on
the way in and out. HF has one tensor per layer (`model.layers.{i}.…`); our layers are stacked on a
leading axis (`layers/…`[i]), so import stacks and export slices. The name map is checked against
the model's own param tree, so a layout change in trainer.model.qwen2 breaks import/export loudly
instead of silently dropping tensors.

CLI (import-hf, the workflow stage, is trainer.model.sft_import):
  python -m trainer export-hf --checkpoint X.msgpack --tokenizer DIR --out OUT
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from trainer.errors import CheckpointError
from trainer.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from trainer.model.qwen2 import ModelConfig, build_model, params_dict

log = logging.getLogger("trainer")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Copied verbatim between checkpoint and export directories when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
# Buffers some older exports include; they are recomputed, never learned.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- name mapping

def hf_layout(cfg: ModelConfig) -> dict[str, tuple[tuple, bool, int | None]]:
    """HF tensor name -> (path in our param tree, transpose?, layer index on the stacked axis or None)."""
    layout = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False, None),
        "model.norm.weight": (("norm", "weight"), False, None),
    }
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            layout[f"{hf}self_attn.{name}.weight"] = (("layers", "self_attn", name, "kernel"), True, i)
            layout[f"{hf}self_attn.{name}.bias"] = (("layers", "self_attn", name, "bias"), False, i)
        layout[f"{hf}self_attn.o_proj.weight"] = (("layers", "self_attn", "o_proj", "kernel"), True, i)
        for name in ("gate_proj", "up_proj", "down_proj"):
            layout[f"{hf}mlp.{name}.weight"] = (("layers", "mlp", name, "kernel"), True, i)
        layout[f"{hf}input_layernorm.weight"] = (("layers", "input_layernorm", "weight"), False, i)
        layout[f"{hf}post_attention_layernorm.weight"] = (("layers", "post_attention_layernorm", "weight"), False, i)
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = (("lm_head", "kernel"), True, None)
    return layout


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The model's param tree as ShapeDtypeStructs (no memory allocated)."""
    return params_dict(nnx.eval_shape(lambda: build_model(cfg)))


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _get_or_none(tree: dict, path: tuple):
    try:
        return _get(tree, path)
    except KeyError:
        return None


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- import

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; an HF checkpoint directory needs config.json and "
                              f"{SAFETENSORS} (or {SAFETENSORS_INDEX} with its shards)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def config_from_hf(hf: dict, source: str | Path) -> ModelConfig:
    """ModelConfig from an HF config.json dict; rejects architectures this model cannot reproduce."""
    if hf.get("model_type") != "qwen2":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}; only 'qwen2' (Qwen2/Qwen2.5) "
                              "checkpoints can be imported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only plain RoPE)")
    if hf.get("use_sliding_window"):
        log.warning("%s: use_sliding_window is true; this model attends to the full context", source)
    try:
        cfg = ModelConfig.from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot read the model configuration ({type(e).__name__}: {e})") from e
    check_model_keys(cfg.to_dict(), source)
    return cfg


def check_model_keys(keys: dict, source: str | Path) -> None:
    """Each model setting must have the type and range the trainer config declares for model.*."""
    from trainer.config import SCHEMA

    for key, value in keys.items():
        if f"model.{key}" in SCHEMA:
            SCHEMA[f"model.{key}"].check(f"model.{key}", value, str(source))


def _tensor_files(hf_dir: Path) -> dict[str, list[str]]:
    """safetensors file name -> tensor names it should hold (None: every tensor in the file)."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        for fname in files:
            if not (hf_dir / fname).is_file():
                raise CheckpointError(f"{index} names shard {fname}, which is missing from {hf_dir}; "
                                      "download the complete checkpoint")
        return files
    if (hf_dir / SAFETENSORS).is_file():
        return {SAFETENSORS: None}
    extra = " (pytorch_model.bin found: re-save it with save_pretrained(..., safe_serialization=True))" \
        if any(hf_dir.glob("pytorch_model*.bin")) else ""
    raise CheckpointError(f"{hf_dir}: no {SAFETENSORS} or {SAFETENSORS_INDEX}{extra}")


def import_hf(hf_dir: str | Path, param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Read an HF Qwen2 checkpoint directory -> (ModelConfig, params as nested plain dicts).

    Params keep the file's dtype (a bf16 checkpoint stays bf16) unless `param_dtype` is given; a
    file mixing dtypes is cast to its config.json dtype. The config's dtype and param_dtype are
    the params' dtype.
    """
    from safetensors import SafetensorError, safe_open

    hf_dir = Path(hf_dir)
    hf_cfg = _read_json(hf_dir / "config.json")
    cfg = config_from_hf(hf_cfg, hf_dir / "config.json")
    layout = hf_layout(cfg)
    shapes = param_shapes(cfg)
    out_dtype = None if param_dtype is None else _bf16() if param_dtype == "bfloat16" else np.dtype(param_dtype)
    params: dict = {}
    problems: list[str] = []
    seen: set[str] = set()
    for fname, names in _tensor_files(hf_dir).items():
        path = hf_dir / fname
        try:
            with safe_open(str(path), framework="np") as f:
                in_file = set(f.keys())
                for name in sorted(in_file if names is None else names):
                    if name not in in_file:
                        problems.append(f"{path}: the index lists {name} but the file does not contain it")
                        continue
                    if _IGNORED.search(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        seen.add(name)  # tied head: HF recomputes it from the embedding too
                        continue
                    if name not in layout:
                        problems.append(f"{path}: unexpected tensor {name}")
                        continue
                    ours, transpose, layer = layout[name]
                    array = f.get_tensor(name)
                    want = tuple(_get(shapes, ours).shape)[0 if layer is None else 1:]
                    want_hf = want[::-1] if transpose else want
                    if tuple(array.shape) != want_hf:
                        problems.append(f"{path}: tensor {name} has shape {tuple(array.shape)}, config.json "
                                        f"implies {want_hf}")
                        continue
                    value = array.T if transpose else array
                    value = np.ascontiguousarray(value if out_dtype is None else value.astype(out_dtype))
                    if layer is None:
                        _set(params, ours, value)
                    else:  # fill slot `layer` of the stacked array (in the first layer's dtype)
                        if _get_or_none(params, ours) is None:
                            _set(params, ours, np.zeros(_get(shapes, ours).shape, value.dtype))
                        _get(params, ours)[layer] = value
                    seen.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); the file is truncated or "
                                  "corrupt, download it again") from e
    problems += [f"{hf_dir}: missing tensor {name}" for name in layout if name not in seen]
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(f"{hf_dir}: checkpoint does not match its config.json "
                              f"(tie_word_embeddings={cfg.tie_word_embeddings}):\n  {shown}")
    dtypes = {_dtype_name(x.dtype) for x in _leaves(params)}
    target = param_dtype or (dtypes.pop() if len(dtypes) == 1 else
                             hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")
    out_dtype = _bf16() if target == "bfloat16" else np.dtype(target)
    params = _map(lambda x: x if x.dtype == out_dtype else x.astype(out_dtype), params)
    return dataclasses.replace(cfg, param_dtype=target, dtype=target), params




def _dtype_name(dtype) -> str:
    return "bfloat16" if dtype == _bf16() else np.dtype(dtype).name


def _leaves(tree: dict):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else (v,))


def _map(fn, tree: dict) -> dict:
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------- export

def _hf_config(cfg: ModelConfig, dtype_name: str, token_ids: dict) -> dict:
    hf = cfg.to_hf()
    hf.pop("torch_dtype", None)  # transformers 5 reads "dtype"
    hf["dtype"] = dtype_name
    # transformers 5 reads RoPE settings from rope_parameters; keep rope_theta for older readers.
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    hf["use_cache"] = True
    hf.update(token_ids)
    return hf


def _token_ids(tokenizer_dir: Path, vocab_size: int) -> dict:
    from trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if len(tok) > vocab_size:
        raise CheckpointError(f"{tokenizer_dir}: the tokenizer has {len(tok)} tokens but the model's "
                              f"vocab_size is {vocab_size}; export with the tokenizer the model was trained with")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


def copy_tokenizer_files(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files `src` has; write chat_template.jinja from tokenizer_config.json when
    the template only lives there (older HF layout)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write_bytes(out_dir / name, (src / name).read_bytes())
            copied.append(name)
    if "chat_template.jinja" not in copied and "tokenizer_config.json" in copied:
        template = _read_json(src / "tokenizer_config.json").get("chat_template")
        if isinstance(template, str):
            atomic_write_text(out_dir / "chat_template.jinja", template)
            copied.append("chat_template.jinja")
    return copied


def export_hf(params: dict, model_cfg: ModelConfig, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None) -> list[str]:
    """Write an HF Qwen2 checkpoint directory that `transformers` loads; returns the files written.

    Tensors keep the params' dtype (fp32 or bf16). With a tokenizer, its files are copied and the
    bos/eos/pad ids go into config.json and generation_config.json.
    """
    from safetensors.numpy import save as st_save

    from trainer.model.checkpoint import check_against

    out_dir = Path(out_dir)
    params = _str_keys(params)
    check_against(params, param_shapes(model_cfg), "params to export")
    tensors = {}
    for name, (ours, transpose, layer) in hf_layout(model_cfg).items():
        value = np.asarray(_get(params, ours))
        value = value if layer is None else value[layer]
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    dtypes = {str(t.dtype) for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"params to export mix dtypes {sorted(dtypes)}; cast them to one dtype first")
    token_ids = _token_ids(Path(tokenizer_dir), model_cfg.vocab_size) if tokenizer_dir is not None else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / SAFETENSORS, st_save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out_dir / "config.json", _hf_config(model_cfg, dtypes.pop(), token_ids))
    written = [SAFETENSORS, "config.json"]
    if token_ids:
        gen = {k: v for k, v in token_ids.items() if v is not None}
        atomic_write_json(out_dir / "generation_config.json", {**gen, "do_sample": False})
        written.append("generation_config.json")
        written += copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    return written


def _str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


# ----------------------------------------------------------------------------- CLI

def _checkpoint_vocab(path: Path) -> int:
    from trainer.model.checkpoint import read_msgpack

    tree = read_msgpack(path)
    try:
        return int(np.shape(tree["embed_tokens"]["embedding"])[0])
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: no embed_tokens/embedding tensor; is this a parameter checkpoint?") from e


def _export_main(argv: list[str]) -> int:
    from trainer.model.checkpoint import load_params, model_config_of
    from trainer.cli import base_parser
    from trainer.config import load_config
    from trainer.io_utils import setup_logging

    p = base_parser("export-hf", "write a params msgpack as an HF checkpoint (safetensors + config + tokenizer)")
    p.add_argument("--checkpoint", required=True, help="params msgpack (e.g. sft_state_rl_last.msgpack)")
    p.add_argument("--tokenizer", default=None, help="directory with the tokenizer files to ship")
    p.add_argument("--model-config", default=None,
                   help="a model_config JSON, for checkpoints saved without their model config")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    setup_logging(args.log)
    ckpt = Path(args.checkpoint)
    stored = model_config_of(ckpt)
    if args.model_config:
        model_keys = _read_json(Path(args.model_config))
    elif stored is not None:  # the checkpoint says which model it is; model.* may only repeat it
        from trainer.model.resolve import resolve
        model_keys = resolve(load_config(args.config, args.overrides)["model"], stored, ckpt).to_dict()
    else:
        model_keys = load_config(args.config, args.overrides)["model"]
    if model_keys.get("vocab_size") is None:
        model_keys = {**model_keys, "vocab_size": _checkpoint_vocab(ckpt)}
    check_model_keys(model_keys, args.model_config or "model.*")
    try:
        cfg = ModelConfig.from_dict(model_keys)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{args.model_config or 'model.*'}: invalid model configuration ({e})") from e
    params = load_params(ckpt, param_shapes(cfg))
    written = export_hf(params, cfg, args.out, args.tokenizer)
    log.info("exported %s -> %s (%s)", ckpt, args.out, ", ".join(written))
    return 0


def main(argv: list[str]) -> int:
    """`python -m trainer export-hf ...` (argv[0] is the command name, as trainer.cli passes it)."""
    return _export_main(argv[1:])
