"""Two-dimensional test problems with a rotation symmetry (Booth, Rosenbrock)."""

from teleport_jax._src.symmetries.functions import RosenbrockRotation
from teleport_jax._src.symmetries.functions import booth
from teleport_jax._src.symmetries.functions import booth_symmetry
from teleport_jax._src.symmetries.functions import rosenbrock
from teleport_jax._src.symmetries.functions import rosenbrock_symmetry

__all__ = (
  "RosenbrockRotation",
  "booth",
  "booth_symmetry",
  "rosenbrock",
  "rosenbrock_symmetry",
)
