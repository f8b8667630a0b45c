"""The library's exception for configuration errors and rejected teleports.

It lives in a module of its own, importing nothing, so that every module can
raise it without an import cycle.
"""


class TeleportError(ValueError):
  """A teleport that cannot be done as configured, or (``throw=True``) was rejected.

  Raised eagerly for configuration errors: a group that is not a symmetry of
  the loss, :func:`teleport_jax.with_teleport` placed inside an
  ``optax.chain`` next to other links, :func:`teleport_jax.objectives.optimizer_lookahead`
  without an optimizer. With ``throw=True``, :func:`teleport_jax.teleport`
  raises it for every rejected teleport. A subclass of ``ValueError``, so
  ``except ValueError`` catches it too.
  """
