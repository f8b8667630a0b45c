"""Naming the leaves of a parameter pytree.

Symmetries say *where* they act by leaf paths. A path here is a tuple of key
names as strings, e.g. ``("params", "Dense_0", "kernel")`` for a flax linen
dict or ``("att", "query", "kernel")`` for a flax nnx state (the trailing
``.value`` attribute of an nnx variable is dropped). :func:`path_str` joins one
with ``/`` for messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax

Path = tuple[str, ...]


def key_name(key: Any) -> str:
  """The name of one entry of a JAX key path (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def normalize(path: Sequence[Any]) -> Path:
  """A JAX key path as a tuple of names, without an nnx variable's ``.value``."""
  names = []
  for i, key in enumerate(path):
    if (
      i == len(path) - 1
      and isinstance(key, jax.tree_util.GetAttrKey)
      and key.name in ("value", "raw_value")
    ):
      continue
    names.append(key_name(key))
  return tuple(names)


def path_str(path: Sequence[Any]) -> str:
  """``"params/Dense_0/kernel"`` for a path (names or JAX keys)."""
  names = path if all(isinstance(p, str) for p in path) else normalize(path)
  return "/".join(names) or "(root)"


def as_path(path: str | Sequence[Any]) -> Path:
  """Accepts ``"a/b/c"``, a tuple of names or a JAX key path."""
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  path = tuple(path)
  if all(isinstance(p, str) for p in path):
    return path
  return normalize(path)


class LeafIndex:
  """Flattened ``params`` with leaves addressable by normalized path.

  Attributes:
    leaves: the leaves, in ``jax.tree_util`` order.
    treedef: the tree structure.
    index: ``path -> position in leaves``.
  """

  def __init__(self, params: chex.ArrayTree):
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.paths = [normalize(p) for p, _ in flat]
    self.leaves = [leaf for _, leaf in flat]
    self.index = {p: i for i, p in enumerate(self.paths)}
    if len(self.index) != len(self.paths):
      raise ValueError("params: two leaves have the same path name; cannot address them.")

  def __contains__(self, path: Path) -> bool:
    return path in self.index

  def get(self, path: Path, *, what: str = "leaf") -> chex.Array:
    if path not in self.index:
      raise ValueError(
        f"params has no leaf at {path_str(path)} ({what}); the parameter pytree does not "
        "match the symmetry's sites."
      )
    return self.leaves[self.index[path]]

  def set(self, path: Path, value: chex.Array) -> None:
    self.leaves[self.index[path]] = value

  def unflatten(self) -> chex.ArrayTree:
    return jax.tree_util.tree_unflatten(self.treedef, self.leaves)
