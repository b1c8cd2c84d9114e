"""The four RL phases on hand-computed cases: reward, advantage, update loss, rollout."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.model.qwen2 import ModelConfig, build_model
from trainer.rl import advantage, reward, rollout, update
from trainer.decode.trie import build_trie

# ----------------------------------------------------------------------------- reward


def test_rule_reward_is_exact_match():
    sid_index = jnp.array([[3, 5, 7], [1, 2, 3]])
    r = reward.get("rule")(sid_index, jnp.array([5, 9]))
    np.testing.assert_array_equal(np.asarray(r), [[0, 1, 0], [0, 0, 0]])
    assert r.dtype == jnp.float32


def test_ranking_reward_hand_computed():
    # G=3: w = 1/log2(2), 1/log2(3), 1/log2(4) = 1, 0.6309298, 0.5; sum = 2.1309298
    w = [1.0, 1.0 / math.log2(3), 0.5]
    total = sum(w)
    sid_index = jnp.array([[4, 8, 6],    # target 8 at rank 1
                           [1, 2, 3],    # no correct beam -> all zeros
                           [9, 0, 5]])   # target 9 at rank 0
    r = np.asarray(reward.get("ranking")(sid_index, jnp.array([8, 7, 9])))
    expected = [[-w[0] / total, 1.0, -w[2] / total],
                [0.0, 0.0, 0.0],
                [1.0, -w[1] / total, -w[2] / total]]
    np.testing.assert_allclose(r, expected, rtol=1e-6)
    np.testing.assert_allclose(r[0], [-0.4692787, 1.0, -0.2346394], rtol=1e-6)  # literal numbers too


def test_ranking_penalties_of_wrong_beams():
    # Target at rank 0 of 8: the 7 wrong beams get -w_i / sum(w), increasingly milder with rank.
    g = 8
    sid_index = jnp.arange(g)[None]
    r = np.asarray(reward.get("ranking")(sid_index, jnp.array([0])))
    w = 1.0 / np.log2(np.arange(g) + 2.0)
    np.testing.assert_allclose(r[0, 1:].sum(), -(w[1:].sum() / w.sum()), rtol=1e-6)
    assert r[0, 0] == 1.0 and (r[0, 1:] < 0).all() and np.all(np.diff(r[0, 1:]) > 0)  # earlier mistakes cost more


def test_unknown_reward_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"rl.reward: unknown 'ndcg'.*ranking, ranking_only, rule, semantic"):
        reward.get("ndcg")


def test_register_adds_a_reward():
    @reward.register("_test_const")
    def const(sid_index, target):
        return jnp.ones(sid_index.shape, jnp.float32)
    try:
        assert reward.get("_test_const") is const
    finally:
        reward.REWARDS.pop("_test_const")


# ----------------------------------------------------------------------------- advantage


def test_group_advantages_hand_computed():
    # [1,0,0,0]: mean .25, unbiased std sqrt((.5625 + 3 * .0625) / 3) = .5
    adv = np.asarray(advantage.group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), 0.0))
    np.testing.assert_allclose(adv, [[1.5, -0.5, -0.5, -0.5]], rtol=1e-6)
    adv = np.asarray(advantage.group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), 1e-4))
    np.testing.assert_allclose(adv, [[0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]], rtol=1e-6)


def test_groups_are_independent_and_equal_groups_get_zero():
    rewards = jnp.array([[2.0, 2.0, 2.0], [0.0, 3.0, 6.0], [-1.0, -1.0, -1.0]])
    adv = np.asarray(advantage.group_advantages(rewards, 1e-4))
    np.testing.assert_array_equal(adv[0], 0.0)
    np.testing.assert_array_equal(adv[2], 0.0)
    np.testing.assert_allclose(adv[1], np.array([-3.0, 0.0, 3.0]) / (3.0 + 1e-4), rtol=1e-6)  # std = 3


def test_group_of_one_gets_zero_advantage():
    adv = np.asarray(advantage.group_advantages(jnp.array([[1.0], [0.0]]), 1e-4))
    np.testing.assert_array_equal(adv, [[0.0], [0.0]])


# ----------------------------------------------------------------------------- update loss


def _loss(logp, old, ref, adv, mask=None, clip=0.2, kl=0.0):
    logp, old, ref = (jnp.asarray(x, jnp.float32) for x in (logp, old, ref))
    mask = jnp.ones_like(logp) if mask is None else jnp.asarray(mask, jnp.float32)
    return update.grpo_loss(logp, old, ref, jnp.asarray(adv, jnp.float32), mask, clip, kl)


def test_grpo_loss_ratio_one_is_minus_mean_advantage():
    lp = np.log([[0.5, 0.25], [0.1, 0.9]])
    loss, m = _loss(lp, lp, lp, [1.0, -3.0])
    np.testing.assert_allclose(float(loss), -(1.0 - 3.0) / 2, rtol=1e-6)
    assert float(m["kl"]) == 0.0 and float(m["clip_frac"]) == 0.0
    np.testing.assert_allclose(float(m["pg_loss"]), 1.0, rtol=1e-6)


def test_grpo_loss_clipped_values_and_gradients():
    old = np.zeros((4, 1))
    logp = np.log([[1.5], [1.5], [0.5], [1.1]])  # ratios 1.5, 1.5, 0.5, 1.1
    adv = [1.0, -1.0, 1.0, 1.0]
    # per sequence: -min(1.5, 1.2) = -1.2; -min(-1.5, -1.2) = 1.5; -min(0.5, 0.8) = -0.5; -1.1
    loss, m = _loss(logp, old, logp, adv, clip=0.2)
    np.testing.assert_allclose(float(loss), (-1.2 + 1.5 - 0.5 - 1.1) / 4, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_frac"]), 3 / 4, rtol=1e-6)
    # The clipped branch (ratio 1.5 with A > 0) passes no gradient; the others do.
    g = jax.grad(lambda lp: _loss(lp, old, jax.lax.stop_gradient(lp), adv, clip=0.2)[0])(jnp.asarray(logp, jnp.float32))
    g = np.asarray(g)[:, 0]
    assert g[0] == 0.0
    np.testing.assert_allclose(g[1:], [1.5 / 4, -0.5 / 4, -1.1 / 4], rtol=1e-5)  # d(-r*A)/dlogp = -r*A / N


def test_grpo_loss_k3_kl_value():
    logp, ref = np.log([[0.5]]), np.log([[0.25]])
    delta = math.log(0.25) - math.log(0.5)
    k3 = math.exp(delta) - delta - 1.0  # 0.5 + ln 2 - 1 = 0.1931472
    loss, m = _loss(logp, logp, ref, [0.0], kl=0.04)
    np.testing.assert_allclose(float(m["kl"]), k3, rtol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), 0.1931472, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.04 * k3, rtol=1e-6)


def test_grpo_loss_token_mask_averages_real_tokens_only():
    old = np.zeros((2, 2))
    logp = np.log([[2.0, 3.0], [1.0, 1.0]])  # clip eps large: no clipping
    loss, _ = _loss(logp, old, logp, [1.0, 1.0], mask=[[1, 0], [1, 1]], clip=10.0)
    np.testing.assert_allclose(float(loss), (-2.0 + -1.0) / 2, rtol=1e-6)


def test_grpo_loss_on_policy_without_old_pass_equals_old_equal_logp():
    # old_logp None (no old-log-prob forward): ratio exp(logp - stop_gradient(logp)) == 1 exactly,
    # and the gradient is the plain policy gradient -A / (N * T) per token.
    logp = jnp.asarray(np.log([[0.5, 0.25], [0.1, 0.9]]), jnp.float32)
    adv, mask = jnp.asarray([1.0, -3.0]), jnp.ones((2, 2))
    on = lambda lp: update.grpo_loss(lp, None, None, adv, mask, 0.2, 0.0)
    off = lambda lp: update.grpo_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask, 0.2, 0.0)
    (l_on, m_on), g_on = jax.value_and_grad(on, has_aux=True)(logp)
    (l_off, _), g_off = jax.value_and_grad(off, has_aux=True)(logp)
    assert float(l_on) == float(l_off) == pytest.approx(1.0)
    np.testing.assert_array_equal(np.asarray(g_on), np.asarray(g_off))
    np.testing.assert_allclose(np.asarray(g_on), [[-0.25, -0.25], [0.75, 0.75]], rtol=1e-6)
    assert "kl" not in m_on and float(m_on["clip_frac"]) == 0.0  # no reference: no KL metric


def test_grpo_loss_with_kl_needs_reference():
    logp = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="kl_coef"):
        update.grpo_loss(logp, None, None, jnp.ones(1), jnp.ones((1, 2)), 0.2, 0.04)
    assert update.needs_reference(0.0) is False and update.needs_reference(1e-3) is True
    assert update.needs_old_logprobs(1) is False and update.needs_old_logprobs(2) is True


def test_update_step_donates_the_train_state(tiny):
    # The old params/opt state buffers are handed to XLA for the new ones: after the step the
    # caller's arrays are deleted, so two train states never coexist in device memory.
    import optax

    graphdef, params, _, table, prompts, _ = tiny
    params = jax.tree.map(jnp.array, params)  # own copies: the module fixture stays intact
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    _, update_step = update.make_phase_fns(graphdef, tx, 0.2, 0.0)
    resp = jnp.concatenate([jnp.asarray(table[:3]), jnp.full((3, 1), NEWLINE, jnp.int32)], -1)
    ids = jnp.concatenate([prompts, resp], -1)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "advantages": jnp.array([1.0, -1.0, 0.5])}
    new_params, new_opt, m = update_step(params, opt_state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))
    assert all(x.is_deleted() for x in jax.tree.leaves(opt_state) if x.size > 1)
    assert "kl" not in m and np.isfinite(float(m["loss"]))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_params))


def test_completion_tokens():
    table = jnp.array([[10, 20, 30], [11, 21, 31], [12, 22, 32]], jnp.int32)
    out = np.asarray(rollout.completion_tokens(table, jnp.array([[1, 0], [2, 2]]), 99, 98))
    np.testing.assert_array_equal(out, [[[11, 21, 31, 99, 98], [10, 20, 30, 99, 98]],
                                        [[12, 22, 32, 99, 98], [12, 22, 32, 99, 98]]])


# ----------------------------------------------------------------------------- rollout

VOCAB, NEWLINE, EOS = 64, 63, 62
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    graphdef, params = nnx.split(build_model(CFG, seed=1))
    # 24 distinct SIDs: first code 40-43, second 44-49, third 50-59
    rng = np.random.default_rng(0)
    rows = set()
    while len(rows) < 24:
        rows.add((int(rng.integers(40, 44)), int(rng.integers(44, 50)), int(rng.integers(50, 60))))
    table = np.array(sorted(rows), np.int32)
    prompts = jnp.array(rng.integers(1, 40, size=(3, 6)), jnp.int32)
    mask = jnp.ones_like(prompts).at[0, :2].set(0)  # one left-padded prompt
    return graphdef, params, build_trie(table), table, prompts, mask


def _cfg(mode, n, temperature=1.0):
    return {"mode": mode, "n": n, "temperature": temperature}


def test_rollout_beam_returns_distinct_valid_sids_best_first(tiny):
    from flax import nnx

    from trainer.decode.beam import sequence_logprobs

    graphdef, params, trie, table, prompts, mask = tiny
    out = np.asarray(rollout.rollout(graphdef, params, prompts, mask, trie, _cfg("beam", 8), NEWLINE, EOS,
                                     jax.random.key(0)))
    assert out.shape == (3, 8) and out.dtype == np.int32
    assert ((out >= 0) & (out < len(table))).all()
    assert all(len(set(r)) == 8 for r in out.tolist())
    # rank order: teacher-forced scores of the returned SIDs are non-increasing
    scores = np.asarray(sequence_logprobs(nnx.merge(graphdef, params), prompts, mask, table[out], NEWLINE, EOS)).sum(-1)
    assert (np.diff(scores, axis=1) <= 1e-5).all()
    # the best beam is the best SID of the whole catalog
    all_scores = np.asarray(sequence_logprobs(nnx.merge(graphdef, params), prompts, mask, table, NEWLINE, EOS)).sum(-1)
    np.testing.assert_array_equal(out[:, 0], all_scores.argmax(axis=1))


def test_rollout_sample_is_valid_keyed_and_reproducible(tiny):
    graphdef, params, trie, table, prompts, mask = tiny
    # high temperature: near-uniform over the trie, so duplicates and key dependence are visible
    cfg = _cfg("sample", 16, temperature=5.0)
    a = np.asarray(rollout.rollout(graphdef, params, prompts, mask, trie, cfg, NEWLINE, EOS, jax.random.key(1)))
    b = np.asarray(rollout.rollout(graphdef, params, prompts, mask, trie, cfg, NEWLINE, EOS, jax.random.key(1)))
    c = np.asarray(rollout.rollout(graphdef, params, prompts, mask, trie, cfg, NEWLINE, EOS, jax.random.key(2)))
    assert a.shape == (3, 16) and ((a >= 0) & (a < len(table))).all()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len(set(a[0].tolist())) > 1


def test_rollout_errors_name_the_key(tiny):
    graphdef, params, trie, table, prompts, mask = tiny
    with pytest.raises(ConfigError, match="rollout.mode: unknown 'greedy'"):
        rollout.rollout(graphdef, params, prompts, mask, trie, _cfg("greedy", 4), NEWLINE, EOS, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"rollout.n=25 .* only 24 distinct SIDs"):
        rollout.rollout(graphdef, params, prompts, mask, trie, _cfg("beam", 25), NEWLINE, EOS, jax.random.key(0))
