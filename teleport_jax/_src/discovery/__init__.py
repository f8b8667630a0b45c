"""Symmetry discovery: axis labels propagated through a traced program
(:mod:`.labels`) and the groups read off them (:mod:`.discovery`).

May import: ``core``, ``symmetries``.
"""
