"""Phase 4, update: clipped policy gradient with a k3 KL penalty to the frozen reference.

Per token t of completion i:  ratio = exp(logp - old_logp),
  pg = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i),
  kl = exp(ref_logp - logp) - (ref_logp - logp) - 1          (k3, always >= 0),
  loss_t = pg + kl_coef * kl;  loss = mean over sequences of (mean over the sequence's tokens).
On-policy (one update per rollout) old_logp is stop_gradient(logp): ratio is exactly 1, the gradient
is the plain policy gradient and no separate old-log-prob forward runs; with more updates per
rollout old_logp comes from a pass before the first update and clipping matters. With kl_coef 0
there is no reference: no KL term, no reference forward, no reference params.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trainer.data.batching import SID_ANSWER_TOKENS
from trainer.train import parallel
from trainer.train.losses import response_logprobs

N_RESP = SID_ANSWER_TOKENS  # upstream's completion mask covers the stop too (minionerec_trainer.py)


def grpo_loss(logp, old_logp, ref_logp, advantages, token_mask, clip_eps: float, kl_coef: float):
    """All [N, T] except advantages [N]; old_logp None: on-policy (stop_gradient(logp)); ref_logp
    None: no reference (kl_coef must be 0, no 'kl' metric). Returns (loss, metrics)."""
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    denom = jnp.maximum(token_mask.sum(axis=1), 1.0)
    seq_mean = lambda x: ((x * token_mask).sum(axis=1) / denom).mean()
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    metrics = {"pg_loss": seq_mean(pg), "clip_frac": seq_mean(clipped)}
    per_token = pg
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1.0
        per_token = pg + kl_coef * kl
        metrics["kl"] = seq_mean(kl)
    elif kl_coef:
        raise ValueError(f"rl.kl_coef={kl_coef} needs the reference log-probs")
    return seq_mean(per_token), metrics


def needs_reference(kl_coef: float) -> bool:
    return float(kl_coef) != 0.0


def needs_old_logprobs(updates_per_rollout: int) -> bool:
    return int(updates_per_rollout) > 1


def make_phase_fns(graphdef, tx: optax.GradientTransformation, clip_eps: float, kl_coef: float, state_shardings=None,
                   mesh=None):
    """Jitted (logprobs, update_step) over global batches of prompt+completion sequences.

    `update_step(params, opt_state, batch)` donates params and optimizer state (the caller
    rebinds both), so old and new train state never coexist in device memory. `batch` holds
    input_ids, attention_mask, advantages and, when needed, old_logp and ref_logp.
    `state_shardings` = (params, opt_state) shardings pins the update's outputs to its inputs'
    layout, so the next step's rollout sees the same shardings and reuses its compiled program.
    With `mesh`, activations are split by rows over it (trainer.train.parallel.rows_over).
    """

    def seq_logprobs(params, ids, mask):
        with parallel.rows_over(mesh):
            return response_logprobs(nnx.merge(graphdef, params), ids, mask, N_RESP)

    @jax.jit
    def logprobs(params, ids, mask):
        return seq_logprobs(params, ids, mask)

    @functools.partial(jax.jit, donate_argnums=(0, 1),
                       out_shardings=None if state_shardings is None else (*state_shardings, None))
    def update_step(params, opt_state, batch):
        def loss_fn(p):
            logp = seq_logprobs(p, batch["input_ids"], batch["attention_mask"])
            return grpo_loss(logp, batch.get("old_logp"), batch.get("ref_logp"), batch["advantages"],
                             jnp.ones_like(logp), clip_eps, kl_coef)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}

    return logprobs, update_step
