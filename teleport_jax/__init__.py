"""teleport_jax: symmetry teleportation for JAX and optax.

Exact symmetry actions on parameter pytrees, a jit-compiled teleport solver
and an optax transformation that teleports on a schedule.

The top level holds what a training loop uses: :func:`teleport`,
:func:`with_teleport`, :func:`balanced`, :func:`find_symmetries`, the MLP
symmetries, schedules' :func:`every`, and the result and error types. The rest
lives in namespaces, each documented in ``docs/api.md``:

* ``tj.symmetries``: every symmetry and its building blocks (sites, products);
* ``tj.groups``: what a group does on a channel axis;
* ``tj.finders``: where a group acts in common architectures;
* ``tj.activations``: activations with their inverse and homogeneity;
* ``tj.objectives``: what a teleport optimises, and the stability constraint;
* ``tj.solvers``: how a teleport searches the orbit (back-ends);
* ``tj.schedules``: when to teleport;
* ``tj.geometry``: sharpness, Hessian eigenvalues, orbit curvature;
* ``tj.problems``: 2-D test problems with a rotation symmetry;
* ``tj.learned``: learned teleports (policies, their optax wrapper, meta-training);
* ``teleport_jax.models``: a small zoo of flax models.
"""

from teleport_jax import activations
from teleport_jax import finders
from teleport_jax import geometry
from teleport_jax import groups
from teleport_jax import learned
from teleport_jax import objectives
from teleport_jax import problems
from teleport_jax import schedules
from teleport_jax import solvers
from teleport_jax import symmetries
from teleport_jax._src.discovery.discovery import Discovered
from teleport_jax._src.discovery.discovery import find_symmetries
from teleport_jax._src.discovery.discovery import verify
from teleport_jax._src.integration.balanced import BalancedState
from teleport_jax._src.integration.balanced import balanced
from teleport_jax._src.integration.schedules import every
from teleport_jax._src.integration.transform import TeleportState
from teleport_jax._src.integration.transform import TeleportWarning
from teleport_jax._src.integration.transform import teleport_due
from teleport_jax._src.integration.transform import with_teleport
from teleport_jax._src.solver.solver import TeleportConfig
from teleport_jax._src.solver.solver import TeleportError
from teleport_jax._src.solver.solver import TeleportInfo
from teleport_jax._src.solver.solver import TeleportStatus
from teleport_jax._src.solver.solver import default_rtol
from teleport_jax._src.solver.solver import group_action
from teleport_jax._src.solver.solver import status_message
from teleport_jax._src.solver.solver import teleport
from teleport_jax._src.solver.state_transport import transport_cotangent
from teleport_jax._src.solver.state_transport import transport_state
from teleport_jax._src.symmetries.data_gl import DataDependentGL
from teleport_jax._src.symmetries.linear_gl import LinearGL
from teleport_jax._src.symmetries.rescaling import PositiveRescaling
from teleport_jax._src.symmetries.sites import product

__version__ = "0.1.0"

__all__ = (
  "BalancedState",
  "DataDependentGL",
  "Discovered",
  "LinearGL",
  "PositiveRescaling",
  "TeleportConfig",
  "TeleportError",
  "TeleportInfo",
  "TeleportState",
  "TeleportStatus",
  "TeleportWarning",
  "activations",
  "balanced",
  "default_rtol",
  "every",
  "find_symmetries",
  "finders",
  "geometry",
  "group_action",
  "groups",
  "learned",
  "objectives",
  "problems",
  "product",
  "schedules",
  "solvers",
  "status_message",
  "symmetries",
  "teleport",
  "teleport_due",
  "transport_cotangent",
  "transport_state",
  "verify",
  "with_teleport",
)

_NAMESPACES = (activations, geometry, learned, objectives, problems, schedules, solvers, symmetries)


def __getattr__(name: str):
  """Points a name that lives in a namespace to it (``tj.relu`` -> ``tj.activations.relu``)."""
  for ns in _NAMESPACES:
    if name in ns.__all__:
      short = ns.__name__.rsplit(".", 1)[-1]
      raise AttributeError(
        f"module 'teleport_jax' has no attribute {name!r}; it lives in its namespace: "
        f"tj.{short}.{name}"
      )
  raise AttributeError(f"module 'teleport_jax' has no attribute {name!r}")
