"""Where the dense layers of a multilayer perceptron live in a parameter pytree.

A symmetry of an MLP acts on the weight matrices (kernels) and biases of its
layers. Parameter pytrees come in many layouts: a plain list of weight
matrices, a list of ``(weight, bias)`` pairs, ``flax.linen`` parameter dicts
(``{"params": {"Dense_0": {"kernel", "bias"}}}``) or ``flax.nnx`` states. An
:class:`MLPLayout` records, for each layer in call order, the key path of its
kernel and of its bias (if any), and whether kernels are stored as
``(in, out)`` (flax) or ``(out, in)`` (the ``W @ x`` convention).

Internally the library always works in the canonical form: kernels of shape
``(in, out)``, biases of shape ``(out,)`` and activations of shape
``(batch, features)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal

import chex
import jax
import jax.numpy as jnp

KeyPath = tuple[Any, ...]
KernelFormat = Literal["in_out", "out_in"]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _natural_key(path: KeyPath) -> tuple:
  parts = []
  for key in path:
    for tok in re.split(r"(\d+)", _key_name(key)):
      if tok:
        parts.append((0, int(tok), "") if tok.isdigit() else (1, 0, tok))
  return tuple(parts)


@dataclasses.dataclass(frozen=True)
class MLPLayout:
  """The dense layers of an MLP inside a parameter pytree, in call order.

  Attributes:
    kernel_paths: key paths (as given by ``jax.tree_util.tree_flatten_with_path``)
      of the layers' weight matrices, first layer first.
    bias_paths: key paths of the biases, ``None`` for a layer without bias.
    kernel_format: ``"in_out"`` if kernels have shape ``(in, out)`` and the
      layer computes ``x @ kernel`` (flax); ``"out_in"`` if they have shape
      ``(out, in)`` and the layer computes ``kernel @ x``.
  """

  kernel_paths: tuple[KeyPath, ...]
  bias_paths: tuple[KeyPath | None, ...]
  kernel_format: KernelFormat = "in_out"

  def __post_init__(self):
    if len(self.kernel_paths) < 2:
      raise ValueError(
        "layout: an MLP needs at least two dense layers (one hidden layer); "
        f"got {len(self.kernel_paths)}."
      )
    if len(self.bias_paths) != len(self.kernel_paths):
      raise ValueError(
        "bias_paths must have one entry (or None) per kernel; got "
        f"{len(self.bias_paths)} for {len(self.kernel_paths)} kernels."
      )
    if self.kernel_format not in ("in_out", "out_in"):
      raise ValueError(f"kernel_format must be 'in_out' or 'out_in', got {self.kernel_format!r}.")

  @property
  def num_layers(self) -> int:
    return len(self.kernel_paths)

  @property
  def has_bias(self) -> bool:
    return any(p is not None for p in self.bias_paths)

  # --------------------------------------------------------------- reading
  def _leaf_index(self, params: chex.ArrayTree) -> tuple[list, Any, dict]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {tuple(p): i for i, (p, _) in enumerate(leaves_with_path)}
    return [leaf for _, leaf in leaves_with_path], treedef, index

  def get(self, params: chex.ArrayTree) -> tuple[list[chex.Array], list[chex.Array | None]]:
    """Returns ``(kernels, biases)`` in canonical ``(in, out)`` form.

    Raises:
      ValueError: if a path of the layout is missing from ``params`` or the
        shapes of consecutive layers do not chain.
    """
    leaves, _, index = self._leaf_index(params)
    kernels, biases = [], []
    for i, (kp, bp) in enumerate(zip(self.kernel_paths, self.bias_paths)):
      if kp not in index:
        raise ValueError(
          f"params has no leaf at {jax.tree_util.keystr(kp)} (kernel of layer {i}); "
          "the parameter pytree does not match the symmetry's layout."
        )
      k = leaves[index[kp]]
      if getattr(k, "ndim", None) != 2:
        raise ValueError(
          f"params: kernel of layer {i} at {jax.tree_util.keystr(kp)} must be a "
          f"2-D array, got shape {getattr(k, 'shape', type(k))}."
        )
      kernels.append(k.T if self.kernel_format == "out_in" else k)
      if bp is None:
        biases.append(None)
      else:
        if bp not in index:
          raise ValueError(f"params has no leaf at {jax.tree_util.keystr(bp)} (bias of layer {i}).")
        biases.append(leaves[index[bp]])
    _check_chain(kernels, biases)
    return kernels, biases

  def set(
    self,
    params: chex.ArrayTree,
    kernels: Sequence[chex.Array],
    biases: Sequence[chex.Array | None],
  ) -> chex.ArrayTree:
    """Returns a copy of ``params`` with the layers replaced (canonical form in)."""
    leaves, treedef, index = self._leaf_index(params)
    leaves = list(leaves)
    for kp, bp, k, b in zip(self.kernel_paths, self.bias_paths, kernels, biases):
      leaves[index[kp]] = k.T if self.kernel_format == "out_in" else k
      if bp is not None:
        leaves[index[bp]] = b
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def widths(self, params: chex.ArrayTree) -> tuple[int, ...]:
    """Feature sizes ``(d_0, d_1, ..., d_L)`` of input, hidden layers and output."""
    kernels, _ = self.get(params)
    return (kernels[0].shape[0],) + tuple(k.shape[1] for k in kernels)

  def hidden_widths(self, params: chex.ArrayTree) -> tuple[int, ...]:
    return self.widths(params)[1:-1]


def _check_chain(kernels, biases) -> None:
  for i in range(len(kernels) - 1):
    if kernels[i].shape[1] != kernels[i + 1].shape[0]:
      raise ValueError(
        f"params: layer {i} has {kernels[i].shape[1]} outputs but layer {i + 1} "
        f"expects {kernels[i + 1].shape[0]} inputs; the layers do not form an MLP "
        "chain (wrong layer order or kernel_format?)."
      )
  for i, (k, b) in enumerate(zip(kernels, biases)):
    if b is not None and tuple(b.shape) != (k.shape[1],):
      raise ValueError(
        f"params: bias of layer {i} has shape {tuple(b.shape)}, expected ({k.shape[1]},)."
      )


def infer_layout(
  params: chex.ArrayTree,
  kernel_format: KernelFormat | None = None,
  *,
  call: tuple[Callable, tuple] | None = None,
) -> MLPLayout:
  """Finds the dense layers of an MLP in a parameter pytree, in call order.

  Recognised layouts:

  * a list/tuple of 2-D weight matrices, or of ``(weight, bias)`` pairs: the
    list order is the call order; weights are taken as ``(out, in)``
    (``kernel_format="out_in"``, the ``W @ x`` convention of the published
    experiments) unless ``kernel_format`` says so;
  * any pytree whose leaves are named ``kernel``/``bias`` (``flax.linen``
    parameter dicts, ``flax.nnx`` states), or ``w``/``b``, ``weight``/``bias``:
    kernels are ``(in, out)`` unless ``kernel_format`` says otherwise.

  **Layer order.** With ``call=(fn, args)`` (``fn(*args)`` runs the model, e.g.
  the loss and its arguments; :func:`teleport_jax.teleport` passes its own),
  the order is read from the traced program: the order in which the kernels are
  first contracted. Without it, the order is known only where the names say
  it: flax's automatic names (``Dense_0``, ``Dense_1``, ..., ``layers_0``, ...:
  one prefix, a number, siblings in one module), which flax assigns in call
  order. Any other naming (``input_layer``, ``hidden``, ``output``) is ambiguous
  and raises, saying how to give the order.

  Args:
    params: the parameter pytree.
    kernel_format: overrides the kernel orientation.
    call: ``(fn, args)`` such that ``fn(*args)`` calls the model with ``params``
      as (part of) its arguments.

  Returns:
    The layout.

  Raises:
    ValueError: if no chain of dense layers is found, or the order is ambiguous.
  """
  leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  if not leaves_with_path:
    raise ValueError("params is empty; expected the parameters of an MLP.")
  # A flat sequence of matrices / (matrix, vector) pairs.
  if isinstance(params, (list, tuple)) and all(_is_matrix_or_pair(p) for p in params):
    kpaths, bpaths = [], []
    for path, leaf in leaves_with_path:
      if getattr(leaf, "ndim", None) == 2:
        kpaths.append(tuple(path))
      elif getattr(leaf, "ndim", None) == 1:
        bpaths.append(tuple(path))
    if kernel_format is None and call is not None:
      kernel_format = _format_from_call(params, kpaths, call)
    if len(kpaths) < 2:
      raise ValueError(
        f"params: found {len(kpaths)} dense layer(s); teleporting needs at least two "
        "(one hidden layer between them)."
      )
    if bpaths and len(bpaths) != len(kpaths):
      raise ValueError("params: a sequence of layers must give every layer a bias or none.")
    layout = MLPLayout(
      tuple(kpaths),
      tuple(bpaths) if bpaths else (None,) * len(kpaths),
      kernel_format or "out_in",
    )
    layout.get(params)
    return layout

  kernel_names = {"kernel": "bias", "w": "b", "weight": "bias", "W": "b"}
  kernels: dict[KeyPath, KeyPath | None] = {}
  names = {tuple(p): _leaf_name(p) for p, _ in leaves_with_path}
  parents = {tuple(p): _parent(p) for p, _ in leaves_with_path}
  by_parent_name = {(parents[tuple(p)], names[tuple(p)]): tuple(p) for p, _ in leaves_with_path}
  for path, leaf in leaves_with_path:
    path = tuple(path)
    name = names[path]
    if name in kernel_names and getattr(leaf, "ndim", None) == 2:
      kernels[path] = by_parent_name.get((parents[path], kernel_names[name]))
  if len(kernels) < 2:
    raise ValueError(
      "Could not find the dense layers of an MLP in params: expected a list of "
      "weight matrices or leaves named 'kernel'/'bias' (flax). Pass an explicit "
      "teleport_jax.symmetries.MLPLayout."
    )
  if call is not None:
    order = _order_from_call(params, list(kernels), call)
    if kernel_format is None:
      kernel_format = _format_from_call(params, order, call)
  elif _auto_numbered(list(kernels)):
    order = sorted(kernels, key=_natural_key)
  else:
    names_list = ", ".join(jax.tree_util.keystr(k) for k in kernels)
    raise ValueError(
      f"params: the layer order is ambiguous: the kernels {names_list} are not named in "
      "call order (flax's automatic names Dense_0, Dense_1, ... are). Give the order: "
      "teleport with a loss function (teleport_jax.teleport and with_teleport read the "
      "order from how the loss calls the model), build the layout from a call with "
      "teleport_jax.symmetries.infer_layout(params, call=(apply_fn, (params, x))), or pass "
      "teleport_jax.symmetries.MLPLayout(kernel_paths=..., bias_paths=...) listing the kernels in "
      "call order."
    )
  layout = MLPLayout(tuple(order), tuple(kernels[k] for k in order), kernel_format or "in_out")
  layout.get(params)  # validates the chain
  return layout


_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")


def _auto_numbered(kernel_paths: list[KeyPath]) -> bool:
  """Whether the kernels' modules are siblings named ``<prefix>_<n>`` with one prefix."""
  modules = [_parent(p) for p in kernel_paths]
  if len({m[:-1] for m in modules}) != 1 or any(not m for m in modules):
    return False
  prefixes = set()
  for m in modules:
    match = _NUMBERED.match(_key_name(m[-1]))
    if not match:
      return False
    prefixes.add(match.group(1))
  return len(prefixes) == 1


