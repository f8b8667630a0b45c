"""The optax side: :func:`~teleport_jax.with_teleport`, the schedules that
say when it teleports, and the balanced wrapper.

May import: every other subpackage.
"""
