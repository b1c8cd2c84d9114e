"""Numerical parity with transformers' PyTorch Qwen2ForCausalLM, both directions.

Tiny random configs (GQA, tied and untied heads, explicit head_dim, several rope_theta values);
every weight, bias and norm scale is randomised so a mis-mapped or untransposed tensor shows up.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trainer.model import hf_io  # noqa: E402
from trainer.errors import CheckpointError  # noqa: E402
from trainer.model.qwen2 import ModelConfig, build_model, init_gen_cache, params_dict, reorder_rows  # noqa: E402

TOL = 1e-4

CONFIGS = {
    "tied_gqa": dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    "untied_headdim": dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                           tie_word_embeddings=False, rms_norm_eps=1e-5),
    "untied_mqa": dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, rope_theta=500.0, tie_word_embeddings=False),
}


def torch_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**CONFIGS[name], attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layernorm.weight") or pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # HF derives positions from cache_position, not the mask; pass the mask-based ones we use.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def ours_from(cfg: ModelConfig, params: dict):
    model = build_model(cfg, seed=123)
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(params)
    nnx.update(model, state)
    return model


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def ours_logits(model, ids, mask) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def batch(vocab: int, seed: int = 0):
    """3 rows of 9 tokens, left padded by 0, 3 and 6 (pad id 0 is a real id: the mask must do the work)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def max_diff_on_real(a, b, mask) -> float:
    real = mask.astype(bool)
    return float(np.abs(a[real] - b[real]).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_torch_logits(tmp_path, name):
    tm = torch_model(name)
    tm.save_pretrained(tmp_path / "hf")
    cfg, params = hf_io.import_hf(tmp_path / "hf")
    assert cfg.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    assert cfg.rope_theta == CONFIGS[name]["rope_theta"]
    assert cfg.head_dim == CONFIGS[name].get("head_dim", cfg.hidden_size // cfg.num_heads)
    model = ours_from(cfg, params)
    ids, mask = batch(cfg.vocab_size)
    ours, theirs = ours_logits(model, ids, mask), torch_logits(tm, ids, mask)
    assert max_diff_on_real(ours, theirs, mask) <= TOL
    # Sanity: the comparison is sensitive (a different seed's model is far off).
    other = torch_logits(torch_model(name, seed=1), ids, mask)
    assert max_diff_on_real(ours, other, mask) > 0.01


def test_import_bf16_and_sharded(tmp_path):
    tm = torch_model("untied_headdim").to(torch.bfloat16)
    tm.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / hf_io.SAFETENSORS_INDEX).is_file()
    assert not (tmp_path / "hf" / hf_io.SAFETENSORS).exists()
    cfg, kept = hf_io.import_hf(tmp_path / "hf")  # the file's own dtype: no widening
    assert cfg.param_dtype == "bfloat16" and {str(x.dtype) for x in jax.tree.leaves(kept)} == {"bfloat16"}
    cfg, params = hf_io.import_hf(tmp_path / "hf", param_dtype="float32")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(np.float32), b), kept, params)
    # Reference: transformers' own fp32 load of the bf16 file (casting `tm` back would also round
    # its rotary inv_freq buffer through bf16).
    tm = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"][1],
                                  tm.model.layers[1].mlp.down_proj.weight.detach().numpy().T)
    ids, mask = batch(cfg.vocab_size, seed=3)
    diff = max_diff_on_real(ours_logits(ours_from(cfg, params), ids, mask), torch_logits(tm, ids, mask), mask)
    assert diff <= TOL


def test_cache_decoding_matches_torch_full_sequence(tmp_path):
    tm = torch_model("tied_gqa")
    tm.save_pretrained(tmp_path / "hf")
    cfg, params = hf_io.import_hf(tmp_path / "hf")
    model = ours_from(cfg, params)
    ids, mask = batch(cfg.vocab_size, seed=5)
    full = torch_logits(tm, ids, mask)
    prefill = 6  # covers every row's left padding (row 2's prompt is all padding)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, ids, mask):
        """Prefill 6 tokens, then feed the rest to 2 rows per prompt sharing that prompt cache;
        before the last step row 1 takes over row 0's history (a beam reorder)."""
        m = nnx.merge(graphdef, state)
        first, prompt = m.prefill(ids[:, :prefill], mask[:, :prefill])
        steps = ids.shape[1] - prefill
        gen = init_gen_cache(cfg, ids.shape[0], 2, steps + 1)
        out = []
        for t in range(steps):
            logits, gen = m.decode(jnp.stack([ids[:, prefill + t]] * 2, axis=1), prompt, gen, t)
            out.append(logits)
        gen = reorder_rows(gen, jnp.array([[0, 0]] * ids.shape[0]))
        last, _ = m.decode(jnp.full((ids.shape[0], 2), 7), prompt, gen, steps)
        return first, jnp.stack(out, axis=2), last

    first, steps, last = decode(state, jnp.asarray(ids), jnp.asarray(mask))
    real = mask[:, prefill - 1] == 1
    np.testing.assert_allclose(np.asarray(first)[real], full[real, prefill - 1], atol=TOL)
    for row in range(2):
        assert np.abs(np.asarray(steps)[:, row] - full[:, prefill:]).max() <= TOL
    # Both rows continue row 0's history with token 7: equal to torch on the extended sequences.
    ext_ids = np.concatenate([ids, np.full((3, 1), 7)], axis=1)
    ext_mask = np.concatenate([mask, np.ones((3, 1), mask.dtype)], axis=1)
    ref = torch_logits(tm, ext_ids, ext_mask)[:, -1]
    for row in range(2):
        assert np.abs(np.asarray(last)[:, row] - ref).max() <= TOL


