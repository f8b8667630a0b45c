"""Teleport back-ends: how a teleport searches the orbit.

Pass one as ``tj.teleport(..., solver=...)`` (or its name: ``"lie"``,
``"normbalance"``, ``"gradbalance"``, ``"linesearch"``, ``"nullspace"``,
``"levelset"``). See ``docs/backends.md``.
"""

from teleport_jax._src.solver.backends import Lie
from teleport_jax._src.solver.backends import Solver
from teleport_jax._src.solver.balancing import Balance
from teleport_jax._src.solver.balancing import LineSearch
from teleport_jax._src.solver.levelset import LevelSet
from teleport_jax._src.solver.nullspace import NullSpace
from teleport_jax._src.solver.nullspace import held_out_drift
from teleport_jax._src.solver.nullspace import nullspace_report
from teleport_jax._src.solver.onestep import OneStep

__all__ = (
  "Balance",
  "LevelSet",
  "Lie",
  "LineSearch",
  "NullSpace",
  "OneStep",
  "Solver",
  "held_out_drift",
  "nullspace_report",
)