def _positions(params, kernel_paths, call):
  """Flat positions of ``kernel_paths`` among the leaves of ``call``'s arguments."""
  fn, args = call
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  target = {tuple(p): i for i, (p, _) in enumerate(flat)}
  arg_leaves = jax.tree_util.tree_leaves(args)
  params_leaves = [leaf for _, leaf in flat]
  for i in range(len(arg_leaves) - len(params_leaves) + 1):
    if all(arg_leaves[i + j] is params_leaves[j] for j in range(len(params_leaves))):
      return [i + target[p] for p in kernel_paths]
  raise ValueError("infer_layout: call=(fn, args) must pass params itself among args.")


def _format_from_call(params, kernel_paths, call) -> KernelFormat | None:
  """``"in_out"`` if the model contracts the kernels' first axis (``x @ K``), ``"out_in"``
  if their second (``K @ x``); ``None`` if the call does not say."""
  from teleport_jax._src.core import tracing

  fn, args = call
  try:
    uses = tracing.first_uses(fn, args, _positions(params, kernel_paths, call))
  except (TypeError, ValueError):  # the call does not trace with these params: the
    return None  # shape checks that follow name the bad layer
  axes = {u[1] for u in uses if u is not None and u[1] is not None}
  if axes == {(0,)}:
    return "in_out"
  if axes == {(1,)}:
    return "out_in"
  return None


