"""JAX trainer for semantic-ID recommenders: model, data, SFT, RL, decoding, metrics."""
