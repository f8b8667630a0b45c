"""Calling a loss with or without a batch.

The symmetries bind a loss (an MLP's layer order is read from how the loss
calls the model) and the objectives evaluate it, so the one convention both
follow lives here, below them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex

LossFn = Callable[..., chex.Array]


def call_loss(loss_fn: LossFn, params: chex.ArrayTree, data: Any) -> chex.Array:
  """Calls ``loss_fn(params, data)``, or ``loss_fn(params)`` when ``data is None``."""
  return loss_fn(params) if data is None else loss_fn(params, data)