def _order_from_call(params, kernel_paths: list[KeyPath], call) -> list[KeyPath]:
  from teleport_jax._src.core import tracing

  fn, args = call
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  target = {tuple(p): i for i, (p, _) in enumerate(flat)}
  # params must be one of the call's arguments: find where its leaves start
  arg_leaves = jax.tree_util.tree_leaves(args)
  params_leaves = [leaf for _, leaf in flat]
  start = None
  for i in range(len(arg_leaves) - len(params_leaves) + 1):
    if all(arg_leaves[i + j] is params_leaves[j] for j in range(len(params_leaves))):
      start = i
      break
  if start is None:
    raise ValueError("infer_layout: call=(fn, args) must pass params itself among args.")
  positions = [start + target[p] for p in kernel_paths]
  first = tracing.first_use_order(fn, args, positions)
  unused = [jax.tree_util.keystr(p) for p, f in zip(kernel_paths, first) if f is None]
  if unused:
    raise ValueError(
      f"params: the kernels {', '.join(unused)} are not used by the model call, so they "
      "are not part of an MLP chain; pass an explicit teleport_jax.symmetries.MLPLayout."
    )
  return [p for _, p in sorted(zip(first, kernel_paths), key=lambda t: t[0])]


def _is_matrix_or_pair(x) -> bool:
  if getattr(x, "ndim", None) == 2:
    return True
  if isinstance(x, (list, tuple)) and len(x) == 2:
    return getattr(x[0], "ndim", None) == 2 and getattr(x[1], "ndim", None) == 1
  return False


