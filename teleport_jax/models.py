r"""A small zoo of flax models, in flax linen and flax nnx, for tests and examples.

Every constructor returns a :class:`Model`: a pure ``apply(params, x)``, the
initialised parameter pytree, an example input batch and the module (the linen
``Module`` or the nnx ``GraphDef``). The same model is available in both
frameworks (``framework="linen"`` or ``"nnx"``) with the same submodule names
where flax allows it, so path predicates such as
``teleport_jax.finders.PathContains("query")`` find the same leaves in both:

==================  ==========================================================
model               leaves (linen under ``params/``; nnx at the root)
==================  ==========================================================
:func:`mlp`         linen ``Dense_0 ... Dense_{L-1}``; nnx ``layers/0 ...``
:func:`cnn`         linen ``Conv_i``, ``BatchNorm_i``, ``Dense_i``;
                    nnx ``convs/i``, ``norms/i``, ``dense/i``
:func:`residual_mlp`  ``embed``, ``blocks_i/up``, ``blocks_i/down``, ``head``
                    (nnx: ``blocks/i/...``)
:func:`transformer`  ``embed``, ``pos_embed``, ``blocks_i/{norm1, attn/{query,
                    key, value, out}, norm2, mlp/{up, gate, down}}``,
                    ``final_norm``, ``unembed`` (nnx: ``blocks/i/...``)
:func:`lora_mlp`    linen ``LoRADense_i``; nnx ``layers/i``; each with
                    ``kernel``, ``bias``, ``lora_a``, ``lora_b``
==================  ==========================================================

Kernels follow flax: ``y = x W`` with ``W`` of shape ``(in, out)``; attention
kernels have flax's ``DenseGeneral`` shapes ``(d_model, heads, d_head)`` for
queries, keys and values and ``(heads, d_head, d_model)`` for the output.

Examples:
  >>> import teleport_jax.models as zoo
  >>> m = zoo.mlp(widths=(4, 8, 2), framework="nnx")
  >>> m.apply(m.params, m.inputs).shape
  (8, 2)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from teleport_jax._src.core import paths as paths_lib

FRAMEWORKS = ("linen", "nnx")
ACTIVATIONS: dict[str, Callable[[chex.Array], chex.Array]] = {
  "relu": jax.nn.relu,
  "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.1),
  "gelu": jax.nn.gelu,
  "tanh": jnp.tanh,
  "silu": jax.nn.silu,
  "identity": lambda x: x,
}
POOLS = ("max", "avg", None)
TRANSFORMER_MLPS = ("gelu", "relu", "reglu", "swiglu")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_gainfree")
POSITIONS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model of the zoo: a pure apply function and its initialised parameters.

  Attributes:
    name: the constructor's name (``"mlp"``, ``"cnn"``, ...).
    framework: ``"linen"`` or ``"nnx"``.
    apply: ``apply(params, x) -> outputs``, a pure function of the parameter
      pytree (train mode for models with BatchNorm: batch statistics, outputs
      only).
    params: the initialised pytree; every collection ``apply`` needs (linen:
      ``{"params": ..., "batch_stats": ...}``; nnx: the split ``Param`` and
      ``BatchStat`` state).
    inputs: an example batch (float features, images ``(batch, H, W, C)`` or
      int32 tokens ``(batch, context)``).
    module: the linen ``Module`` or the nnx ``GraphDef``.
    apply_eval: ``apply_eval(params, x)`` in eval mode (running statistics) for
      models with BatchNorm; ``None`` otherwise.
    config: the constructor's arguments.
  """

  name: str
  framework: str
  apply: Callable[[chex.ArrayTree, chex.Array], chex.Array]
  params: chex.ArrayTree
  inputs: chex.Array
  module: Any
  apply_eval: Callable[[chex.ArrayTree, chex.Array], chex.Array] | None = None
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __call__(self, x: chex.Array | None = None) -> chex.Array:
    """``apply(params, x)`` (``x`` defaults to ``inputs``)."""
    return self.apply(self.params, self.inputs if x is None else x)


# ---------------------------------------------------------------- validation


def _check_framework(framework: str) -> None:
  if framework not in FRAMEWORKS:
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}.")


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def _check_positive(**kwargs: Any) -> None:
  for name, value in kwargs.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_widths(name: str, widths: Sequence[int], minimum: int) -> tuple[int, ...]:
  widths = tuple(widths)
  if len(widths) < minimum or not all(isinstance(w, int) and w > 0 for w in widths):
    raise ValueError(f"{name} must be at least {minimum} positive ints, got {widths!r}.")
  return widths


