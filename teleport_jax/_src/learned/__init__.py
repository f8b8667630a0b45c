"""Learned teleports: policies, the guarded optax wrapper that applies them, meta-training."""
