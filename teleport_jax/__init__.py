"""teleport_jax: symmetry teleportation for JAX and optax.

Exact symmetry actions on parameter pytrees, a jit-compiled teleport solver
and an optax transformation that teleports on a schedule.
"""

from teleport_jax._src.discovery.discovery import Discovered
from teleport_jax._src.discovery.discovery import find_symmetries
from teleport_jax._src.discovery.discovery import verify
from teleport_jax._src.integration.balanced import BalancedState
from teleport_jax._src.integration.balanced import balanced
from teleport_jax._src.integration.schedules import AtSteps
from teleport_jax._src.integration.schedules import Periodic
from teleport_jax._src.integration.schedules import as_schedule
from teleport_jax._src.integration.schedules import at_steps
from teleport_jax._src.integration.schedules import every
from teleport_jax._src.integration.schedules import fires_within
from teleport_jax._src.integration.schedules import first
from teleport_jax._src.integration.transform import TeleportState
from teleport_jax._src.integration.transform import TeleportWarning
from teleport_jax._src.integration.transform import teleport_due
from teleport_jax._src.integration.transform import with_teleport
from teleport_jax._src.objectives.geometry import orbit_curvature
from teleport_jax._src.objectives.geometry import sharpness
from teleport_jax._src.objectives.objectives import Objective
from teleport_jax._src.objectives.objectives import ObjectiveContext
from teleport_jax._src.objectives.objectives import as_objective
from teleport_jax._src.objectives.objectives import grad_norm_sq
from teleport_jax._src.objectives.objectives import hessian_max_eigenvalue
from teleport_jax._src.objectives.objectives import lookahead_loss
from teleport_jax._src.objectives.objectives import optimizer_lookahead
from teleport_jax._src.objectives.objectives import stability_constrained
from teleport_jax._src.objectives.stability import Stability
from teleport_jax._src.solver.backends import Lie
from teleport_jax._src.solver.backends import Solver
from teleport_jax._src.solver.balancing import Balance
from teleport_jax._src.solver.balancing import LineSearch
from teleport_jax._src.solver.levelset import LevelSet
from teleport_jax._src.solver.nullspace import NullSpace
from teleport_jax._src.solver.nullspace import held_out_drift
from teleport_jax._src.solver.nullspace import nullspace_report
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
from teleport_jax._src.symmetries import finders
from teleport_jax._src.symmetries import groups
from teleport_jax._src.symmetries.activations import Activation
from teleport_jax._src.symmetries.activations import as_activation
from teleport_jax._src.symmetries.activations import asinh
from teleport_jax._src.symmetries.activations import identity
from teleport_jax._src.symmetries.activations import leaky_relu
from teleport_jax._src.symmetries.activations import relu
from teleport_jax._src.symmetries.activations import tanh
from teleport_jax._src.symmetries.data_gl import DataDependentGL
from teleport_jax._src.symmetries.data_gl import PublishedDataDependentGL
from teleport_jax._src.symmetries.data_gl import default_get_inputs
from teleport_jax._src.symmetries.functions import RosenbrockRotation
from teleport_jax._src.symmetries.functions import booth
from teleport_jax._src.symmetries.functions import booth_symmetry
from teleport_jax._src.symmetries.functions import rosenbrock
from teleport_jax._src.symmetries.functions import rosenbrock_symmetry
from teleport_jax._src.symmetries.layouts import MLPLayout
from teleport_jax._src.symmetries.layouts import infer_layout
from teleport_jax._src.symmetries.linear_gl import LinearGL
from teleport_jax._src.symmetries.rescaling import PositiveRescaling
from teleport_jax._src.symmetries.rotation import QuadraticRotation
from teleport_jax._src.symmetries.rotation import Rotation
from teleport_jax._src.symmetries.sites import Product
from teleport_jax._src.symmetries.sites import Site
from teleport_jax._src.symmetries.sites import SiteSymmetry
from teleport_jax._src.symmetries.sites import Slot
from teleport_jax._src.symmetries.sites import product
from teleport_jax._src.symmetries.symmetry import Symmetry

__version__ = "0.1.0"

__all__ = (
  "Activation",
  "Balance",
  "BalancedState",
  "Discovered",
  "LevelSet",
  "NullSpace",
  "Lie",
  "LineSearch",
  "ObjectiveContext",
  "Product",
  "PublishedDataDependentGL",
  "Site",
  "SiteSymmetry",
  "Slot",
  "Solver",
  "Stability",
  "TeleportConfig",
  "TeleportError",
  "finders",
  "find_symmetries",
  "groups",
  "held_out_drift",
  "nullspace_report",
  "verify",
  "optimizer_lookahead",
  "product",
  "AtSteps",
  "DataDependentGL",
  "LinearGL",
  "MLPLayout",
  "Objective",
  "Periodic",
  "PositiveRescaling",
  "QuadraticRotation",
  "RosenbrockRotation",
  "Rotation",
  "Symmetry",
  "TeleportInfo",
  "TeleportState",
  "TeleportStatus",
  "TeleportWarning",
  "as_activation",
  "as_objective",
  "as_schedule",
  "asinh",
  "at_steps",
  "balanced",
  "booth",
  "booth_symmetry",
  "default_get_inputs",
  "default_rtol",
  "every",
  "fires_within",
  "first",
  "grad_norm_sq",
  "group_action",
  "hessian_max_eigenvalue",
  "identity",
  "infer_layout",
  "leaky_relu",
  "lookahead_loss",
  "orbit_curvature",
  "relu",
  "rosenbrock",
  "rosenbrock_symmetry",
  "sharpness",
  "stability_constrained",
  "status_message",
  "tanh",
  "teleport",
  "teleport_due",
  "transport_cotangent",
  "transport_state",
  "with_teleport",
)
