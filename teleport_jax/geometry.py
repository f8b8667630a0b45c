"""Measures of a point: sharpness, the Hessian's extreme eigenvalue, orbit curvature."""

from teleport_jax._src.objectives.geometry import orbit_curvature
from teleport_jax._src.objectives.geometry import sharpness
from teleport_jax._src.objectives.objectives import hessian_max_eigenvalue

__all__ = (
  "hessian_max_eigenvalue",
  "orbit_curvature",
  "sharpness",
)
