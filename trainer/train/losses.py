"""Log-probabilities of response tokens, shared by SFT (cross-entropy) and RL (policy gradient).

Sequences are left padded, so the response always occupies the last `n_resp` positions; only
those positions go through the vocabulary projection (151k columns for Qwen2.5), which keeps the
memory of a train step independent of the prompt length's share of the logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def response_logprobs(model, input_ids: jax.Array, attention_mask: jax.Array, n_resp: int,
                      dropout_rate: float = 0.0, dropout_key=None) -> jax.Array:
    """[B, n_resp] log p(token_t | tokens_<t) for the last n_resp tokens of each row (with dropout
    when given a key: SFT's training pass only)."""
    hidden = model.hidden_states(input_ids, attention_mask, dropout_rate, dropout_key)
    logits = model.logits(hidden[:, -n_resp - 1:-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = input_ids[:, -n_resp:]
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