def _random_params(cfg: ModelConfig, seed: int) -> dict:
    params = params_dict(build_model(cfg, seed=seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.15 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from trainer.data.tokenizer import save_tokenizer, train_bpe_tokenizer

    texts = ["the user bought <a_1><b_2><c_3> then <a_4><b_5><c_6>\n", "### Response:\n"] * 4
    tok = train_bpe_tokenizer(texts, ["<a_1><b_2><c_3>", "<a_4><b_5><c_6>"], 270)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out, len(tok)


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tokenizer_dir, tied):
    tok_dir, tok_len = tokenizer_dir
    cfg = ModelConfig(vocab_size=tok_len + 6, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, rope_theta=2000.0, tie_word_embeddings=tied)
    params = _random_params(cfg, seed=7)
    written = hf_io.export_hf(params, cfg, tmp_path / "out", tokenizer_dir=tok_dir)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert name in written and (tmp_path / "out" / name).is_file()
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tm.config.eos_token_id == tok.eos_token_id is not None
    assert tok.convert_ids_to_tokens(tok.encode("<a_4><b_5><c_6>", add_special_tokens=False)) == \
        ["<a_4>", "<b_5>", "<c_6>"]
    assert tok.chat_template
    ids, mask = batch(cfg.vocab_size, seed=11)
    diff = max_diff_on_real(ours_logits(ours_from(cfg, params), ids, mask), torch_logits(tm, ids, mask), mask)
    assert diff <= TOL
    # And back: import of our own export gives the same tree.
    cfg2, params2 = hf_io.import_hf(tmp_path / "out")
    assert (cfg2.vocab_size, cfg2.tie_word_embeddings, cfg2.rope_theta) == (cfg.vocab_size, tied, 2000.0)
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_export_rejects_tokenizer_larger_than_vocab(tmp_path, tokenizer_dir):
    tok_dir, tok_len = tokenizer_dir
    cfg = ModelConfig(vocab_size=tok_len - 1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(CheckpointError, match="vocab_size"):
        hf_io.export_hf(params_dict(build_model(cfg)), cfg, tmp_path / "out", tokenizer_dir=tok_dir)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- import errors

@pytest.fixture
def saved(tmp_path):
    torch_model("untied_mqa").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _rewrite_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _rewrite_tensors(saved / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf_io.import_hf(saved)


def test_unexpected_tensor_is_named_with_file(saved):
    _rewrite_tensors(saved / "model.safetensors", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.extra\.weight"):
        hf_io.import_hf(saved)


def test_ignored_buffers_are_accepted(saved):
    _rewrite_tensors(saved / "model.safetensors",
                     lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    cfg, _ = hf_io.import_hf(saved)
    assert cfg.num_layers == 2


def test_shape_mismatch_names_tensor_and_shapes(saved):
    conf = json.loads((saved / "config.json").read_text())
    conf["intermediate_size"] = 50
    (saved / "config.json").write_text(json.dumps(conf))
    want = r"mlp\.gate_proj\.weight has shape \(48, 32\), config\.json implies \(50, 32\)"
    with pytest.raises(CheckpointError, match=want):
        hf_io.import_hf(saved)


def test_untied_config_without_lm_head_is_an_error(tmp_path):
    torch_model("tied_gqa").save_pretrained(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    conf["tie_word_embeddings"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight"):
        hf_io.import_hf(tmp_path / "hf")


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hf_io.import_hf(saved)


def test_missing_files_and_wrong_architecture(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_io.import_hf(saved)
    conf = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**conf, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        hf_io.import_hf(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        hf_io.import_hf(saved)


def test_missing_shard_is_named(tmp_path):
    torch_model("tied_gqa").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        hf_io.import_hf(tmp_path / "hf")


def test_layout_covers_model_params_exactly():
    for tied in (True, False):
        cfg = ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1,
                          num_layers=3, tie_word_embeddings=tied)
        flat = {tuple(str(k) for k in path) for path, _ in
                jax.tree_util.tree_flatten_with_path(hf_io.param_shapes(cfg))[0]
                for path in [tuple(getattr(p, "key", p) for p in path)]}
        layout = hf_io.hf_layout(cfg).values()
        assert {tuple(str(k) for k in ours) for ours, _, _ in layout} == flat
        # every stacked array gets all of its layers, each exactly once
        per_path: dict = {}
        for ours, _, layer in layout:
            per_path.setdefault(ours, []).append(layer)
        assert all(sorted(v) == (list(range(3)) if k[0] == "layers" else [None]) for k, v in per_path.items())
