"""Low-precision floating dtypes, and reading them in float32.

A teleport computes in float32 where parameters or optimizer states are kept
in bfloat16/float16; the tracer widens such programs for its symmetry checks.
Both ask the same question, so the answer lives here, importing nothing from
the library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LOW_PRECISION = frozenset({jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})


def upcast(tree: Any) -> Any:
  """``tree`` with its bfloat16/float16 leaves in float32, the teleport's compute dtype.

  For optimizer states as for parameters: a state kept in bfloat16 (optax's
  moments follow the parameters' dtype by default) is read in float32 where a
  teleport computes with it; integer leaves (counts) and wider leaves are
  unchanged. The caller casts results back where they leave the teleport
  (``optax.tree.cast_like``).
  """

  def up(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) in LOW_PRECISION:
      return jnp.asarray(x).astype(jnp.float32)
    return x

  return jax.tree_util.tree_map(up, tree)
