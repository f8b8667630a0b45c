"""When to teleport: schedules that live in the optimizer state.

An int ``k`` passed as a schedule means :func:`every` ``(k)``, a list means
:func:`at_steps`. Changing a schedule's values does not recompile.
"""

from teleport_jax._src.integration.schedules import AtSteps
from teleport_jax._src.integration.schedules import Periodic
from teleport_jax._src.integration.schedules import as_schedule
from teleport_jax._src.integration.schedules import at_steps
from teleport_jax._src.integration.schedules import every
from teleport_jax._src.integration.schedules import fires_within
from teleport_jax._src.integration.schedules import first

__all__ = (
  "AtSteps",
  "Periodic",
  "as_schedule",
  "at_steps",
  "every",
  "fires_within",
  "first",
)
