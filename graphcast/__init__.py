"""GraphCast in JAX + haiku + jraph, parameter-compatible with the official checkpoints."""
