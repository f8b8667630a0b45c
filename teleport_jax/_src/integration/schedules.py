"""When to teleport: schedules evaluated inside jit on the step count.

A schedule is a small pytree of integer arrays with a ``__call__(count)`` that
returns a boolean scalar. It is stored in the optimizer state, so changing its
values (``every(5)`` -> ``every(10)``) does not recompile a jitted train step.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax.numpy as jnp
import numpy as np
from flax import struct

_INT_MAX = np.iinfo(np.int32).max


@struct.dataclass
class Periodic:
  """Teleport at ``start, start + period, ...`` while ``count < stop``."""

  period: chex.Array
  start: chex.Array
  stop: chex.Array

  def __call__(self, count: chex.Array) -> chex.Array:
    count = jnp.asarray(count, jnp.int32)
    return (count >= self.start) & (count < self.stop) & ((count - self.start) % self.period == 0)


@struct.dataclass
class AtSteps:
  """Teleport at the listed step counts (``-1`` entries are padding)."""

  steps: chex.Array

  def __call__(self, count: chex.Array) -> chex.Array:
    return jnp.any(jnp.asarray(count, jnp.int32) == self.steps)


Schedule = Periodic | AtSteps


def _check_int(name, v, minimum):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}.")


def every(k: int, start: int | None = None, stop: int | None = None) -> Periodic:
  """Teleport every ``k`` optimizer steps from step ``start`` (0-based) to ``stop``.

  ``start`` defaults to ``k``: the first teleport comes after ``k`` optimizer
  steps, not at step 0, where the optimizer's state is fresh (Adam's first
  steps are sign-like, so a look-ahead from a fresh state ranks orbit points by
  rounding). Teleporting a fresh state is opt-in: ``every(k, start=0)``.
  """
  _check_int("k", k, 1)
  if start is None:
    start = k
  _check_int("start", start, 0)
  if stop is not None:
    _check_int("stop", stop, 0)
  return Periodic(
    period=jnp.asarray(k, jnp.int32),
    start=jnp.asarray(start, jnp.int32),
    stop=jnp.asarray(_INT_MAX if stop is None else stop, jnp.int32),
  )


def first(n: int) -> Periodic:
  """Teleport at each of the first ``n`` optimizer steps (counts ``0..n-1``)."""
  _check_int("n", n, 0)
  return every(1, 0, n)


def at_steps(steps: Sequence[int], pad_to: int | None = None) -> AtSteps:
  """Teleport at the given 0-based step counts.

  Args:
    steps: step counts; each a non-negative int.
    pad_to: pad the list to this length with ``-1`` so that schedules with
      different numbers of steps share one compiled train step.
  """
  steps = list(steps)
  for s in steps:
    _check_int("schedule step", s, 0)
  if pad_to is not None:
    if pad_to < len(steps):
      raise ValueError(f"pad_to={pad_to} is shorter than the {len(steps)} steps.")
    steps = steps + [-1] * (pad_to - len(steps))
  if not steps:
    steps = [-1]
  return AtSteps(steps=jnp.asarray(steps, jnp.int32))


def fires_within(schedule: Schedule, count: int, num_steps: int = 1) -> bool:
  """Whether ``schedule`` fires at a step count in ``[count, count + num_steps)``.

  Evaluated on the host (NumPy, no dispatch): for deciding in Python which of
  two compiled programs runs the next steps, one that may teleport and one
  compiled with ``teleport=False`` (see :func:`teleport_jax.teleport_due`).

  Args:
    schedule: a :class:`Periodic` or :class:`AtSteps` (its arrays are read to
      the host).
    count: the step count of the first step of the window (``>= 0``).
    num_steps: the window's length (``>= 1``).

  Raises:
    TypeError: if ``schedule`` is not a schedule.
    ValueError: if ``count`` or ``num_steps`` is out of range.
  """
  _check_int("count", count, 0)
  _check_int("num_steps", num_steps, 1)
  count, end = int(count), int(count) + num_steps
  if isinstance(schedule, Periodic):
    period, start, stop = (
      int(np.asarray(getattr(schedule, f))) for f in ("period", "start", "stop")
    )
    first_due = max(count, start)
    first_due = start + -(-(first_due - start) // period) * period  # next firing >= it
    return first_due < min(end, stop)
  if isinstance(schedule, AtSteps):
    steps = np.asarray(schedule.steps)
    return bool(np.any((steps >= count) & (steps < end)))
  raise TypeError(f"schedule must be a Periodic or AtSteps, got {type(schedule).__name__}.")


def as_schedule(schedule) -> Schedule:
  """Resolves an int (every k), a sequence of ints (at steps) or a schedule.

  An int ``k`` is :func:`every` ``(k)``: steps ``k, 2k, ...`` (the first teleport
  after ``k`` optimizer steps, never on a fresh optimizer state).

  Raises:
    ValueError: if ``schedule`` is not understood.
  """
  if isinstance(schedule, (Periodic, AtSteps)):
    return schedule
  if isinstance(schedule, (int, np.integer)) and not isinstance(schedule, bool):
    if schedule < 1:
      raise ValueError(f"schedule: an int means 'every k steps' and must be >= 1, got {schedule}.")
    return every(int(schedule))
  if isinstance(schedule, (list, tuple)) and all(
    isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in schedule
  ):
    if any(s < 0 for s in schedule):
      raise ValueError(f"schedule: step counts must be >= 0, got {list(schedule)}.")
    return at_steps(schedule)
  raise ValueError(
    f"schedule not understood: {schedule!r}. Use an int k (every k steps), a list "
    "of step counts, teleport_jax.every(k), teleport_jax.schedules.at_steps([...]) or "
    "teleport_jax.schedules.first(n)."
  )
