"""Saving and loading a teleport policy: its configuration and weights in one file."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx
from flax import serialization

from teleport_jax._src.learned import policy as pol_lib

FORMAT = "teleport_jax.policy/1"


def save_policy(path: str | pathlib.Path, policy: nnx.Module) -> pathlib.Path:
  """Writes ``policy`` to ``path`` (msgpack: format tag, configuration, sizes, weights).

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  weights = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(policy, nnx.Param)))
  record = {
    "format": FORMAT,
    "config": json.dumps(dataclasses.asdict(policy.config)),
    "shapes": json.dumps(getattr(policy, "shapes", None)),
    "n_in": int(getattr(policy, "n_in", 0)),
    "weights": weights,
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.msgpack_serialize(record))
  return path


def load_policy(path: str | pathlib.Path) -> nnx.Module:
  """Reads a policy written by :func:`save_policy`.

  Raises:
    ValueError: if the file is not a saved policy.
  """
  path = pathlib.Path(path)
  record = serialization.msgpack_restore(path.read_bytes())
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(f"{path} is not a policy saved by teleport_jax.learned.save_policy.")
  cfg = json.loads(record["config"])
  if cfg.get("lr_range") is not None:
    cfg["lr_range"] = tuple(cfg["lr_range"])
  config = pol_lib.PolicyConfig(**cfg)
  if config.kind == "equivariant":
    policy = pol_lib.EquivariantPolicy(config)
  else:
    policy = pol_lib.LSTMPolicy(config, json.loads(record["shapes"]), record["n_in"])
  state = nnx.state(policy, nnx.Param)
  nnx.replace_by_pure_dict(state, record["weights"])
  nnx.update(policy, state)
  return policy