def _leaf_name(path) -> str:
  # flax.nnx states end in a `.value` attribute; the name is the key above it.
  names = [_key_name(k) for k in path]
  if names and names[-1] in ("value", "raw_value") and len(names) > 1:
    return names[-2]
  return names[-1] if names else ""


def _parent(path) -> KeyPath:
  path = tuple(path)
  names = [_key_name(k) for k in path]
  if names and names[-1] in ("value", "raw_value") and len(names) > 1:
    return path[:-2]
  return path[:-1]


def as_layout(layout: MLPLayout | None, params: chex.ArrayTree) -> MLPLayout:
  """Returns ``layout`` or the layout inferred from ``params``."""
  if layout is None:
    return infer_layout(params)
  if not isinstance(layout, MLPLayout):
    raise TypeError(
      f"layout must be a teleport_jax.symmetries.MLPLayout, got {type(layout).__name__}."
    )
  return layout


def mlp_forward(
  kernels: Sequence[chex.Array],
  biases: Sequence[chex.Array | None],
  activation,
  inputs: chex.Array,
) -> tuple[list[chex.Array], list[chex.Array]]:
  """Runs an MLP in canonical form, returning what the symmetries need.

  Args:
    kernels: ``L`` kernels of shape ``(d_{m-1}, d_m)``.
    biases: ``L`` biases of shape ``(d_m,)`` or ``None``.
    activation: the hidden activation (not applied after the last layer).
    inputs: ``(batch, d_0)``.

  Returns:
    ``(layer_inputs, pre_activations)``: ``layer_inputs[m]`` is the input of
    layer ``m`` (``(batch, d_{m-1})``, ``layer_inputs[0] == inputs``) and
    ``pre_activations[m]`` its pre-activation (``(batch, d_m)``), for all ``L``
    layers.
  """
  h = inputs
  layer_inputs, pre = [], []
  for m, (k, b) in enumerate(zip(kernels, biases)):
    layer_inputs.append(h)
    z = h @ k
    if b is not None:
      z = z + b
    pre.append(z)
    if m < len(kernels) - 1:
      h = activation(z)
  return layer_inputs, pre


def tree_leaves_finite(tree: chex.ArrayTree) -> chex.Array:
  """``True`` iff every entry of every floating leaf is finite (traceable)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
