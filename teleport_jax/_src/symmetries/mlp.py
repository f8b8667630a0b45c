"""The sites of an MLP chain, and what the MLP groups share.

:class:`~teleport_jax.PositiveRescaling` and :class:`~teleport_jax.LinearGL`
are products of one :class:`~teleport_jax.symmetries.SiteSymmetry` per hidden layer:
the hidden layer's kernel columns and bias are its writers, the next kernel's
rows its readers. Their element is a tuple with one entry per hidden layer.
The layers are found by :func:`teleport_jax.symmetries.infer_layout` (in call order, read
from the loss when the teleport has one) unless a layout is given.
"""

from __future__ import annotations

import dataclasses

import chex

from teleport_jax._src.core import losses
from teleport_jax._src.core import paths as paths_lib
from teleport_jax._src.symmetries import layouts
from teleport_jax._src.symmetries import sites as sites_lib
from teleport_jax._src.symmetries import symmetry


def mlp_sites(
  layout: layouts.MLPLayout, params: chex.ArrayTree, between: str
) -> tuple[sites_lib.Site, ...]:
  """One site per hidden layer of ``layout``."""
  kernels, _ = layout.get(params)
  out_axis, in_axis = (1, 0) if layout.kernel_format == "in_out" else (0, 1)
  out = []
  for m in range(layout.num_layers - 1):
    kp, bp, nxt = layout.kernel_paths[m], layout.bias_paths[m], layout.kernel_paths[m + 1]
    slots = [sites_lib.Slot(paths_lib.normalize(kp), out_axis, "out")]
    if bp is not None:
      slots.append(sites_lib.Slot(paths_lib.normalize(bp), 0, "out"))
    slots.append(sites_lib.Slot(paths_lib.normalize(nxt), in_axis, "in"))
    name = f"{_layer_name(kp)} -> {_layer_name(nxt)}"
    out.append(sites_lib.Site(name, tuple(slots), int(kernels[m].shape[1]), None, between))
  return tuple(out)


def _layer_name(path) -> str:
  names = paths_lib.normalize(path)
  if len(names) <= 2 and names and names[0].isdigit():  # a list of W or of (W, b)
    return f"layer {names[0]}"
  return paths_lib.path_str(names)


@dataclasses.dataclass(frozen=True)
class _LossCall:
  """``fn(params, data)`` for a loss that may take no data; hashable by value."""

  loss_fn: object

  def __call__(self, params, data):
    return losses.call_loss(self.loss_fn, params, data)


class MLPGroupMixin:
  """Layout handling shared by the MLP groups (``layout`` field, ``bind``)."""

  layout: layouts.MLPLayout | None

  def _layout(self, params):
    return layouts.as_layout(self.layout, params)

  def bind(self, loss_fn, params, data=None):
    """Fixes the layer order from how ``loss_fn`` calls the model (if not given)."""
    if self.layout is not None:
      return self
    call = (_LossCall(loss_fn), (params, data))
    return dataclasses.replace(self, layout=layouts.infer_layout(params, call=call))


def check_group_shapes(g, num_hidden: int, dims, *, vector: bool) -> None:
  if not isinstance(g, (tuple, list)) or len(g) != num_hidden:
    raise ValueError(
      f"g must be a tuple with one element per hidden layer ({num_hidden}), "
      f"got {type(g).__name__} of length {len(g) if hasattr(g, '__len__') else '?'}."
    )
  for m, (x, d) in enumerate(zip(g, dims)):
    want = (d,) if vector else (d, d)
    if tuple(x.shape) != want:
      raise ValueError(f"g[{m}] has shape {tuple(x.shape)}, expected {want} for hidden layer {m}.")


__all__ = ["MLPGroupMixin", "check_group_shapes", "mlp_sites", "symmetry"]
