"""Phase 4, update: clipped policy gradient with a k3 KL penalty to the frozen reference.

Per token t of completion i:  ratio = exp(logp - old_logp),
  pg = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i),
  kl = exp(ref_logp - logp) - (ref_logp - logp) - 1          (k3, always >= 0),
  loss_t = pg + kl_coef * kl;  loss = mean over sequences of (mean over the sequence's tokens).
With one update per rollout old_logp == logp numerically, ratio is 1 and the gradient is the
plain policy gradient; clipping matters from the second update on.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trainer.train.losses import response_logprobs

N_RESP = 4  # a, b, c, newline


def grpo_loss(logp, old_logp, ref_logp, advantages, token_mask, clip_eps: float, kl_coef: float):
    """All [N, T] except advantages [N]. Returns (loss, metrics)."""
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    delta = ref_logp - logp
    kl = jnp.exp(delta) - delta - 1.0
    per_token = pg + kl_coef * kl
    denom = jnp.maximum(token_mask.sum(axis=1), 1.0)
    seq_mean = lambda x: ((x * token_mask).sum(axis=1) / denom).mean()
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    return seq_mean(per_token), {"pg_loss": seq_mean(pg), "kl": seq_mean(kl), "clip_frac": seq_mean(clipped)}


def make_phase_fns(graphdef, tx: optax.GradientTransformation, clip_eps: float, kl_coef: float, state_shardings=None):
    """Jitted (logprobs, update_step) over global batches of prompt+completion sequences.

    `state_shardings` = (params, opt_state) shardings pins the update's outputs to its inputs'
    layout, so the next step's rollout sees the same shardings and reuses its compiled program.
    """

    def seq_logprobs(params, ids, mask):
        return response_logprobs(nnx.merge(graphdef, params), ids, mask, N_RESP)

    @jax.jit
    def logprobs(params, ids, mask):
        return seq_logprobs(params, ids, mask)

    @functools.partial(jax.jit, out_shardings=None if state_shardings is None else (*state_shardings, None))
    def update_step(params, opt_state, batch):
        def loss_fn(p):
            logp = seq_logprobs(p, batch["input_ids"], batch["attention_mask"])
            return grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                             jnp.ones_like(logp), clip_eps, kl_coef)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}

    return logprobs, update_step