def _activation(name: str) -> Callable[[chex.Array], chex.Array]:
  _check_choice("activation", name, tuple(ACTIVATIONS))
  return ACTIVATIONS[name]


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), stream])


def _features(seed: int, batch: int, shape: tuple[int, ...], dtype) -> chex.Array:
  return jnp.asarray(_rng(seed, 1).standard_normal((batch,) + tuple(shape)), dtype)


def _fan_in(names: tuple[str, ...], shape: tuple[int, ...]) -> int:
  if len(shape) == 3 and len(names) >= 2 and names[-2] in ("query", "key", "value"):
    return shape[0]  # (d_model, heads, d_head)
  n = 1
  for d in shape[:-1]:
    n *= d
  return max(n, 1)


def _init(abstract: chex.ArrayTree, seed: int, dtype) -> chex.ArrayTree:
  """Parameters drawn with NumPy (no XLA compilation per parameter shape).

  Kernels ``N(0, 1/fan_in)``, embeddings ``N(0, 1/d)``, LoRA factors like
  kernels, biases ``N(0, 0.1^2)``, gains ``1 + N(0, 0.1^2)``, running means
  ``N(0, 0.1^2)`` and variances ``1 + |N(0, 0.1^2)|`` (non-trivial values, so
  that every leaf a symmetry moves is exercised).
  """
  rng = _rng(seed, 0)

  def init(path, leaf):
    names = paths_lib.normalize(path)
    name, shape = names[-1], tuple(leaf.shape)
    z = rng.standard_normal(shape)
    if name in ("kernel", "lora_a", "lora_b"):
      value = z / np.sqrt(_fan_in(names, shape))
    elif name == "embedding":
      value = z / np.sqrt(shape[-1])
    elif name == "scale":
      value = 1.0 + 0.1 * z
    elif name == "var":
      value = 1.0 + 0.1 * np.abs(z)
    else:  # bias, mean
      value = 0.1 * z
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(init, abstract)


# ---------------------------------------------------------------- packaging


def _linen_model(name, module, inputs, seed, config, *, batchnorm=False, **call_kwargs):
  init = functools.partial(module.init, **call_kwargs)
  abstract = jax.eval_shape(init, jax.random.key(0), inputs)
  variables = _init(dict(abstract), seed, config["dtype"])
  if batchnorm:

    def apply(params, x):
      out, _ = module.apply(params, x, train=True, mutable=["batch_stats"])
      return out

    def apply_eval(params, x):
      return module.apply(params, x, train=False)

    return Model(name, "linen", apply, variables, inputs, module, apply_eval, config)
  return Model(name, "linen", module.apply, variables, inputs, module, None, config)


def _nnx_model(name, make, inputs, seed, config, *, batchnorm=False):
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
  if jax.tree_util.tree_leaves(rest):
    raise AssertionError(f"{name}: nnx model holds state other than Param and BatchStat.")
  params = _init(params, seed, config["dtype"])

  if batchnorm:

    def apply(params, x):
      return nnx.merge(graphdef, params)(x, train=True)

    def apply_eval(params, x):
      return nnx.merge(graphdef, params)(x, train=False)

    return Model(name, "nnx", apply, params, inputs, graphdef, apply_eval, config)

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return Model(name, "nnx", apply, params, inputs, graphdef, None, config)


# ----------------------------------------------------------------------- MLP


class _LinenMLP(nn.Module):
  widths: tuple[int, ...]
  activation: str
  bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    n = len(self.widths) - 1
    for i, w in enumerate(self.widths[1:]):
      x = nn.Dense(w, use_bias=self.bias, dtype=self.dtype, param_dtype=self.dtype)(x)
      if i < n - 1:
        x = act(x)
    return x


class _NnxMLP(nnx.Module):
  def __init__(self, widths, activation, bias, dtype, rngs):
    self.activation = activation
    self.layers = nnx.List(
      [
        nnx.Linear(a, b, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])
      ]
    )

  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = act(x)
    return x


