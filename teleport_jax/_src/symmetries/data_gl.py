"""The data-dependent GL(n) action for MLPs with invertible activations."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import Literal

import chex
import jax
import jax.numpy as jnp
from flax import struct

from teleport_jax._src.symmetries import activations as act_lib
from teleport_jax._src.symmetries import layouts
from teleport_jax._src.symmetries import mlp
from teleport_jax._src.symmetries import symmetry

_INPUT_KEYS = ("inputs", "input", "x", "X", "image", "images", "features")


def default_get_inputs(data: Any) -> chex.Array:
  """Finds the network inputs in a batch.

  ``(inputs, targets)`` tuples/lists give their first element; mappings their
  ``inputs``/``x``/``image(s)``/``features`` entry; an array is the inputs.
  """
  if isinstance(data, (tuple, list)) and data:
    return data[0]
  if isinstance(data, Mapping):
    for k in _INPUT_KEYS:
      if k in data:
        return data[k]
    raise ValueError(
      f"data is a mapping with keys {sorted(map(str, data))}; none of them is a "
      f"known inputs key {list(_INPUT_KEYS)}. Pass get_inputs= to DataDependentGL."
    )
  if hasattr(data, "shape"):
    return data
  raise TypeError(
    f"data of type {type(data).__name__} has no recognisable inputs; pass "
    "get_inputs= to DataDependentGL."
  )


@struct.dataclass
class DataDependentGL(mlp.MLPGroupMixin, symmetry.Symmetry):
  r"""The data-dependent ``GL(d_m)`` action of Zhao et al. (2022, Prop. 4.3).

  Consider an MLP ``h_m = sigma(h_{m-1} K_m + b_m)`` (canonical form: rows are
  samples) with an activation ``sigma`` that is a bijection of the real line
  (LeakyReLU, identity, asinh). For a batch with layer inputs ``H_m``
  (``(n, d_{m-1})``), pre-activations ``Z_m`` and one invertible ``A_m`` per
  hidden layer, the action maps the hidden features of the batch to
  ``h_m A_m`` and leaves the output unchanged:

  .. math::

     \Delta_m = \sigma^{-1}(\sigma(Z_m) A_m) - Z_m,\qquad
     [\tilde K_m; \tilde b_m] = [K_m; b_m] + [H_m, 1]^{+} \Delta_m,\qquad
     K'_m = A_{m-1}^{-1} \tilde K_m,\ b'_m = \tilde b_m

  (``A_{-1} = I``, ``Delta = 0`` for the output layer). ``A^{-1}`` is applied by
  an LU solve, never approximated. Among all weights that realise the new
  features, this is the one closest to the old weights, so the identity
  element maps ``params`` to itself and the weights' components outside the
  span of the batch are kept (the published code instead replaces the kernel
  by ``target @ pinv``, which discards them).

  **When is it exact?** ``[H_m, 1] [H_m, 1]^+ = I_n`` is needed for every layer
  that feeds a hidden layer, i.e. the layer inputs of the batch must have full
  row rank ``n`` (samples linearly independent): ``n <= d_{m-1}`` (``+1`` with a
  bias) for the input and each hidden width except the last. By default
  (``skip_inexact_layers=True``) a hidden layer whose layer input is narrower
  than the batch is left fixed, so only the layers that can move exactly move.
  Rank deficiency that the shapes do not reveal (linearly dependent samples)
  still breaks exactness: :meth:`rank_condition` reports it and
  :func:`teleport_jax.teleport` measures the drift and rejects the teleport if
  it exceeds the tolerance. The action is only loss-invariant on the batch it
  was built from; for other data use :class:`PositiveRescaling`.

  Group element: a tuple with one ``(d_m, d_m)`` matrix per hidden layer,
  acting on the right of the ``(n, d_m)`` features. Lie algebra: matrices of
  the same shapes; ``exp`` is the matrix exponential, batched over layers of
  equal width (a layer of a different width gets its own call).

  Attributes:
    activation: the hidden activation; must be invertible on the real line.
    layout: where the layers are in ``params`` (inferred if ``None``).
    get_inputs: maps the batch passed as ``data`` to the network inputs
      (default: :func:`default_get_inputs`).
    batch_axis: axis of the inputs that indexes samples; default 0 for
      ``in_out`` kernels (``x @ K``) and 1 for ``out_in`` kernels (``W @ X``
      with samples as columns, as in the published experiments).
    variant: ``"exact"`` (default) or ``"published"``: the first-order action
      of the published NeurIPS 2022 code, ``A = I + T`` with ``I - T`` standing
      in for ``A^{-1}`` and the kernel replaced by ``target @ pinv``. It is *not*
      loss-invariant and exists only to compare with published figures
      (use ``rtol=jnp.inf`` in :func:`teleport` to let it through).
    rcond: relative cut-off for small singular values in the pseudo-inverses.
    skip_inexact_layers: leave hidden layers whose layer input is narrower
      than the batch fixed (default), instead of transforming them inexactly
      (see :meth:`active_layers`).
  """

  activation: Any = struct.field(pytree_node=False, default="leaky_relu")
  layout: layouts.MLPLayout | None = struct.field(pytree_node=False, default=None)
  get_inputs: Callable[[Any], chex.Array] | None = struct.field(pytree_node=False, default=None)
  batch_axis: int | None = struct.field(pytree_node=False, default=None)
  variant: Literal["exact", "published"] = struct.field(pytree_node=False, default="exact")
  rcond: float | None = struct.field(pytree_node=False, default=None)
  skip_inexact_layers: bool = struct.field(pytree_node=False, default=True)

  needs_data = True

  def active_layers(self, params: chex.ArrayTree, batch_size: int) -> tuple[bool, ...]:
    """Which hidden layers the action transforms for a batch of ``batch_size``.

    Hidden layer ``m`` can be transformed exactly only if the batch fits the
    width of its layer input (``n <= d_{m-1}``, ``+1`` with a bias). With
    ``skip_inexact_layers`` (default) the other hidden layers are left fixed
    (their group element is ignored), so e.g. a batch larger than the input
    dimension still teleports the deeper hidden layers exactly.
    """
    kernels, biases = self._layout(params).get(params)
    caps = [k.shape[0] + (b is not None) for k, b in zip(kernels[:-1], biases[:-1])]
    if not self.skip_inexact_layers or self.variant == "published":
      return tuple(True for _ in caps)
    return tuple(batch_size <= c for c in caps)

  def __post_init__(self):
    a = act_lib.as_activation(self.activation)
    if not a.invertible:
      raise ValueError(
        f"activation {a.name!r} is not invertible on the real line; the "
        "data-dependent GL action needs an invertible activation such as "
        "'leaky_relu'. Use PositiveRescaling for ReLU networks."
      )
    if self.variant not in ("exact", "published"):
      raise ValueError(f"variant must be 'exact' or 'published', got {self.variant!r}.")
    if self.batch_axis not in (None, 0, 1, -1, -2):
      raise ValueError(f"batch_axis must be 0 or 1, got {self.batch_axis!r}.")

  # ------------------------------------------------------------ helpers
  @property
  def _activation(self) -> act_lib.Activation:
    return act_lib.as_activation(self.activation)

  def inputs(self, params: chex.ArrayTree, data: Any) -> chex.Array:
    """The batch inputs in canonical ``(n, d_0)`` form."""
    if data is None:
      raise ValueError("data is required: the data-dependent GL action depends on the batch.")
    x = (self.get_inputs or default_get_inputs)(data)
    x = jnp.asarray(x)
    layout = self._layout(params)
    axis = self.batch_axis
    if axis is None:
      axis = 1 if layout.kernel_format == "out_in" else 0
    if x.ndim != 2:
      raise ValueError(
        f"data: the network inputs must be a 2-D array (samples x features), got "
        f"shape {tuple(x.shape)}."
      )
    if axis in (1, -1):
      x = x.T
    return x

  def validate(self, params, data=None):
    kernels, _ = self._layout(params).get(params)
    x = self.inputs(params, data)
    if x.shape[1] != kernels[0].shape[0]:
      raise ValueError(
        f"data: inputs have {x.shape[1]} features but the first layer expects "
        f"{kernels[0].shape[0]} (inputs shape after batch_axis handling: "
        f"{tuple(x.shape)})."
      )

  def rank_condition(self, params: chex.ArrayTree, data: Any) -> dict[str, Any]:
    """Checks the exactness condition on a batch.

    Returns:
      A dict with ``batch_size``; ``active_layers`` (see :meth:`active_layers`);
      ``max_exact_batch``, the largest batch for which *every* hidden layer
      could move exactly given the widths; ``shape_ok``, whether the batch fits
      every layer that moves (``True`` when the skipped layers are the only
      ones it does not fit); ``all_layers_ok``, whether it fits all of them;
      and ``min_singular_ratio``, the smallest/largest singular value of the
      layer inputs of the moving layers (near zero: rank deficient, and in
      float32 a sign of lost digits; ``nan`` if no layer moves).
    """
    layout = self._layout(params)
    kernels, biases = layout.get(params)
    x = self.inputs(params, data)
    n = x.shape[0]
    active = self.active_layers(params, n)
    layer_inputs, _ = layouts.mlp_forward(kernels, biases, self._activation, x)
    ratios, caps = [], []
    for m in range(len(kernels) - 1):
      h = _augment(layer_inputs[m], biases[m])
      caps.append(h.shape[1])
      if active[m]:
        sv = jnp.linalg.svd(h, compute_uv=False)
        ratios.append(sv[min(h.shape) - 1] / sv[0])
    moving = [c for c, a in zip(caps, active) if a]
    return {
      "batch_size": n,
      "active_layers": active,
      "max_exact_batch": min(caps),
      "shape_ok": bool(moving) and n <= min(moving),
      "all_layers_ok": n <= min(caps),
      "min_singular_ratio": jnp.min(jnp.stack(ratios)) if ratios else jnp.asarray(jnp.nan),
    }

  # ------------------------------------------------------------ group
  def algebra_zeros(self, params):
    kernels, _ = self._layout(params).get(params)
    return tuple(jnp.zeros((k.shape[1], k.shape[1]), k.dtype) for k in kernels[:-1])

  def exp(self, xi):
    if self.variant == "published":
      return tuple(jnp.eye(x.shape[0], dtype=x.dtype) + x for x in xi)
    return symmetry.batched_over_equal_shapes(symmetry.expm, xi)

  def retract(self, xi):
    if getattr(self, "variant", "exact") == "published":
      return tuple(jnp.eye(x.shape[0], dtype=x.dtype) + x for x in xi)
    return symmetry.batched_over_equal_shapes(symmetry.cayley, xi)

  def inverse(self, g):
    if self.variant == "published":
      return tuple(2 * jnp.eye(a.shape[0], dtype=a.dtype) - a for a in g)
    return symmetry.batched_over_equal_shapes(jnp.linalg.inv, g)

  def compose(self, g1, g2):  # features h -> h A1 -> h A1 A2
    return tuple(a @ b for a, b in zip(g1, g2))

  def act(self, params: chex.ArrayTree, g, data: Any = None) -> chex.ArrayTree:
    layout = self._layout(params)
    kernels, biases = layout.get(params)
    mlp.check_group_shapes(g, len(kernels) - 1, [k.shape[1] for k in kernels[:-1]], vector=False)
    x = self.inputs(params, data).astype(kernels[0].dtype)
    if self.variant == "published":
      return layout.set(params, *self._act_published(kernels, biases, g, x))
    return self._act_exact(params, g, x, lambda a, k: jnp.linalg.solve(a, k))

  def act_linearized(self, params, xi, data=None):
    if self.variant == "published":
      return super().act_linearized(params, xi, data)
    kernels, _ = self._layout(params).get(params)
    x = self.inputs(params, data).astype(kernels[0].dtype)
    # linear in xi and exactly the identity at xi = 0 (no rounding moves the point)
    return self._act_exact(params, tuple(xi), x, lambda a, k: k - a @ k, linear=True)

  def _act_exact(self, params, g, x, inv_apply, linear=False):
    """The exact action; ``inv_apply(A, K)`` applies ``A^{-1}`` to the outgoing kernel.

    With ``linear``, ``g`` holds algebra elements and the feature change is the
    first-order one, ``jvp(sigma^{-1}, sigma(Z), sigma(Z) xi)``.
    """
    layout = self._layout(params)
    kernels, biases = layout.get(params)
    mlp.check_group_shapes(g, len(kernels) - 1, [k.shape[1] for k in kernels[:-1]], vector=False)
    sigma = self._activation
    layer_inputs, pre = layouts.mlp_forward(kernels, biases, sigma, x)
    active = self.active_layers(params, x.shape[0])
    new_k, new_b = [], []
    for m, (k, b) in enumerate(zip(kernels, biases)):
      if m < len(kernels) - 1 and active[m]:
        a = g[m].astype(k.dtype)
        h = sigma(pre[m])
        if linear:
          change = jax.jvp(sigma.inverse, (h,), (h @ a,))[1]
        else:  # exactly zero at the identity: the same rounding on both sides
          change = sigma.inverse(h @ a) - sigma.inverse(h)
        delta = _pinv_apply(_augment(layer_inputs[m], b), change, self.rcond)
        k, b = _split_kb(_stack_kb(k, b) + delta, b)
      if m > 0 and active[m - 1]:
        k = inv_apply(g[m - 1].astype(k.dtype), k)
      new_k.append(k)
      new_b.append(b)
    return layout.set(params, new_k, new_b)

  def _act_published(self, kernels, biases, g, x):
    """The published first-order action, layer pair by layer pair.

    For each hidden layer in turn: the outgoing kernel is multiplied by
    ``I - T`` (standing in for ``(I + T)^{-1}``), and the incoming kernel is
    replaced by ``pinv(h) sigma^{-1}(sigma(h K) (I + T))`` with ``h`` the layer
    input *after* the previous pair was transformed.
    """
    sigma = self._activation
    kernels, biases = list(kernels), list(biases)
    h = x
    for m in range(len(kernels) - 1):
      a = g[m].astype(kernels[m].dtype)
      eye = jnp.eye(a.shape[0], dtype=a.dtype)
      kernels[m + 1] = (2 * eye - a) @ kernels[m + 1]
      z = h @ kernels[m] + (0 if biases[m] is None else biases[m])
      target = sigma.inverse(sigma(z) @ a)
      pinv = jnp.linalg.pinv(_augment(h, biases[m]), rtol=self.rcond)
      kernels[m], biases[m] = _split_kb(pinv @ target, biases[m])
      h = sigma(h @ kernels[m] + (0 if biases[m] is None else biases[m]))
    return kernels, biases


def _pinv_apply(m: chex.Array, r: chex.Array, rcond: float | None) -> chex.Array:
  """``pinv(m) @ r`` for the ``(n, c)`` layer-input matrix ``m``.

  For ``n <= c`` (the case in which the action is exact) this is
  ``Q R^{-T} r`` with the thin QR factorisation ``m^T = Q R``: as accurate as
  the SVD for a matrix of full row rank and several times cheaper. A
  rank-deficient ``m`` then gives non-finite values, which the teleport solver
  rejects (the SVD would give an inexact, loss-changing move instead). With an
  explicit ``rcond``, or ``n > c``, the SVD pseudo-inverse is used.
  """
  n, c = m.shape
  if rcond is not None or n > c:
    return jnp.linalg.pinv(m, rtol=rcond) @ r
  q, upper = jnp.linalg.qr(m.T)  # q: (c, n), upper: (n, n)
  y = jax.scipy.linalg.solve_triangular(upper, r, trans="T", lower=False)
  return q @ y


def _augment(h: chex.Array, b) -> chex.Array:
  if b is None:
    return h
  return jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1)


def _stack_kb(k, b):
  return k if b is None else jnp.concatenate([k, b[None, :]], axis=0)


def _split_kb(kb, b):
  if b is None:
    return kb, None
  return kb[:-1], kb[-1]


@struct.dataclass
class PublishedDataDependentGL(DataDependentGL):
  r"""The first-order action of the published NeurIPS 2022 code, for comparison only.

  Group element ``A = I + T`` per hidden layer; the outgoing kernel is
  multiplied by ``I - T`` where ``(I + T)^{-1}`` is needed, and the incoming
  kernel is replaced by ``pinv(h) sigma^{-1}(sigma(h K)(I + T))`` with ``h`` the
  layer input *after* the previous pair was transformed. It is **not**
  loss-invariant (it changes the loss by tens of percent per teleport on the
  published problem), so :func:`teleport_jax.teleport` refuses it unless told
  ``check=False, rtol=float("inf")``. It exists so that published figures can be
  compared with the exact :class:`DataDependentGL`; ``DataDependentGL(variant=
  "published")`` is the same.
  """

  variant: Literal["exact", "published"] = struct.field(pytree_node=False, default="published")

  def __post_init__(self):
    super().__post_init__()
    if self.variant != "published":
      raise ValueError("PublishedDataDependentGL is the published action; use DataDependentGL.")
