"""The implementation behind :mod:`teleport_jax`, in layers (private).

Each subpackage imports only from the layers before it in this order, lowest
first, and no module imports another in a cycle, at module level or inside a
function (``tests/test_layout.py`` reads the order from the line below and
enforces it)::

    core -> symmetries -> discovery -> objectives -> solver -> integration -> learned

* ``core``: errors, pytree paths, the jaxpr tracer, precision and loss calls.
* ``symmetries``: the :class:`~teleport_jax.symmetries.Symmetry` protocol, the groups and
  sites, the MLP and function symmetries, the catalogue finders, the check.
* ``discovery``: finding symmetries by propagating axis labels through a jaxpr.
* ``objectives``: what a teleport optimises, and the stability constraint.
* ``solver``: the teleport driver, its back-ends and optimizer-state transport.
* ``integration``: the optax transformation, its schedules, the balanced wrapper.
* ``learned``: teleport policies, their optax wrapper and meta-training.

The public API is re-exported by ``teleport_jax/__init__.py`` (what a training
loop uses) and the namespace modules beside it (``teleport_jax.objectives``,
``teleport_jax.solvers``, ...).
"""
