"""Symmetry discovery: axis labels (:mod:`.labels`) propagated through a traced
program (:mod:`.propagation`, with the per-primitive rules in ``rules_*``) and
the groups read off them (:mod:`.discovery`).

May import: ``core``, ``symmetries``.
"""
