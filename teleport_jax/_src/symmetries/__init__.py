"""Symmetries: the :class:`~teleport_jax.symmetries.Symmetry` protocol, the groups and the
sites they act on, the MLP symmetries (rescaling, linear and data-dependent
GL), rotations and the 2-D test functions, activations, the catalogue
finders and the check that a group leaves a loss unchanged.

May import: ``core``.
"""
