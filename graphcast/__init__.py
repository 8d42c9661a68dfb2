"""GraphCast in JAX + haiku, parameter-compatible with the official checkpoints."""
