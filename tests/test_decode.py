"""Constrained decoding: exact against brute force, identical to transformers' beam search.

Tiny random Qwen2 (vocab 100) with large random weights so log-probs are well separated; SID
code tokens are ids 60-89, the newline is 99 and EOS 98 (never allowed inside a response).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trainer.model import hf_io  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from trainer.decode.beam import constrained_beam_search, constrained_sample, sequence_logprobs  # noqa: E402
from trainer.model.qwen2 import ModelConfig, build_model, params_dict  # noqa: E402
from trainer.decode.trie import build_trie, hf_prefix_allowed_tokens_fn, sid_index_lookup  # noqa: E402

VOCAB, NEWLINE, EOS = 100, 99, 98
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def sid_table(n: int = 30, seed: int = 0) -> np.ndarray:
    """n distinct SIDs over 8 first codes (60-67), 6 second (70-75), 10 third (80-89)."""
    rng = np.random.default_rng(seed)
    rows: set[tuple] = set()
    while len(rows) < n:
        rows.add((int(rng.integers(60, 68)), int(rng.integers(70, 76)), int(rng.integers(80, 90))))
    table = np.array(sorted(rows), np.int32)
    rng.shuffle(table)
    return table


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, seed=0)
    state = nnx.state(m, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    state = jax.tree.unflatten(treedef, [0.4 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    nnx.update(m, state)
    return m


@pytest.fixture(scope="module")
def table():
    return sid_table()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return rng.integers(0, 60, size=(3, 9)).astype(np.int32), np.ones((3, 9), np.int32)


def test_full_beam_equals_brute_force_ranking(model, table, prompts):
    ids, mask = prompts
    trie = build_trie(table)
    rows, scores = constrained_beam_search(model, ids, mask, trie, len(table), NEWLINE, EOS)
    rows, scores = np.asarray(rows), np.asarray(scores)
    lp = np.asarray(sequence_logprobs(model, ids, mask, table, NEWLINE, EOS))  # [3, num_sids, 5]
    exact = lp.sum(-1)
    # The newline's and EOS's log-probs are part of the score and change the order (upstream's
    # generate to EOS): ranking by the 3 code tokens alone would differ.
    assert not np.array_equal(np.argsort(-lp[..., :3].sum(-1), axis=1), np.argsort(-exact, axis=1))
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1, kind="stable"))
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1), atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    # Every SID exactly once although level 1 has only 8 first codes for 30 beams.
    assert all(sorted(r) == list(range(len(table))) for r in rows.tolist())


def test_sequence_logprobs_are_full_vocab_log_softmax(model, table, prompts):
    ids, mask = prompts
    sid = table[:1]
    lp = np.asarray(sequence_logprobs(model, ids, mask, sid, NEWLINE, EOS))[:, 0]  # [3, 5]
    full = np.concatenate([ids, np.repeat(np.append(sid[0], [NEWLINE, EOS])[None], 3, 0)], axis=1)
    logits = model(jnp.asarray(full), jnp.ones_like(jnp.asarray(full)))
    ref = jax.nn.log_softmax(np.asarray(logits)[:, 8:13], axis=-1)
    expect = np.take_along_axis(np.asarray(ref), full[:, 9:14, None], axis=-1)[..., 0]
    np.testing.assert_allclose(lp, expect, atol=1e-5)
    assert np.all(lp < -0.01)  # real probabilities spread over the vocab, not a degenerate model


def test_matches_transformers_beam_search_to_eos(model, table, prompts, tmp_path):
    ids, mask = prompts
    beams = 5
    hf_io.export_hf(params_dict(model), CFG, tmp_path / "hf")
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    fn = hf_prefix_allowed_tokens_fn(table, ids.shape[1], NEWLINE, EOS)
    # As upstream's evaluate.py: no length penalty, generation runs until every beam has hit EOS
    # (max_new_tokens is only a cap), so the newline's and EOS's log-probs are in sequences_scores.
    with torch.no_grad():
        out = tm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), num_beams=beams,
                          num_return_sequences=beams, do_sample=False, length_penalty=0.0, max_new_tokens=32,
                          prefix_allowed_tokens_fn=fn, eos_token_id=EOS, pad_token_id=EOS,
                          output_scores=True, return_dict_in_generate=True)
    seqs = out.sequences[:, ids.shape[1]:].numpy().reshape(3, beams, -1)
    assert seqs.shape[-1] == 5 and (seqs[..., 3] == NEWLINE).all() and (seqs[..., 4] == EOS).all()
    lookup = sid_index_lookup(table)
    hf_rows = np.array([[lookup[tuple(s[:3])] for s in row] for row in seqs.tolist()])
    rows, scores = constrained_beam_search(model, ids, mask, build_trie(table), beams, NEWLINE, EOS)
    np.testing.assert_array_equal(np.asarray(rows), hf_rows)
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy().reshape(3, beams), atol=1e-4)
    # Beam search prunes: its top 5 is not simply the exact top 5 here (the test has teeth).
    exact = np.asarray(sequence_logprobs(model, ids, mask, table, NEWLINE, EOS)).sum(-1)
    assert not np.array_equal(np.argsort(-exact, axis=1)[:, :beams], hf_rows)


def test_left_padding_does_not_change_results(model, table, prompts):
    ids, _ = prompts
    trie = build_trie(table)
    short = ids[1, 3:]
    padded = ids.copy()
    padded[1, :3] = 7  # pad id is a real token id: only the mask may hide it
    pmask = np.ones_like(padded)
    pmask[1, :3] = 0
    rows, scores = constrained_beam_search(model, padded, pmask, trie, 5, NEWLINE, EOS)
    alone_rows, alone_scores = constrained_beam_search(model, short[None], np.ones((1, 6), np.int32), trie, 5,
                                                       NEWLINE, EOS)
    np.testing.assert_array_equal(np.asarray(rows)[1], np.asarray(alone_rows)[0])
    np.testing.assert_allclose(np.asarray(scores)[1], np.asarray(alone_scores)[0], atol=1e-4)


def test_more_beams_than_sids_is_a_clear_error(model, table, prompts):
    ids, mask = prompts
    with pytest.raises(ConfigError, match=r"only 30 distinct SIDs.*lower eval\.num_beams"):
        constrained_beam_search(model, ids, mask, build_trie(table), 31, NEWLINE, EOS)


def test_sparse_levels_never_duplicate(model, prompts):
    # 12 SIDs under just 2 first codes and 3 prefixes: 10 beams must still be 10 distinct SIDs.
    table = np.array([(60, 70, c) for c in range(80, 85)] + [(60, 71, c) for c in range(80, 84)]
                     + [(61, 70, c) for c in range(80, 83)], np.int32)
    ids, mask = prompts
    rows, scores = constrained_beam_search(model, ids, mask, build_trie(table), 10, NEWLINE, EOS)
    rows = np.asarray(rows)
    assert np.isfinite(np.asarray(scores)).all()
    assert all(len(set(r)) == 10 and max(r) < len(table) for r in rows.tolist())


def test_constrained_sample_is_valid_and_follows_the_model(model, table, prompts):
    ids, mask = prompts
    trie = build_trie(table)
    g = 2000
    rows, codes, lp = (np.asarray(x) for x in constrained_sample(
        model, ids[:1], mask[:1], trie, g, NEWLINE, jax.random.key(0), temperature=1.0))
    assert rows.shape == (1, g) and lp.shape == (1, g, 4)
    np.testing.assert_array_equal(codes[0], table[rows[0]])  # every sample is a catalog SID
    # Token log-probs are the model's own (what sequence_logprobs gives for the same SIDs).
    ref = np.asarray(sequence_logprobs(model, ids[:1], mask[:1], table, NEWLINE))[0]
    np.testing.assert_allclose(lp[0], ref[rows[0]], atol=1e-4)
    # Sampling distribution: P(SID) is the product of per-level softmaxes over trie children.
    per_level = ref[:, :3]
    prob = np.ones(len(table))
    for level in range(3):
        prefix = [tuple(r[:level]) for r in table.tolist()]
        for p in set(prefix):
            sibs = {tuple(r[:level + 1]): i for i, r in enumerate(table.tolist()) if tuple(r[:level]) == p}
            z = np.logaddexp.reduce([per_level[i, level] for i in sibs.values()])
            for i, r in enumerate(table.tolist()):
                if tuple(r[:level]) == p:
                    prob[i] *= np.exp(per_level[i, level] - z)
    freq = np.bincount(rows[0], minlength=len(table)) / g
    assert np.abs(freq - prob).max() < 0.05
    # Same key: same samples; a near-zero temperature: the greedy path every time.
    again = np.asarray(constrained_sample(model, ids[:1], mask[:1], trie, g, NEWLINE, jax.random.key(0))[0])
    np.testing.assert_array_equal(again, rows)
    cold = np.asarray(constrained_sample(model, ids[:1], mask[:1], trie, 8, NEWLINE, jax.random.key(1),
                                         temperature=1e-4)[0])
    assert len(set(cold[0].tolist())) == 1


def test_gathered_log_probs_are_log_softmax_bit_for_bit():
    """Decoding reads log-probs only at the trie's tokens (no [B, K, V] array): the same bits as
    jax.nn.log_softmax over the full vocabulary, then the gather, including -inf logits."""
    from trainer.decode.beam import _logp_at, _logp_of

    logits = jax.random.normal(jax.random.key(3), (3, 5, 4099), jnp.float32) * 7.0
    logits = logits.at[0, 0, :17].set(-jnp.inf)
    idx = jax.random.randint(jax.random.key(4), (3, 5, 64), 0, 4099)
    full = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_array_equal(jax.jit(_logp_at)(logits, idx), jnp.take_along_axis(full, idx, axis=-1))
    np.testing.assert_array_equal(jax.jit(_logp_of, static_argnums=1)(logits, 4098), full[..., 4098])
