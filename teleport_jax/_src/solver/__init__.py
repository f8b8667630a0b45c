"""The teleport: the driver (:mod:`.solver`), its back-ends (:mod:`.backends`
holds the base types and the registry of names; :mod:`.nullspace`,
:mod:`.levelset` and :mod:`.balancing` register into it) and the transport of
optimizer state to the teleported point.

May import: ``core``, ``symmetries``, ``discovery``, ``objectives``.
"""