def mlp(
  widths: Sequence[int] = (8, 16, 16, 4),
  activation: str = "relu",
  bias: bool = True,
  *,
  framework: str = "linen",
  batch: int = 8,
  seed: int = 0,
  dtype: Any = jnp.float32,
) -> Model:
  """A multilayer perceptron ``widths[0] -> ... -> widths[-1]``.

  Args:
    widths: layer widths, input first (at least two).
    activation: ``"relu"``, ``"leaky_relu"`` (slope 0.1), ``"gelu"``, ``"tanh"``,
      ``"silu"`` or ``"identity"``, between the dense layers.
    bias: whether the dense layers have biases.
    framework: ``"linen"`` (layers ``Dense_i``) or ``"nnx"`` (``layers/i``).
    batch: rows of the example input ``(batch, widths[0])``.
    seed: initialisation and input seed.
    dtype: parameter and computation dtype.

  Returns:
    A :class:`Model`; ``apply`` maps ``(batch, widths[0])`` to ``(batch, widths[-1])``.
  """
  _check_framework(framework)
  widths = _check_widths("widths", widths, 2)
  _activation(activation)
  _check_positive(batch=batch)
  config = dict(widths=widths, activation=activation, bias=bias, dtype=jnp.dtype(dtype))
  x = _features(seed, batch, (widths[0],), dtype)
  if framework == "linen":
    return _linen_model("mlp", _LinenMLP(widths, activation, bias, dtype), x, seed, config)
  make = functools.partial(_NnxMLP, widths, activation, bias, dtype)
  return _nnx_model("mlp", make, x, seed, config)


# ----------------------------------------------------------------------- CNN


def _pool(x, pool):
  if pool == "max":
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  if pool == "avg":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  return x


class _LinenCNN(nn.Module):
  channels: tuple[int, ...]
  dense: tuple[int, ...]
  activation: str
  pool: str | None
  batchnorm: bool
  bn_epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = True):
    act = ACTIVATIONS[self.activation]
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    for c in self.channels:
      x = nn.Conv(c, (3, 3), padding="SAME", **kw)(x)
      if self.batchnorm:
        x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=self.bn_epsilon, **kw
        )(x)
      x = _pool(act(x), self.pool)
    x = x.reshape((x.shape[0], -1))
    for i, f in enumerate(self.dense):
      x = nn.Dense(f, **kw)(x)
      if i < len(self.dense) - 1:
        x = act(x)
    return x


