"""Fixed pseudo-random arrays for compiled programs, drawn on the host.

The symmetry check's directions and perturbation and the start vectors of
power iterations are fixed, seeded draws: constants of the program. Drawn with
``jax.random`` inside a compiled teleport, each costs a threefry program, which
XLA:CPU compiles in about as long as a small model's gradient (0.8 s for the
four leaves of a 784-64-10 MLP). Drawn here with numpy while the program is
traced, they cost nothing to compile.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=128)
def _draw(seed: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  out = np.random.default_rng(list(seed)).standard_normal(shape)
  out.flags.writeable = False
  return out


def _flat(seed) -> tuple[int, ...]:
  if isinstance(seed, int | np.integer):
    return (int(seed),)
  return tuple(s for part in seed for s in _flat(part))


def normal(seed: int | tuple[int, ...], shape: tuple[int, ...], dtype: Any) -> chex.Array:
  """Standard normal draws of ``shape`` from numpy's ``default_rng(seed)``, as a constant.

  Args:
    seed: a non-negative int or a (nested) tuple of them (a seed sequence).
    shape: the shape of the result.
    dtype: its floating dtype.

  Returns:
    An array of ``shape`` and ``dtype``: the same values for the same arguments.
  """
  return jnp.asarray(_draw(_flat(seed), tuple(int(d) for d in shape)), dtype)
