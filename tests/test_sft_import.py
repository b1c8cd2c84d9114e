"""The import stage (`python -m trainer import-hf`) on transformers-saved checkpoints with SID tokens
added the MiniOneRec way, and how its model config reaches later stages (trainer.model.resolve)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.hf_helpers import save_sid_checkpoint, small_base_tokenizer  # noqa: E402
from trainer.cli import main as cli_main  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from trainer.data.readers import code_tokens, load_catalog  # noqa: E402
from trainer.data.synthetic import generate  # noqa: E402
from trainer.model import checkpoint  # noqa: E402
from trainer.model.qwen2 import build_model, params_dict  # noqa: E402
from trainer.model.resolve import resolve  # noqa: E402

OUTPUTS = ["sft_best.msgpack", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("import_data")
    generate(out, 30, 60, 3, 0)
    return out


@pytest.fixture(scope="module")
def codes(data_dir):
    return code_tokens(load_catalog(data_dir).sids)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, codes):
    return save_sid_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", small_base_tokenizer(), codes)


def run_import(src, out, data_dir, *sets):
    argv = ["import-hf", str(src), "--out", str(out), "--data", str(data_dir)]
    return cli_main(argv + [a for s in sets for a in ("--set", s)])


def test_import_writes_every_output_in_the_checkpoints_dtype(tmp_path, bf16_ckpt, data_dir, codes):
    import torch
    import transformers

    assert run_import(bf16_ckpt, tmp_path / "sft", data_dir) == 0
    assert all((tmp_path / "sft" / n).is_file() for n in OUTPUTS)
    summary = json.loads((tmp_path / "sft" / "run_summary.json").read_text())
    hf_cfg = json.loads((bf16_ckpt / "config.json").read_text())
    assert summary["source"] == str(bf16_ckpt)
    assert summary["source_sha256"]["model.safetensors"] == \
        hashlib.sha256((bf16_ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert set(summary["source_sha256"]) == {p.name for p in bf16_ckpt.iterdir()}
    assert summary["dtype"] == "bfloat16" and summary["vocab_size"] == hf_cfg["vocab_size"] == summary["tokenizer_size"]
    assert summary["chat_template_generated"] is True  # save_pretrained wrote none
    assert {"backend", "device_kind", "device_count", "process_count"} <= summary.keys()
    assert summary["num_sids"] == len(load_catalog(data_dir).sids)

    # The checkpoint carries its model: untied head, rope_theta 1e6, bf16, vocab grown by the codes.
    tree, model = checkpoint.read_checkpoint(tmp_path / "sft" / "sft_best.msgpack")
    assert model == summary["model"]
    assert (model["tie_word_embeddings"], model["rope_theta"], model["param_dtype"]) == (False, 1e6, "bfloat16")
    assert {str(np.asarray(x).dtype) for x in _leaves(tree)} == {"bfloat16"}
    tm = transformers.AutoModelForCausalLM.from_pretrained(bf16_ckpt, dtype=torch.bfloat16)
    np.testing.assert_array_equal(tree["lm_head"]["kernel"].astype(np.float32),
                                  tm.lm_head.weight.detach().float().numpy().T)
    assert tree["embed_tokens"]["embedding"].shape[0] == hf_cfg["vocab_size"] == len(tm.get_input_embeddings().weight)


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else (v,))


def test_contradicting_model_setting_names_both_values(tmp_path, bf16_ckpt, data_dir, capsys):
    assert run_import(bf16_ckpt, tmp_path / "sft", data_dir, "model.hidden_size=64", "model.num_layers=2") == 2
    err = capsys.readouterr().err
    assert f"model.hidden_size=64 but {bf16_ckpt} holds a model with hidden_size=32" in err
    assert "num_layers" not in err  # 2 agrees with the checkpoint
    assert not (tmp_path / "sft").exists()


def test_later_stages_take_the_checkpoints_model(tmp_path, bf16_ckpt, data_dir):
    assert run_import(bf16_ckpt, tmp_path / "sft", data_dir) == 0
    ckpt = tmp_path / "sft" / "sft_best.msgpack"
    stored = checkpoint.model_config_of(ckpt)
    unset = {k: None for k in stored}
    cfg = resolve(unset, stored, ckpt, tokenizer_size=stored["vocab_size"])
    assert cfg.to_dict() == stored
    checkpoint.load_params(ckpt, params_dict(build_model(cfg)))  # shapes and dtypes match
    master = resolve({**unset, "param_dtype": "float32", "hidden_size": 32}, stored, ckpt)  # repeating is fine
    assert (master.param_dtype, master.hidden_size) == ("float32", 32)
    with pytest.raises(ConfigError, match=r"model.rope_theta=10000.0 but .* holds a model with rope_theta=1000000.0"):
        resolve({**unset, "rope_theta": 10000.0}, stored, ckpt)


def test_vocab_without_the_catalogs_sid_tokens_is_named(tmp_path, data_dir, codes, capsys):
    absent = [codes[0], codes[-1]]
    src = save_sid_checkpoint(tmp_path / "hf", small_base_tokenizer(), [c for c in codes if c not in absent])
    assert run_import(src, tmp_path / "sft", data_dir) == 2
    err = capsys.readouterr().err
    assert f"lacks 2 of the catalog's {len(codes)} SID code tokens: {absent[0]}, {absent[1]}" in err
    assert "resize_token_embeddings" in err
    assert not (tmp_path / "sft" / "run_summary.json").exists()


def test_sharded_checkpoint_with_a_missing_shard(tmp_path, data_dir, codes, capsys):
    src = save_sid_checkpoint(tmp_path / "hf", small_base_tokenizer(), codes, max_shard_size="30KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert run_import(src, tmp_path / "ok", data_dir) == 0  # complete: imports
    shards[1].unlink()
    assert run_import(src, tmp_path / "sft", data_dir) == 2
    err = capsys.readouterr().err
    assert f"names shard {shards[1].name}, which is missing" in err and "download the complete checkpoint" in err
    assert not (tmp_path / "sft" / "sft_best.msgpack").exists()