class _NnxCNN(nnx.Module):
  def __init__(self, channels, dense, activation, pool, batchnorm, bn_epsilon, image, dtype, rngs):
    self.activation, self.pool = activation, pool
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    ins = (image[2],) + tuple(channels[:-1])
    self.convs = nnx.List(
      [nnx.Conv(a, b, (3, 3), padding="SAME", **kw) for a, b in zip(ins, channels)]
    )
    self.norms = (
      nnx.List([nnx.BatchNorm(c, momentum=0.9, epsilon=bn_epsilon, **kw) for c in channels])
      if batchnorm
      else None
    )
    h, w = image[0], image[1]
    if pool is not None:
      h, w = h // 2 ** len(channels), w // 2 ** len(channels)
    widths = (h * w * channels[-1],) + tuple(dense)
    self.dense = nnx.List([nnx.Linear(a, b, **kw) for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x, train: bool = True):
    act = ACTIVATIONS[self.activation]
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms is not None:
        x = self.norms[i](x, use_running_average=not train)
      x = _pool(act(x), self.pool)
    x = x.reshape((x.shape[0], -1))
    for i, layer in enumerate(self.dense):
      x = layer(x)
      if i < len(self.dense) - 1:
        x = act(x)
    return x


def cnn(
  channels: Sequence[int] = (4, 8),
  dense: Sequence[int] = (16, 10),
  activation: str = "relu",
  pool: str | None = "max",
  batchnorm: bool = False,
  image: Sequence[int] = (8, 8, 1),
  bn_epsilon: float = 0.0,
  *,
  framework: str = "linen",
  batch: int = 8,
  seed: int = 0,
  dtype: Any = jnp.float32,
) -> Model:
  """A convolutional network: ``[Conv 3x3 -> (BatchNorm) -> act -> pool] x n``,
  flatten, dense layers.

  Args:
    channels: output channels of the convolutions (SAME padding, stride 1).
    dense: widths of the dense layers after the flatten (the last is the output).
    activation: as for :func:`mlp`.
    pool: ``"max"``, ``"avg"`` (2x2, stride 2) or ``None``.
    batchnorm: a BatchNorm after every convolution; ``apply`` then runs train
      mode (batch statistics) and ``apply_eval`` eval mode (running statistics).
    image: ``(H, W, C)`` of the example inputs.
    bn_epsilon: the BatchNorm's epsilon. With the default 0 a train-mode norm is
      exactly invariant to a positive factor per input channel; flax's usual
      ``1e-5`` breaks that invariance by about ``1e-5 / var`` relative.
    framework, batch, seed, dtype: as for :func:`mlp`.

  Returns:
    A :class:`Model` mapping ``(batch, H, W, C)`` to ``(batch, dense[-1])``.
  """
  _check_framework(framework)
  channels = _check_widths("channels", channels, 1)
  dense = _check_widths("dense", dense, 1)
  image = _check_widths("image", image, 3)
  if len(image) != 3:
    raise ValueError(f"image must be (H, W, C), got {image!r}.")
  _activation(activation)
  _check_choice("pool", pool, POOLS)
  _check_positive(batch=batch)
  if pool is not None and min(image[:2]) < 2 ** len(channels):
    raise ValueError(f"image {image!r} is too small for {len(channels)} 2x2 poolings.")
  config = dict(
    channels=channels,
    dense=dense,
    activation=activation,
    pool=pool,
    batchnorm=batchnorm,
    image=image,
    bn_epsilon=float(bn_epsilon),
    dtype=jnp.dtype(dtype),
  )
  x = _features(seed, batch, image, dtype)
  if framework == "linen":
    module = _LinenCNN(channels, dense, activation, pool, batchnorm, float(bn_epsilon), dtype)
    return _linen_model("cnn", module, x, seed, config, batchnorm=batchnorm, train=True)
  make = functools.partial(
    _NnxCNN, channels, dense, activation, pool, batchnorm, float(bn_epsilon), image, dtype
  )
  return _nnx_model("cnn", make, x, seed, config, batchnorm=batchnorm)


# -------------------------------------------------------------- residual MLP


class _LinenResBlock(nn.Module):
  width: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    h = ACTIVATIONS[self.activation](nn.Dense(self.width, name="up", **kw)(x))
    return x + nn.Dense(self.width, name="down", **kw)(h)


class _LinenResidualMLP(nn.Module):
  width: int
  blocks: int
  out_features: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = nn.Dense(self.width, name="embed", **kw)(x)
    for i in range(self.blocks):
      x = _LinenResBlock(self.width, self.activation, self.dtype, name=f"blocks_{i}")(x)
    return nn.Dense(self.out_features, name="head", **kw)(x)


class _NnxResBlock(nnx.Module):
  def __init__(self, width, activation, dtype, rngs):
    self.activation = activation
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(width, width, **kw)
    self.down = nnx.Linear(width, width, **kw)

  def __call__(self, x):
    return x + self.down(ACTIVATIONS[self.activation](self.up(x)))


class _NnxResidualMLP(nnx.Module):
  def __init__(self, in_features, width, blocks, out_features, activation, dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.embed = nnx.Linear(in_features, width, **kw)
    self.blocks = nnx.List([_NnxResBlock(width, activation, dtype, rngs) for _ in range(blocks)])
    self.head = nnx.Linear(width, out_features, **kw)

  def __call__(self, x):
    x = self.embed(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def residual_mlp(
  width: int = 16,
  blocks: int = 2,
  activation: str = "relu",
  in_features: int = 8,
  out_features: int = 4,
  *,
  framework: str = "linen",
  batch: int = 8,
  seed: int = 0,
  dtype: Any = jnp.float32,
) -> Model:
  """A residual MLP: ``embed``, blocks ``x + down(act(up(x)))``, ``head``.

  Args:
    width: width of the residual stream and of the blocks.
    blocks: number of residual blocks.
    activation: as for :func:`mlp`.
    in_features, out_features: input and output widths.
    framework, batch, seed, dtype: as for :func:`mlp`.

  Returns:
    A :class:`Model` mapping ``(batch, in_features)`` to ``(batch, out_features)``.
  """
  _check_framework(framework)
  _check_positive(width=width, blocks=blocks, in_features=in_features)
  _check_positive(out_features=out_features, batch=batch)
  _activation(activation)
  config = dict(
    width=width,
    blocks=blocks,
    activation=activation,
    in_features=in_features,
    out_features=out_features,
    dtype=jnp.dtype(dtype),
  )
  x = _features(seed, batch, (in_features,), dtype)
  if framework == "linen":
    module = _LinenResidualMLP(width, blocks, out_features, activation, dtype)
    return _linen_model("residual_mlp", module, x, seed, config)
  make = functools.partial(
    _NnxResidualMLP, in_features, width, blocks, out_features, activation, dtype
  )
  return _nnx_model("residual_mlp", make, x, seed, config)


# --------------------------------------------------------------- transformer


@dataclasses.dataclass(frozen=True)
class _TConfig:
  vocab: int
  d_model: int
  heads: int
  kv_heads: int
  layers: int
  context: int
  mlp: str
  mlp_ratio: int
  norm: str
  positions: str
  rotary_pairing: str
  tie_embeddings: bool
  attention_bias: bool
  dtype: Any

  @property
  def d_head(self) -> int:
    return self.d_model // self.heads

  @property
  def hidden(self) -> int:
    return self.mlp_ratio * self.d_model


def rotary(x: chex.Array, pairing: str = "half", base: float = 10000.0) -> chex.Array:
  """Rotary position embedding of ``x`` ``(batch, time, heads, d_head)``.

  Channel pairs (``i, i + d/2`` for ``"half"``, ``2i, 2i + 1`` for
  ``"interleaved"``) at position ``t`` are rotated by ``t * base^(-2i/d)``.
  """
  t, d = x.shape[1], x.shape[-1]
  half = d // 2
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  freqs = base ** (-jnp.arange(half, dtype=dtype) / half)
  angles = jnp.arange(t, dtype=dtype)[:, None] * freqs  # (T, d/2)
  cos = jnp.cos(angles).astype(x.dtype)[None, :, None, :]
  sin = jnp.sin(angles).astype(x.dtype)[None, :, None, :]
  if pairing == "half":
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.reshape(x.shape)


def causal_attention(
  q: chex.Array, k: chex.Array, v: chex.Array, *, rotary_pairing: str | None = None
) -> chex.Array:
  """Causal multi-head attention with grouped-query heads.

  Args:
    q: queries ``(batch, time, heads, d_head)``.
    k: keys ``(batch, time, kv_heads, d_head)``; query head ``h`` uses key/value
      head ``h // (heads // kv_heads)``.
    v: values ``(batch, time, kv_heads, d_head)``.
    rotary_pairing: apply rotary embeddings to ``q`` and ``k`` with this pairing
      (``None``: no rotary embedding).

  Returns:
    ``(batch, time, heads, d_head)``.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  if rotary_pairing is not None:
    q, k = rotary(q, rotary_pairing), rotary(k, rotary_pairing)
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
  mask = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  return out.reshape(b, t, h, d)


def _mlp_activation(kind: str):
  return {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "reglu": jax.nn.relu, "swiglu": jax.nn.silu}[
    kind
  ]


class _LinenAttention(nn.Module):
  cfg: _TConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    dense = functools.partial(
      nn.DenseGeneral, use_bias=c.attention_bias, dtype=c.dtype, param_dtype=c.dtype
    )
    q = dense((c.heads, c.d_head), name="query")(x)
    k = dense((c.kv_heads, c.d_head), name="key")(x)
    v = dense((c.kv_heads, c.d_head), name="value")(x)
    pairing = c.rotary_pairing if c.positions == "rotary" else None
    o = causal_attention(q, k, v, rotary_pairing=pairing)
    return dense(c.d_model, axis=(-2, -1), name="out")(o)


class _LinenFeedForward(nn.Module):
  cfg: _TConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.dtype)
    act = _mlp_activation(c.mlp)
    if c.mlp in ("reglu", "swiglu"):
      h = act(nn.Dense(c.hidden, name="gate", **kw)(x)) * nn.Dense(c.hidden, name="up", **kw)(x)
    else:
      h = act(nn.Dense(c.hidden, name="up", **kw)(x))
    return nn.Dense(c.d_model, name="down", **kw)(h)


def _linen_norm(c: _TConfig, name: str):
  kw = dict(dtype=c.dtype, param_dtype=c.dtype, name=name)
  if c.norm == "layernorm":
    return nn.LayerNorm(epsilon=1e-5, **kw)
  return nn.RMSNorm(epsilon=1e-6, use_scale=c.norm == "rmsnorm", **kw)


class _LinenBlock(nn.Module):
  cfg: _TConfig

  @nn.compact
  def __call__(self, x):
    x = x + _LinenAttention(self.cfg, name="attn")(_linen_norm(self.cfg, "norm1")(x))
    return x + _LinenFeedForward(self.cfg, name="mlp")(_linen_norm(self.cfg, "norm2")(x))


class _LinenTransformer(nn.Module):
  cfg: _TConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.dtype)
    embed = nn.Embed(c.vocab, c.d_model, name="embed", **kw)
    x = embed(tokens)
    if c.positions == "learned":
      x = x + nn.Embed(c.context, c.d_model, name="pos_embed", **kw)(jnp.arange(tokens.shape[1]))
    for i in range(c.layers):
      x = _LinenBlock(c, name=f"blocks_{i}")(x)
    x = _linen_norm(c, "final_norm")(x)
    if c.tie_embeddings:
      return embed.attend(x)
    return nn.Dense(c.vocab, use_bias=False, name="unembed", **kw)(x)


def _nnx_norm(c: _TConfig, rngs):
  kw = dict(dtype=c.dtype, param_dtype=c.dtype, rngs=rngs)
  if c.norm == "layernorm":
    return nnx.LayerNorm(c.d_model, epsilon=1e-5, **kw)
  return nnx.RMSNorm(c.d_model, epsilon=1e-6, use_scale=c.norm == "rmsnorm", **kw)


class _NnxAttention(nnx.Module):
  def __init__(self, c: _TConfig, rngs):
    self.pairing = c.rotary_pairing if c.positions == "rotary" else None
    kw = dict(use_bias=c.attention_bias, dtype=c.dtype, param_dtype=c.dtype, rngs=rngs)
    self.query = nnx.LinearGeneral(c.d_model, (c.heads, c.d_head), **kw)
    self.key = nnx.LinearGeneral(c.d_model, (c.kv_heads, c.d_head), **kw)
    self.value = nnx.LinearGeneral(c.d_model, (c.kv_heads, c.d_head), **kw)
    self.out = nnx.LinearGeneral((c.heads, c.d_head), c.d_model, axis=(-2, -1), **kw)

  def __call__(self, x):
    o = causal_attention(self.query(x), self.key(x), self.value(x), rotary_pairing=self.pairing)
    return self.out(o)


class _NnxFeedForward(nnx.Module):
  def __init__(self, c: _TConfig, rngs):
    self.kind = c.mlp
    kw = dict(dtype=c.dtype, param_dtype=c.dtype, rngs=rngs)
    if c.mlp in ("reglu", "swiglu"):
      self.gate = nnx.Linear(c.d_model, c.hidden, **kw)
    self.up = nnx.Linear(c.d_model, c.hidden, **kw)
    self.down = nnx.Linear(c.hidden, c.d_model, **kw)

  def __call__(self, x):
    act = _mlp_activation(self.kind)
    if self.kind in ("reglu", "swiglu"):
      h = act(self.gate(x)) * self.up(x)
    else:
      h = act(self.up(x))
    return self.down(h)


class _NnxBlock(nnx.Module):
  def __init__(self, c: _TConfig, rngs):
    self.norm1 = _nnx_norm(c, rngs)
    self.attn = _NnxAttention(c, rngs)
    self.norm2 = _nnx_norm(c, rngs)
    self.mlp = _NnxFeedForward(c, rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _NnxTransformer(nnx.Module):
  def __init__(self, c: _TConfig, rngs):
    kw = dict(dtype=c.dtype, param_dtype=c.dtype, rngs=rngs)
    self.tie = c.tie_embeddings
    self.embed = nnx.Embed(c.vocab, c.d_model, **kw)
    self.pos_embed = nnx.Embed(c.context, c.d_model, **kw) if c.positions == "learned" else None
    self.blocks = nnx.List([_NnxBlock(c, rngs) for _ in range(c.layers)])
    self.final_norm = _nnx_norm(c, rngs)
    self.unembed = (
      None if c.tie_embeddings else nnx.Linear(c.d_model, c.vocab, use_bias=False, **kw)
    )

  def __call__(self, tokens):
    x = self.embed(tokens)
    if self.pos_embed is not None:
      x = x + self.pos_embed(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    x = self.final_norm(x)
    return self.embed.attend(x) if self.tie else self.unembed(x)


def transformer(
  vocab: int = 32,
  d_model: int = 16,
  heads: int = 4,
  kv_heads: int | None = None,
  layers: int = 2,
  context: int = 8,
  mlp: str = "gelu",
  mlp_ratio: int = 4,
  norm: str = "layernorm",
  positions: str = "learned",
  rotary_pairing: str = "half",
  tie_embeddings: bool = False,
  attention_bias: bool = False,
  *,
  framework: str = "linen",
  batch: int = 4,
  seed: int = 0,
  dtype: Any = jnp.float32,
) -> Model:
  """A decoder-only pre-norm transformer language model.

  Each block is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; then a final
  norm and the unembedding (``embed.attend`` with ``tie_embeddings``).
  Attention is causal with ``heads`` query heads and ``kv_heads`` key/value
  heads (grouped-query attention when fewer: query head ``h`` reads key/value
  head ``h // (heads // kv_heads)``); kernels ``query (d_model, heads,
  d_head)``, ``key``/``value (d_model, kv_heads, d_head)``, ``out (heads,
  d_head, d_model)``, biases with ``attention_bias``.

  Args:
    vocab: vocabulary size.
    d_model: width of the residual stream (a multiple of ``heads``).
    heads: query heads; ``d_head = d_model // heads``.
    kv_heads: key/value heads (default ``heads``; must divide ``heads``).
    layers: number of blocks.
    context: the sequence length of the example inputs (and of the learned
      position table).
    mlp: ``"gelu"``, ``"relu"`` (``down(act(up(x)))``), ``"reglu"`` or
      ``"swiglu"`` (``down(act(gate(x)) * up(x))``); dense layers with biases.
    mlp_ratio: hidden width of the MLP over ``d_model``.
    norm: ``"layernorm"`` (scale and bias), ``"rmsnorm"`` (scale) or
      ``"rmsnorm_gainfree"`` (no parameters).
    positions: ``"learned"`` (a ``pos_embed`` table added to the embeddings) or
      ``"rotary"`` (rotary embeddings of queries and keys).
    rotary_pairing: ``"half"`` or ``"interleaved"`` (see :func:`rotary`).
    tie_embeddings: unembed with the transposed token embedding.
    attention_bias: biases on the query, key, value and output projections.
    framework, batch, seed, dtype: as for :func:`mlp`.

  Returns:
    A :class:`Model`: int32 tokens ``(batch, context)`` to logits
    ``(batch, context, vocab)``.
  """
  _check_framework(framework)
  kv_heads = heads if kv_heads is None else kv_heads
  _check_positive(vocab=vocab, d_model=d_model, heads=heads, kv_heads=kv_heads)
  _check_positive(layers=layers, context=context, mlp_ratio=mlp_ratio, batch=batch)
  if d_model % heads:
    raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads}).")
  if heads % kv_heads:
    raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads}).")
  _check_choice("mlp", mlp, TRANSFORMER_MLPS)
  _check_choice("norm", norm, NORMS)
  _check_choice("positions", positions, POSITIONS)
  _check_choice("rotary_pairing", rotary_pairing, ("half", "interleaved"))
  if positions == "rotary" and (d_model // heads) % 2:
    raise ValueError(f"rotary positions need an even d_head, got {d_model // heads}.")
  cfg = _TConfig(
    vocab,
    d_model,
    heads,
    kv_heads,
    layers,
    context,
    mlp,
    mlp_ratio,
    norm,
    positions,
    rotary_pairing,
    bool(tie_embeddings),
    bool(attention_bias),
    dtype,
  )
  config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  config["dtype"] = jnp.dtype(dtype)
  config["d_head"] = cfg.d_head
  tokens = jnp.asarray(_rng(seed, 1).integers(0, vocab, (batch, context)), jnp.int32)
  if framework == "linen":
    return _linen_model("transformer", _LinenTransformer(cfg), tokens, seed, config)
  make = functools.partial(_NnxTransformer, cfg)
  return _nnx_model("transformer", make, tokens, seed, config)


# --------------------------------------------------------------------- LoRA


class _LinenLoRADense(nn.Module):
  features: int
  rank: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.lecun_normal()
    kernel = self.param("kernel", init, (d, self.features), self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
    a = self.param("lora_a", init, (d, self.rank), self.dtype)
    b = self.param("lora_b", init, (self.rank, self.features), self.dtype)
    return x @ kernel + bias + (x @ a) @ b


class _LinenLoRAMLP(nn.Module):
  widths: tuple[int, ...]
  rank: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    n = len(self.widths) - 1
    for i, w in enumerate(self.widths[1:]):
      x = _LinenLoRADense(w, self.rank, self.dtype)(x)
      if i < n - 1:
        x = ACTIVATIONS[self.activation](x)
    return x


class _NnxLoRADense(nnx.Module):
  def __init__(self, d_in, d_out, rank, dtype, rngs):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype))
    self.lora_a = nnx.Param(init(rngs.params(), (d_in, rank), dtype))
    self.lora_b = nnx.Param(init(rngs.params(), (rank, d_out), dtype))

  def __call__(self, x):
    return x @ self.kernel[...] + self.bias[...] + (x @ self.lora_a[...]) @ self.lora_b[...]


class _NnxLoRAMLP(nnx.Module):
  def __init__(self, widths, rank, activation, dtype, rngs):
    self.activation = activation
    self.layers = nnx.List(
      [_NnxLoRADense(a, b, rank, dtype, rngs) for a, b in zip(widths[:-1], widths[1:])]
    )

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = ACTIVATIONS[self.activation](x)
    return x


def lora_mlp(
  widths: Sequence[int] = (8, 16, 4),
  rank: int = 2,
  activation: str = "relu",
  *,
  framework: str = "linen",
  batch: int = 8,
  seed: int = 0,
  dtype: Any = jnp.float32,
) -> Model:
  """An MLP of LoRA dense layers ``y = x W + b + x A B``.

  Every layer holds a base ``kernel`` ``W`` ``(in, out)`` (frozen in LoRA
  fine-tuning, still a leaf of ``params``), a ``bias``, and the factors
  ``lora_a`` ``A`` ``(in, rank)`` and ``lora_b`` ``B`` ``(rank, out)`` (both
  random, so the product is not zero).

  Args:
    widths: layer widths, input first.
    rank: the LoRA rank ``r``.
    activation: as for :func:`mlp`.
    framework, batch, seed, dtype: as for :func:`mlp`.

  Returns:
    A :class:`Model` mapping ``(batch, widths[0])`` to ``(batch, widths[-1])``.
  """
  _check_framework(framework)
  widths = _check_widths("widths", widths, 2)
  _check_positive(rank=rank, batch=batch)
  _activation(activation)
  config = dict(widths=widths, rank=rank, activation=activation, dtype=jnp.dtype(dtype))
  x = _features(seed, batch, (widths[0],), dtype)
  if framework == "linen":
    module = _LinenLoRAMLP(widths, rank, activation, dtype)
    return _linen_model("lora_mlp", module, x, seed, config)
  make = functools.partial(_NnxLoRAMLP, widths, rank, activation, dtype)
  return _nnx_model("lora_mlp", make, x, seed, config)


# -------------------------------------------------------------------- losses


def language_model_loss(model: Model) -> Callable[[chex.ArrayTree, Any], chex.Array]:
  """``loss(params, (tokens, targets))``: mean next-token cross-entropy.

  ``targets`` are int token ids of the shape of ``tokens`` (see
  :func:`example_batch`).
  """

  def loss(params, batch):
    tokens, targets = batch
    logits = model.apply(params, tokens)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  return loss


def classification_loss(model: Model) -> Callable[[chex.ArrayTree, Any], chex.Array]:
  """``loss(params, (inputs, labels))``: mean softmax cross-entropy of int labels."""

  def loss(params, batch):
    inputs, labels = batch
    logits = model.apply(params, inputs)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  return loss


def example_batch(model: Model, seed: int = 1) -> tuple[chex.Array, chex.Array]:
  """``(inputs, targets)`` for the model's loss helpers.

  For a transformer the targets are the inputs shifted by one position (the
  last target is token 0); otherwise random int labels in
  ``[0, outputs)``.
  """
  if model.name == "transformer":
    targets = jnp.concatenate([model.inputs[:, 1:], jnp.zeros_like(model.inputs[:, :1])], axis=1)
    return model.inputs, targets
  classes = jax.eval_shape(model.apply, model.params, model.inputs).shape[-1]
  labels = jnp.asarray(_rng(seed, 2).integers(0, classes, model.inputs.shape[:1]), jnp.int32)
  return model.inputs, labels


def loss_for(model: Model) -> Callable[[chex.ArrayTree, Any], chex.Array]:
  """The zoo's loss for ``model``: next-token cross-entropy for a transformer,
  classification cross-entropy otherwise."""
  if model.name == "transformer":
    return language_model_loss(model)
  return classification_loss(model)


__all__ = [
  "ACTIVATIONS",
  "Model",
  "causal_attention",
  "classification_loss",
  "cnn",
  "example_batch",
  "language_model_loss",
  "lora_mlp",
  "loss_for",
  "mlp",
  "residual_mlp",
  "rotary",
  "transformer",
]
