"""Wall-clock to a target validation loss on training workloads, against tuned baselines.

Does a teleporting run reach a given validation loss sooner *on the clock* than
well-tuned runs without teleportation? Every method trains the same model on
the same data for the same number of steps; its learning rate (and weight
decay, and what else it has) is tuned with the same budget of random trials on
tuning seeds; the tuned values are then evaluated on other seeds. The target is
the best tuned baseline's median final validation loss, and the metric is the
training time until a run first reaches it.

Workloads (offline: nothing is downloaded):

* ``mlp_digits``: an MLP ``in-128-128-10`` (ReLU), batch 64, on scikit-learn's
  bundled 8x8 digits (MNIST when its IDX files are given, as for the
  classification experiment); symmetry :class:`teleport_jax.PositiveRescaling`.
* ``cnn_digits`` / ``cnn_bn_digits``: a ReLU CNN (3x3 convolutions with 16 and
  32 channels, 2x2 max-pooling, dense 64-10) without / with BatchNorm, batch
  64; the symmetries :func:`teleport_jax.find_symmetries` finds.
* ``char_transformer`` / ``char_transformer_relu``: a decoder-only
  character-level transformer of the size of nanoGPT's CPU ``shakespeare_char``
  configuration (4 layers, 4 heads, width 128, context 64, batch 12, no
  dropout), GELU/LayerNorm and ReLU/gain-free RMSNorm (which has neuron
  rescalings and residual rotations), on the text that ships with CPython
  (``pydoc_data.topics``, about 465k characters, first 90 % for training, last
  10 % for validation; ``--text FILE`` for another corpus); the symmetries
  :func:`teleport_jax.find_symmetries` finds.

Protocol:

* Every method's learning rate follows ``lr * warmup_cosine(step)``: linear
  warm-up over ``warmup`` steps (100 on the transformer, 5 % elsewhere), cosine
  decay to ``0.1 * lr`` at the last step. Minibatches are drawn uniformly at
  random with replacement (windows of the text, as nanoGPT does), inside the
  compiled step.
* Methods. Baselines: ``adamw`` (b1 0.9, b2 0.99); ``sgd_nesterov`` (momentum
  0.9, L2 weight decay); ``norm_balance``: AdamW followed by closed-form norm
  balancing after every step (:func:`teleport_jax.balanced`, the ENorm idea:
  O(parameters), no loss evaluation, Adam's moments transported);
  ``per_layer_lr``: AdamW whose step is multiplied per layer by ``r ** (d -
  1/2)``, ``d`` in ``[0, 1]`` the layer's position in the parameter tree's
  order (one extra tuned factor ``r``). Teleports (all wrap AdamW and move
  Adam's moments with the parameters): ``tp_gradbalance``: every step, AdamW
  steps from the gradient-balanced point (:func:`teleport_jax.balanced` with
  ``target="grad"``: closed form, the gradient there is the transported one);
  ``tp_gradbalance_50``: the same move through :func:`teleport_jax.with_teleport`
  (``Balance(target="grad", max_log_scale=1)``, one sweep, every move checked
  on the batch) every 50 steps from step 10; ``tp_lookahead``: the default
  optimizer-aware objective (:func:`teleport_jax.objectives.optimizer_lookahead`, 5
  AdamW steps from the transported state) maximised by
  :class:`teleport_jax.solvers.LineSearch` (5 steps) every 250 steps from step 20,
  with the default stability constraint; ``tp_lookahead_nostab``: the same
  without the stability constraint, whose sharpness estimates are two thirds
  of a look-ahead teleport's cost.
* Tuning: ``trials`` random draws (log-uniform) of the method's
  hyper-parameters per method and workload (methods with the same search
  space are tried at the same values: :func:`draw_trials`). Each draw is
  trained on its own tuning seed
  (1000 + trial: initialisation and minibatches); the draw with the
  lowest final validation loss is kept. The chosen values are stored in
  ``workloads_tuned.json`` next to this module (per mode) and reused unless
  ``retune`` is asked for.
* Evaluation: seeds ``0 .. seeds - 1``; the validation loss is measured every
  ``eval_every`` steps (outside the timed part). Training between two
  evaluations is one compiled ``lax.scan`` of ``eval_every`` steps (the MLP,
  the transformers) or ``eval_every`` calls of a compiled step (the CNNs:
  XLA's CPU convolutions are several times slower inside a loop body), all
  compiled ahead of time, compile time reported apart; the time of a run is
  the sum of those intervals (``block_until_ready``). A ``with_teleport``
  method runs a second program for the chunks its schedule skips, compiled
  with ``teleport=False`` (decided per chunk in Python, as
  :func:`teleport_jax.teleport_due` does): the conditional would otherwise
  cost at every step. Time to target: the training time up to the first
  evaluation at or below the target (resolution ``eval_every`` steps), ``None``
  if never reached.
* Sizes (``SIZES``): ``full``: 1,000 steps on the digits and 2,000 on the
  text, 8 trials, 3 evaluation seeds; ``quick``: 600 steps on either, 4
  trials, 3 seeds; ``smoke`` (tests): quarter-size models, a few steps.
* ``teleport_cost_grad_steps``: ``(t_method - t_adamw) / teleports / t_step``
  from the median training times of whole runs, i.e. what one teleport costs
  in AdamW steps on the clock (``None`` for methods that do not teleport).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax import models
from teleport_jax.experiments import common
from teleport_jax.experiments import data as data_lib
from teleport_jax.experiments import plotting

NAMES = ("mlp_digits", "cnn_digits", "cnn_bn_digits", "char_transformer", "char_transformer_relu")
TUNED_PATH = Path(__file__).with_name("workloads_tuned.json")
TUNING_SEED = 1000

# steps and evaluation interval per workload family; trials and seeds per mode
# (``monitor_stride``: the text's learning curve is measured on every k-th window of
# the validation split, the final loss on all of them)
SIZES = {
  "full": dict(digits=(1000, 25), text=(2000, 100), trials=8, seeds=3, scale=1.0, monitor_stride=3),
  "quick": dict(digits=(600, 25), text=(600, 50), trials=4, seeds=3, scale=1.0, monitor_stride=3),
  "smoke": dict(digits=(30, 10), text=(20, 10), trials=2, seeds=1, scale=0.25, monitor_stride=1),
}


# ---------------------------------------------------------------- workloads
@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
  """A model, its data and its training length.

  Attributes:
    name: workload name.
    description: one line.
    init: ``seed -> params``.
    loss: ``loss(params, x, y) -> scalar``.
    unit_loss: ``unit_loss(params, x, y) -> (n,)``, the losses whose mean is
      ``loss``: one per example, or one per text window (for standard errors and
      paired differences).
    train: the training data (a tuple of arrays, passed to ``sample``).
    sample: ``sample(train, key) -> (x, y)``, one minibatch (jit-able).
    val: ``(x, y)`` on which the learning curve is measured (the validation
      set, or a systematic sample of it when ``val_full`` is given).
    val_full: the whole validation split where ``val`` is a sample of it
      (evaluated once, at the end of each run), else ``None``.
    symmetry: the symmetry teleports and balancing use.
    steps: training steps.
    eval_every: steps between validation evaluations.
    warmup: warm-up steps of the learning-rate schedule.
    lr_range: ``{method family: (low, high)}`` of the learning rate.
    loop: ``"scan"``: the steps between evaluations run as one compiled
      ``lax.scan``; ``"steps"``: as that many calls of a compiled step (XLA's
      CPU convolutions run several times slower inside a loop body,
      jax-ml/jax#12868: 5.1 ms against 1.4 ms a step for the CNN).
  """

  name: str
  description: str
  init: Callable[[int], Any]
  loss: Callable
  unit_loss: Callable
  train: tuple
  sample: Callable
  val: tuple
  symmetry: Any
  steps: int
  eval_every: int
  warmup: int
  lr_range: dict
  loop: str = "scan"
  val_full: tuple | None = None


def _int(x: float) -> int:
  return max(2, int(round(x)))


def _classification_sample(batch: int):
  def sample(train, key):
    x, y = train
    idx = jax.random.randint(key, (batch,), 0, y.shape[0])
    return x[idx], y[idx]

  return sample


def _xent(apply):
  """``(loss, unit_loss)``: mean cross-entropy, and its mean per example (per window)."""

  def unit_loss(params, x, y):
    xent = optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)
    return jnp.mean(xent.reshape(xent.shape[0], -1), axis=1)

  def loss(params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y))

  return loss, unit_loss


def load_text(path: Path | None = None) -> tuple[str, str]:
  """``(text, source)``: the file at ``path``, else CPython's ``pydoc_data.topics``."""
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"text file {path} does not exist.")
    return path.read_text(encoding="utf-8", errors="replace"), str(path)
  from pydoc_data import topics

  return "".join(topics.topics[k] for k in sorted(topics.topics)), "pydoc_data.topics"


def encode_text(text: str, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, int]:
  """Character ids of the first ``1 - val_fraction`` and the rest of ``text``."""
  if len(text) < 1000:
    raise ValueError(f"the text has {len(text)} characters; at least 1000 are needed.")
  chars = sorted(set(text))
  table = {c: i for i, c in enumerate(chars)}
  tokens = np.fromiter((table[c] for c in text), dtype=np.int32, count=len(text))
  cut = int(round(len(tokens) * (1 - val_fraction)))
  return tokens[:cut], tokens[cut:], len(chars)


def _windows(tokens, starts, context):
  take = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (context + 1,)))
  w = take(starts)
  return w[:, :-1], w[:, 1:]


def make_workload(
  name: str,
  mode: str = "full",
  data_dir: Path | None = None,
  text: Path | None = None,
) -> Workload:
  """The workload ``name`` at the sizes of ``mode`` (``"full"``, ``"quick"``, ``"smoke"``)."""
  if name not in NAMES:
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}.")
  size = SIZES[mode]
  scale = size["scale"]
  if name.startswith("char_transformer"):
    raw, source = load_text(text)
    if mode == "smoke":
      raw = raw[:40_000]
    train_tokens, val_tokens, vocab = encode_text(raw)
    context, batch = 64, 12
    relu = name.endswith("relu")
    layers, width = _int(4 * scale), 8 * _int(16 * scale)

    def build(seed):
      return models.transformer(
        vocab=vocab,
        d_model=width,
        heads=4,
        layers=layers,
        context=context,
        batch=batch,
        mlp="relu" if relu else "gelu",
        norm="rmsnorm_gainfree" if relu else "layernorm",
        seed=seed,
      )

    m = build(0)
    loss, unit_loss = _xent(m.apply)
    # the whole split in consecutive windows; the learning curve on every k-th one
    starts = np.arange((len(val_tokens) - 1) // context) * context
    val_full = _windows(jnp.asarray(val_tokens), jnp.asarray(starts), context)
    k = size["monitor_stride"]
    val = tuple(v[::k] for v in val_full) if k > 1 else val_full

    def sample(train, key):
      (tokens,) = train
      s = jax.random.randint(key, (batch,), 0, tokens.shape[0] - context - 1)
      return _windows(tokens, s, context)

    steps, every = size["text"]
    kind = "ReLU/gain-free RMSNorm" if relu else "GELU/LayerNorm"
    return Workload(
      name=name,
      description=(
        f"transformer {layers}x{width}, 4 heads, context {context}, batch {batch}, {kind}, "
        f"vocabulary {vocab}; text {source} ({len(train_tokens)}/{len(val_tokens)} characters)"
      ),
      init=lambda seed: build(seed).params,
      loss=loss,
      unit_loss=unit_loss,
      train=(jnp.asarray(train_tokens),),
      sample=sample,
      val=val,
      val_full=val_full if k > 1 else None,
      symmetry=tj.find_symmetries(m.apply, m.params, m.inputs),
      steps=steps,
      eval_every=every,
      warmup=min(100, steps // 10),
      lr_range=dict(adam=(2e-4, 5e-3), sgd=(3e-2, 3.0)),
    )
  ds = data_lib.load_classification_data(data_dir, seed=0)
  x_tr, x_va = ds.x_train, ds.x_val
  side = int(round(math.sqrt(x_tr.shape[1])))
  batch = 64
  steps, every = size["digits"]
  if name == "mlp_digits":
    h = _int(128 * scale)
    widths = (x_tr.shape[1], h, h, 10)

    def build(seed):
      return models.mlp(widths, activation="relu", batch=batch, seed=seed)

    m = build(0)
    sym = tj.PositiveRescaling()
    what = f"MLP {'-'.join(map(str, widths))} (ReLU), batch {batch}"
  else:
    c1, c2, d = _int(16 * scale), _int(32 * scale), _int(64 * scale)
    bn = name == "cnn_bn_digits"
    x_tr = x_tr.reshape(-1, side, side, 1)
    x_va = x_va.reshape(-1, side, side, 1)

    def build(seed):
      return models.cnn(
        channels=(c1, c2),
        dense=(d, 10),
        activation="relu",
        pool="max",
        batchnorm=bn,
        image=(side, side, 1),
        batch=batch,
        seed=seed,
      )

    m = build(0)
    sym = tj.find_symmetries(m.apply, m.params, jnp.asarray(x_tr[:batch]))
    what = f"ReLU CNN conv {c1}-{c2}, dense {d}-10{', BatchNorm' if bn else ''}, batch {batch}"
  loss, unit_loss = _xent(m.apply)
  return Workload(
    name=name,
    description=f"{what}; {ds.name} ({len(ds.y_train)}/{len(ds.y_val)} images)",
    init=lambda seed: build(seed).params,
    loss=loss,
    unit_loss=unit_loss,
    train=(jnp.asarray(x_tr), jnp.asarray(ds.y_train)),
    sample=_classification_sample(batch),
    val=(jnp.asarray(x_va), jnp.asarray(ds.y_val)),
    symmetry=sym,
    steps=steps,
    eval_every=every,
    warmup=max(1, steps // 20),
    lr_range=dict(adam=(3e-4, 1e-2), sgd=(1e-2, 1.0)),
    loop="scan" if name == "mlp_digits" else "steps",
  )


# ------------------------------------------------------------------ methods
@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: how to build its optimizer from traced hyper-parameters.

  Attributes:
    name: method name.
    kind: ``"baseline"`` or ``"teleport"``.
    space: ``{hyper-parameter: (family or None, low, high)}``, log-uniform; a
      family names the workload's ``lr_range`` entry.
    build: ``build(hp, workload, schedule) -> GradientTransformationExtraArgs``.
    description: one line.
    tuned_as: a method whose tuned values this one runs with (a drop-in
      addition to it, not tuned on its own), else ``None``.
  """

  name: str
  kind: str
  space: dict
  build: Callable
  description: str
  tuned_as: str | None = None


def _adamw(hp, lr):
  return optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=hp["wd"])


def _layer_scale(hp) -> optax.GradientTransformation:
  """Multiplies each layer's updates by ``r ** (d - 1/2)`` (``d``: depth in [0, 1])."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    layers = sorted({_layer_key(p) for p, _ in paths})
    depth = {k: (i / max(1, len(layers) - 1)) - 0.5 for i, k in enumerate(layers)}
    log_r = jnp.log(hp["r"])
    scaled = [u * jnp.exp(log_r * depth[_layer_key(p)]).astype(u.dtype) for p, u in paths]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), scaled), state

  return optax.GradientTransformation(init, update)


def _layer_key(path) -> str:
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  if keys and keys[0] in ("params", "batch_stats"):
    keys = keys[1:]
  return keys[0] if keys else ""


_ADAM_SPACE = {"lr": ("adam", None, None), "wd": (None, 1e-2, 0.3)}


# ``tj.every`` arguments of the methods that teleport on a schedule (the plots mark them)
SCHEDULES = {
  "tp_onestep": dict(k=250, start=20),
  "tp_lookahead": dict(k=250, start=20),
  "tp_lookahead_nostab": dict(k=250, start=20),
  "tp_gradbalance_50": dict(k=50, start=10),
}
# methods that move at every step (no schedule to mark)
EVERY_STEP = ("tp_gradbalance",)


def _tp(hp, lr, wl, **kwargs):
  return tj.with_teleport(_adamw(hp, lr), wl.symmetry, state_policy="transport", **kwargs)


def lookahead_teleport(hp, lr, wl, **kwargs):
  """``tp_lookahead``'s optimizer: line search on the 5-step look-ahead every 250 steps."""
  return _tp(
    hp,
    lr,
    wl,
    schedule=tj.every(**SCHEDULES["tp_lookahead"]),
    solver_backend=tj.solvers.LineSearch(),
    num_steps=5,
    **kwargs,
  )


METHODS = {
  m.name: m
  for m in (
    Method("adamw", "baseline", _ADAM_SPACE, lambda hp, lr, wl: _adamw(hp, lr), "AdamW (b2 0.99)"),
    Method(
      "sgd_nesterov",
      "baseline",
      {"lr": ("sgd", None, None), "wd": (None, 1e-5, 1e-2)},
      lambda hp, lr, wl: optax.chain(
        optax.add_decayed_weights(hp["wd"]), optax.sgd(lr, momentum=0.9, nesterov=True)
      ),
      "SGD, Nesterov momentum 0.9, L2 weight decay",
    ),
    Method(
      "norm_balance",
      "baseline",
      _ADAM_SPACE,
      lambda hp, lr, wl: tj.balanced(_adamw(hp, lr), wl.symmetry, "norm"),
      "AdamW + closed-form norm balancing after every step (tj.balanced, ENorm)",
    ),
    Method(
      "per_layer_lr",
      "baseline",
      {**_ADAM_SPACE, "r": (None, 1 / 8, 8.0)},
      lambda hp, lr, wl: optax.chain(_adamw(hp, lr), _layer_scale(hp)),
      "AdamW with per-layer step factors r^(depth - 1/2)",
    ),
    Method(
      "tp_gradbalance",
      "teleport",
      _ADAM_SPACE,
      lambda hp, lr, wl: tj.balanced(_adamw(hp, lr), wl.symmetry, "grad"),
      "AdamW from the gradient-balanced point at every step (tj.balanced, closed form)",
    ),
    Method(
      "tp_gradbalance_50",
      "teleport",
      _ADAM_SPACE,
      lambda hp, lr, wl: _tp(
        hp,
        lr,
        wl,
        schedule=tj.every(**SCHEDULES["tp_gradbalance_50"]),
        solver_backend=tj.solvers.Balance("grad", max_log_scale=1.0),
        num_steps=1,
        stability=False,
      ),
      "AdamW + checked gradient balancing (with_teleport, |log s| <= 1) every 50 steps",
    ),
    Method(
      "tp_onestep",
      "teleport",
      _ADAM_SPACE,
      lambda hp, lr, wl: _tp(hp, lr, wl, schedule=tj.every(**SCHEDULES["tp_onestep"])),
      "AdamW + with_teleport's default teleport (tj.solvers.OneStep) every 250 steps, "
      "at AdamW's tuned values",
      tuned_as="adamw",
    ),
    Method(
      "tp_lookahead",
      "teleport",
      _ADAM_SPACE,
      lambda hp, lr, wl: lookahead_teleport(hp, lr, wl),
      "AdamW + optimizer look-ahead (5 AdamW steps) by line search every 250 steps",
    ),
    Method(
      "tp_lookahead_nostab",
      "teleport",
      _ADAM_SPACE,
      lambda hp, lr, wl: lookahead_teleport(hp, lr, wl, stability=False),
      "tp_lookahead without the stability bound (no sharpness estimates: a third of the cost)",
    ),
  )
}
# a with_teleport whose schedule never fires: what the wrapper costs in a compiled loop
_NEVER = Method(
  "adamw_with_teleport_idle",
  "baseline",
  _ADAM_SPACE,
  lambda hp, lr, wl: _tp(hp, lr, wl, schedule=tj.every(1, start=2**30)),
  "AdamW inside with_teleport, schedule never firing",
)


def lr_schedule(hp, wl: Workload) -> Callable:
  base = optax.warmup_cosine_decay_schedule(
    0.0, 1.0, wl.warmup, max(wl.steps, wl.warmup + 1), end_value=0.1
  )
  return lambda count: hp["lr"] * base(count)


def draw_trials(method: Method, wl: Workload, n: int) -> list[dict]:
  """``n`` log-uniform draws of ``method``'s hyper-parameters.

  The generator is seeded by the first four bytes of the workload's name only
  (as the stored tuned values were drawn), so the methods of a workload with
  the same search space are tried at the same values (paired trials: AdamW, the
  balancing and teleport methods); SGD maps the same uniform draws to its own
  learning-rate range, and the per-layer method's extra factor, drawn within
  each trial, shifts its sequence after the first trial.
  """
  seed = int.from_bytes(wl.name.encode()[:4].ljust(4, b"\0"), "little")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    hp = {}
    for k, (family, lo, hi) in method.space.items():
      if family is not None:
        lo, hi = wl.lr_range[family]
      hp[k] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    out.append(hp)
  return out


# ------------------------------------------------------------------ training
@dataclasses.dataclass
class Trainer:
  """A method compiled for a workload: ``run(hp, seed)`` trains one run."""

  wl: Workload
  method: Method
  split_chunks: bool = True
  compile_s: float = 0.0

  def __post_init__(self):
    wl, method = self.wl, self.method
    loss = wl.loss

    def make(hp):
      return optax.with_extra_args_support(method.build(hp, lr_schedule(hp, wl), wl))

    def init(params, hp):
      return make(hp).init(params)

    def chunk(params, state, key, hp, train, teleport=None):
      opt = make(hp)
      extra = {} if teleport is None else {"teleport": teleport}

      def step(carry, _):
        p, s, k = carry
        k, sub = jax.random.split(k)
        x, y = wl.sample(train, sub)
        value, g = jax.value_and_grad(loss)(p, x, y)
        u, s = opt.update(g, s, p, value=value, value_fn=loss, x=x, y=y, **extra)
        return (optax.apply_updates(p, u), s, k), value

      if self._length == 1:  # no loop at all (a scan of one step is still a loop)
        (params, state, key), value = step((params, state, key), None)
        return params, state, key, value
      (params, state, key), values = jax.lax.scan(
        step, (params, state, key), None, length=self._length
      )
      return params, state, key, jnp.mean(values)

    def evaluate(params, val):
      return wl.unit_loss(params, *val)

    if wl.loop not in ("scan", "steps"):
      raise ValueError(f"Workload.loop must be 'scan' or 'steps', got {wl.loop!r}.")
    self._length = wl.eval_every if wl.loop == "scan" else 1
    params = wl.init(0)
    hp0 = {k: jnp.float32(1e-3) for k in method.space}
    t = time.perf_counter()
    self._init = jax.jit(init).lower(params, hp0).compile()
    state = jax.eval_shape(init, params, hp0)
    key = jax.random.key(0)
    self._chunk = (
      jax.jit(chunk, donate_argnums=(0, 1)).lower(params, state, key, hp0, wl.train).compile()
    )
    # a with_teleport's chunks that its schedule skips run a program without the
    # conditional (decided per chunk in Python, as tj.teleport_due does)
    self._split = self.split_chunks and isinstance(state, tj.TeleportState)
    if self._split:
      plain = functools.partial(chunk, teleport=False)
      self._plain_chunk = (
        jax.jit(plain, donate_argnums=(0, 1)).lower(params, state, key, hp0, wl.train).compile()
      )
    self._eval = jax.jit(evaluate).lower(params, wl.val).compile()
    if wl.val_full is not None:
      self._eval_full = jax.jit(evaluate).lower(params, wl.val_full).compile()
    self.compile_s = time.perf_counter() - t

  def run(self, hp: dict, seed: int) -> dict:
    """Trains one run; returns its validation curve, times and teleport counts."""
    wl = self.wl
    hp = {k: jnp.float32(hp[k]) for k in self.method.space}
    params = wl.init(seed)
    state = self._init(params, hp)
    key = jax.random.key(seed)
    val = [_mean(self._eval(params, wl.val))]
    times, train = [0.0], []
    elapsed = 0.0
    # the schedule and the step count on the host: no transfer inside the timed part
    schedule = jax.device_get(state.schedule) if self._split else None
    count = int(state.count) if self._split else 0
    for _ in range(wl.steps // wl.eval_every):
      t = time.perf_counter()
      losses = []
      for _ in range(wl.eval_every // self._length):
        fn = self._chunk
        if self._split and not tj.schedules.fires_within(schedule, count, self._length):
          fn = self._plain_chunk
        params, state, key, tr = fn(params, state, key, hp, wl.train)
        losses.append(tr)
        count += self._length
      jax.block_until_ready((params, state))
      elapsed += time.perf_counter() - t
      times.append(elapsed)
      train.append(float(np.mean(jax.device_get(losses))))  # one transfer
      units = self._eval(params, wl.val)
      v = _mean(units)
      val.append(v)
      if not math.isfinite(v):
        break
    if wl.val_full is not None:
      units = self._eval_full(params, wl.val_full)
    units = np.asarray(jax.device_get(units), np.float64)
    out = dict(
      val_loss=val,
      train_loss=train,
      time_s=times,
      eval_every=wl.eval_every,
      # the whole validation split at the final parameters (the per-unit losses are
      # kept for paired differences and dropped from the stored record)
      final_val_loss_full=float(np.mean(units)),
      final_val_se=_se(units),
      final_units=units,
    )
    if isinstance(state, (tj.TeleportState, tj.learned.LearnedTeleportState)):
      out.update(
        teleports=int(state.num_teleports),
        rejected=int(state.num_rejected),
        max_rel_loss_drift=float(state.max_rel_loss_drift),
      )
    elif isinstance(state, tj.BalancedState):
      # tj.balanced evaluates no loss: check its action's exactness here, once, with a
      # norm-balancing move of the final parameters on the validation set
      moved = tj.group_action(
        params, tj.solvers.Balance("norm").element(wl.symmetry, params), symmetry=wl.symmetry
      )
      before, after = val[-1], _mean(self._eval(moved, wl.val))
      out.update(
        teleports=int(state.num_balanced),
        rejected=int(state.num_rejected),
        max_rel_loss_drift=abs(after - before) / abs(before),
      )
    return out


def _mean(units) -> float:
  return float(np.mean(jax.device_get(units), dtype=np.float64))


def _se(units: np.ndarray) -> float | None:
  """Standard error of the mean of ``units`` (over examples or windows)."""
  if units.size < 2 or not np.all(np.isfinite(units)):
    return None
  return float(np.std(units, ddof=1) / math.sqrt(units.size))


def _final(run: dict) -> float:
  v = run["val_loss"][-1]
  return v if math.isfinite(v) else math.inf


def tune(trainer: Trainer, trials: int, progress=None) -> dict:
  """Random search: ``trials`` draws, each on tuning seed ``TUNING_SEED + i``."""
  draws = draw_trials(trainer.method, trainer.wl, trials)
  scores = []
  for i, hp in enumerate(draws):
    scores.append(_final(trainer.run(hp, TUNING_SEED + i)))
    if progress is not None:
      progress.update()
  best = int(np.argmin(scores))
  return {
    "hp": draws[best],
    "trials": [
      {"hp": hp, "final_val_loss": s if math.isfinite(s) else None} for hp, s in zip(draws, scores)
    ],
  }


def _median(xs):
  """Median of the reached values; ``None`` if fewer than half of the runs reached."""
  got = [x for x in xs if x is not None]
  if len(got) * 2 < len(xs) or not got:
    return None
  padded = sorted(got) + [math.inf] * (len(xs) - len(got))
  m = statistics.median(padded)
  return None if math.isinf(m) else m


def to_target(run: dict, target: float) -> tuple[float | None, int | None]:
  """Training seconds and steps until the validation loss is first ``<= target``."""
  for i, v in enumerate(run["val_loss"]):
    if v <= target:
      return run["time_s"][i], i * run["eval_every"]
  return None, None


def load_tuned() -> dict:
  if TUNED_PATH.is_file():
    return json.loads(TUNED_PATH.read_text())
  return {}


def save_tuned(tuned: dict) -> None:
  """Writes ``tuned`` over the stored values, keeping workloads it does not hold."""
  merged = load_tuned()
  for mode, per_mode in tuned.items():
    for name, per_workload in per_mode.items():
      merged.setdefault(mode, {}).setdefault(name, {}).update(per_workload)
  TUNED_PATH.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


def evaluate(trainer: Trainer, hp: dict, seeds, progress=None) -> dict:
  """``trainer``'s method run at ``hp`` on every seed: the record :func:`summarise` reads."""
  runs = []
  for s in seeds:
    runs.append(trainer.run(hp, s))
    if progress is not None:
      progress.update()
  method = trainer.method
  return dict(
    kind=method.kind,
    description=method.description,
    hp=hp,
    compile_s=trainer.compile_s,
    runs=runs,
  )


def run_workload(
  name: str,
  mode: str = "full",
  *,
  methods=None,
  retune: bool = False,
  data_dir=None,
  text=None,
  progress=None,
  tuned: dict | None = None,
  on_tuned: Callable[[], None] | None = None,
) -> dict:
  """Tunes (or loads) and evaluates every method on one workload.

  Every method is tuned first (``on_tuned()`` is called after each, so that a
  long run can store what it has tuned before it ends), then every method is
  evaluated, so that the timed evaluation runs are taken back to back.

  Returns:
    The workload's record: ``target_val_loss``, ``baseline``, ``methods`` (per
    method ``kind``, ``time_to_target_s``, ``steps_to_target``,
    ``final_val_loss``, ``compile_s``, ``teleport_cost_grad_steps``, the tuned
    ``hp`` and the per-seed curves), ``loop_skip_overhead`` (a never-firing
    ``with_teleport`` over AdamW in the workload's loop, the schedule inside the
    program) and ``loop_skip_overhead_split`` (the same, chunks the schedule
    skips compiled with ``teleport=False``, as every teleport method here runs).
  """
  size = SIZES[mode]
  wl = make_workload(name, mode, data_dir=data_dir, text=text)
  tuned = load_tuned() if tuned is None else tuned
  stored = tuned.setdefault(mode, {}).setdefault(name, {})
  names = list(methods or METHODS)
  seeds = list(range(size["seeds"]))
  out: dict[str, Any] = {}
  trainers = {}
  for mname in names:
    trainers[mname] = Trainer(wl, METHODS[mname])
    # a drop-in method runs at the values of the method it is added to
    tuned_as = METHODS[mname].tuned_as or mname
    if (retune and tuned_as == mname) or tuned_as not in stored:
      trainer = trainers.get(tuned_as) or Trainer(wl, METHODS[tuned_as])
      stored[tuned_as] = tune(trainer, size["trials"], progress)
      if on_tuned is not None:
        on_tuned()
  for mname in names:
    method, trainer = METHODS[mname], trainers[mname]
    out[mname] = evaluate(trainer, stored[method.tuned_as or mname]["hp"], seeds, progress)
  # what the wrapper costs in a compiled loop when it never teleports: AdamW's
  # tuned values, the idle wrapper and plain AdamW timed back to back, twice
  # (the schedule inside the program, as a plain compiled loop has it; and the
  # Trainer's own split, where chunks the schedule skips run without the conditional)
  hp = stored["adamw"]["hp"] if "adamw" in stored else draw_trials(METHODS["adamw"], wl, 1)[0]
  plain = trainers.get("adamw") or Trainer(wl, METHODS["adamw"])
  idle = {"cond": Trainer(wl, _NEVER, split_chunks=False), "split": Trainer(wl, _NEVER)}
  ratios = {k: [] for k in idle}
  for _ in range(2):
    for k, trainer in idle.items():
      t_idle = trainer.run(hp, 0)["time_s"][-1]
      t_plain = plain.run(hp, 0)["time_s"][-1]
      ratios[k].append(t_idle / t_plain)
  return summarise(
    wl,
    out,
    loop_skip_overhead=min(ratios["cond"]),
    loop_skip_overhead_split=min(ratios["split"]),
  )


def _full(run: dict) -> float:
  v = run.get("final_val_loss_full", run["val_loss"][-1])
  return v if math.isfinite(v) else math.inf


def paired(run: dict, ref: dict) -> tuple[float | None, float | None]:
  """``(difference, standard error)`` of two runs' final whole-split losses.

  The runs share a seed (initialisation and minibatches) and are evaluated on
  the same examples or windows, so the difference is taken unit by unit; its
  standard error is that of the mean of the per-unit differences: what the
  difference would move by on another sample of the same size.
  """
  a, b = run.get("final_units"), ref.get("final_units")
  if a is None or b is None or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return None, None
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(np.mean(d)), _se(d)


def resolved(diffs: list, ses: list, z: float = 2.0) -> str | None:
  """``"lower"``/``"higher"`` when every seed's difference has that sign beyond ``z`` SE."""
  if not diffs or any(d is None or e is None for d, e in zip(diffs, ses)):
    return None
  if all(d < -z * e for d, e in zip(diffs, ses)):
    return "lower"
  if all(d > z * e for d, e in zip(diffs, ses)):
    return "higher"
  return None


def summarise(
  wl: Workload,
  out: dict,
  loop_skip_overhead: float | None = None,
  loop_skip_overhead_split: float | None = None,
) -> dict:
  """Target, time to target, paired differences and teleport cost from the evaluated runs.

  The best baseline is the one with the lowest median final loss on the whole
  validation split; the target is its median final loss on the learning
  curve's sample (the measure time to target is read on). Every method is
  compared with it seed by seed: the difference of final whole-split losses
  with its standard error over examples/windows, and the ratio of times to target.
  """
  full = {m: [_full(r) for r in rec["runs"]] for m, rec in out.items()}
  monitor = {m: [_final(r) for r in rec["runs"]] for m, rec in out.items()}
  baselines = [m for m, rec in out.items() if rec["kind"] == "baseline"]
  best = min(baselines, key=lambda m: statistics.median(full[m]))
  target = statistics.median(monitor[best])
  total = {m: statistics.median(r["time_s"][-1] for r in rec["runs"]) for m, rec in out.items()}
  per_step = total["adamw"] / wl.steps if "adamw" in total else None
  methods = {}
  for m, rec in out.items():
    hits = [to_target(r, target) for r in rec["runs"]]
    teleports = [r.get("teleports") for r in rec["runs"]]
    cost = None
    if rec["kind"] == "teleport" and per_step and teleports[0]:
      n = statistics.median(teleports)
      cost = (total[m] - total["adamw"]) / n / per_step if n else None
    diffs = [paired(r, ref) for r, ref in zip(rec["runs"], out[best]["runs"])]
    methods[m] = dict(
      kind=rec["kind"],
      description=rec["description"],
      hp=rec["hp"],
      time_to_target_s=[h[0] for h in hits],
      steps_to_target=[h[1] for h in hits],
      final_val_loss=[f if math.isfinite(f) else None for f in full[m]],
      final_val_se=[r.get("final_val_se") for r in rec["runs"]],
      final_monitor_loss=[f if math.isfinite(f) else None for f in monitor[m]],
      paired_final_diff=[d for d, _ in diffs],
      paired_final_diff_se=[e for _, e in diffs],
      resolved_final=None if m == best else resolved(*zip(*diffs)),
      train_time_s=[r["time_s"][-1] for r in rec["runs"]],
      compile_s=rec["compile_s"],
      teleport_cost_grad_steps=cost,
      teleports=teleports if teleports[0] is not None else None,
      rejected=[r.get("rejected") for r in rec["runs"]] if teleports[0] is not None else None,
      max_rel_loss_drift=max((r.get("max_rel_loss_drift", 0.0) for r in rec["runs"]), default=0.0),
      nonfinite=any(not math.isfinite(r["val_loss"][-1]) for r in rec["runs"]),
      curves=[{k: r[k] for k in ("val_loss", "time_s")} for r in rec["runs"]],
    )
  base_time = _median(methods[best]["time_to_target_s"])
  # a baseline whose validation loss dips below the target before it ends (and then
  # rises: overfitting) reaches the target sooner than the one that set it
  times = {m: _median(methods[m]["time_to_target_s"]) for m in baselines}
  fastest = min((m for m in baselines if times[m] is not None), key=times.get, default=best)
  fastest_time = times.get(fastest)
  base_steps = _median(methods[best]["steps_to_target"])
  for m in methods.values():
    t = _median(m["time_to_target_s"])
    m["time_ratio"] = None if t is None or not base_time else t / base_time
    m["time_ratio_vs_fastest_baseline"] = (
      None if t is None or not fastest_time else t / fastest_time
    )
    m["paired_time_ratio"] = [
      None if a is None or not b else a / b
      for a, b in zip(m["time_to_target_s"], methods[best]["time_to_target_s"])
    ]
    m["resolved_time"] = resolved_ratio(
      m["time_to_target_s"], methods[best]["time_to_target_s"], wl.eval_every, base_steps
    )
  methods[best]["resolved_time"] = None
  return dict(
    description=wl.description,
    steps=wl.steps,
    eval_every=wl.eval_every,
    target_val_loss=target,
    baseline=best,
    fastest_baseline=fastest,
    # the time to target is read at evaluations: a ratio is known to about
    # eval_every / the baseline's steps to target
    time_resolution=None if not base_steps else wl.eval_every / base_steps,
    monitor_units=int(wl.val[1].shape[0]),
    full_units=int((wl.val if wl.val_full is None else wl.val_full)[1].shape[0]),
    loop_skip_overhead=loop_skip_overhead,
    loop_skip_overhead_split=loop_skip_overhead_split,
    methods=methods,
  )


def resolved_ratio(times, base_times, eval_every: int, base_steps: float | None) -> str | None:
  """``"faster"``/``"slower"`` when every seed's time ratio is beyond the evaluation grid.

  A time to target is read at evaluations ``eval_every`` steps apart, so a
  ratio within ``1 ± eval_every / steps to target`` of 1 is not resolved. A run
  that never reaches the target, against one that does, is slower.
  """
  if not times or not base_steps or any(b is None for b in base_times):
    return None
  ratios = [math.inf if a is None else a / b for a, b in zip(times, base_times)]
  eps = eval_every / base_steps
  if all(r < 1 - eps for r in ratios):
    return "faster"
  if all(r > 1 + eps for r in ratios):
    return "slower"
  return None


# ------------------------------------------------------------------ reproduce
def _mode(config: common.RunConfig) -> str:
  return config.mode or ("quick" if config.quick else "full")


def num_units(config: common.RunConfig) -> int:
  size = SIZES[_mode(config)]
  return len(NAMES) * len(METHODS) * size["seeds"]


def table_rows(records: dict) -> list[dict]:
  """One row per workload and method: medians over the evaluation seeds."""
  rows = []
  for name, rec in records.items():
    for m, r in rec["methods"].items():
      finals = [f for f in r["final_val_loss"] if f is not None]
      steps = _median(r["steps_to_target"])
      rows.append(
        {
          "workload": name,
          "method": m,
          "kind": r["kind"],
          "final val loss": statistics.median(finals) if finals else None,
          "reached": f"{sum(t is not None for t in r['time_to_target_s'])}/"
          f"{len(r['time_to_target_s'])}",
          "time to target s": _median(r["time_to_target_s"]),
          "time ratio": r["time_ratio"],
          "vs fastest baseline": r["time_ratio_vs_fastest_baseline"],
          "steps to target": steps,
          "train s": statistics.median(r["train_time_s"]),
          "teleport cost (steps)": r["teleport_cost_grad_steps"],
          "compile s": r["compile_s"],
        }
      )
  return rows


def teleport_steps(method: str, steps: int) -> list[int]:
  """The steps (0-based, below ``steps``) at which ``method``'s schedule fires."""
  if method not in SCHEDULES:
    return []
  schedule = tj.every(**SCHEDULES[method])
  return [t for t in range(steps) if tj.schedules.fires_within(schedule, t, 1)]


@plotting.styled
def plot(name: str, rec: dict, out_dir: Path) -> list[Path]:
  """Validation loss against training seconds and against steps (median over seeds)."""
  fig, axes = plotting.panels(
    2,
    xlabel=["training seconds", "steps"],
    ylabel="validation loss",
    panel_size=(5.6, 3.8),
    suptitle=f"{name}: {rec['description']}\n(median over seeds; dashed: baselines)",
  )
  for m, r in rec["methods"].items():
    curves = r["curves"]
    n = min(len(c["val_loss"]) for c in curves)
    val = np.median(np.asarray([c["val_loss"][:n] for c in curves]), axis=0)
    secs = np.median(np.asarray([c["time_s"][:n] for c in curves]), axis=0)
    steps = np.arange(n) * rec["eval_every"]
    color = plotting.color(m)
    ls = "-" if r["kind"] == "teleport" else "--"
    label = f"{m} (every step)" if m in EVERY_STEP else m
    axes[0].plot(secs, val, color=color, ls=ls, label=label)
    axes[1].plot(steps, val, color=color, ls=ls, label=label)
    # between two evaluations: on the straight line the plot draws between them
    at = np.asarray([t for t in teleport_steps(m, rec["steps"]) if t <= steps[-1]], np.float64)
    if at.size:
      y = np.interp(at, steps, val)
      plotting.mark_teleports(axes[0], np.interp(at, steps, secs), y, color=color, ms=6)
      plotting.mark_teleports(axes[1], at, y, color=color, ms=6)
  for ax in axes:
    ax.axhline(rec["target_val_loss"], color="k", lw=0.8, ls=":", label="target")
    ax.set_yscale("log")
  plotting.legend(fig)
  path = plotting.savefig(fig, out_dir / f"workloads_{name}.png")
  return [path]


def run(config: common.RunConfig, progress=None, names=None) -> dict:
  """The ``workloads`` experiment of ``reproduce`` (every workload, every method)."""
  mode = _mode(config)
  tuned = load_tuned()

  def store():
    # each method's values as soon as it is tuned (kept if the run stops before its
    # end); smoke-size values (tests) are not stored
    if mode != "smoke":
      save_tuned(tuned)

  records = {}
  for name in names or NAMES:
    records[name] = run_workload(
      name,
      mode,
      retune=config.retune,
      data_dir=config.data_dir,
      text=config.text,
      progress=progress,
      tuned=tuned,
      on_tuned=store,
    )
    if config.out_dir is not None:
      plot(name, records[name], Path(config.out_dir))
  size = SIZES[mode]
  best = {}
  for name, rec in records.items():
    ratios = {m: r["time_ratio"] for m, r in rec["methods"].items() if r["kind"] == "teleport"}
    reached = {m: x for m, x in ratios.items() if x is not None}
    best[name] = min(reached.values()) if reached else None
  return dict(
    protocol=dict(
      mode=mode,
      trials=size["trials"],
      evaluation_seeds=size["seeds"],
      tuning_seeds=f"{TUNING_SEED}..{TUNING_SEED + size['trials'] - 1}",
      methods={m: METHODS[m].description for m in METHODS},
      workloads={n: r["description"] for n, r in records.items()},
      steps={n: f"{r['steps']} (evaluate every {r['eval_every']})" for n, r in records.items()},
    ),
    table=table_rows(records),
    workloads=records,
    notes=[
      "target: the best tuned baseline's median final validation loss; time ratio: "
      "median time to target / the best baseline's (None: fewer than half the seeds "
      "reached it)",
      "loop skip overhead (a with_teleport that never fires / AdamW, the workload's loop; "
      "the schedule inside the program / chunks it skips compiled with teleport=False): "
      + ", ".join(
        f"{n} {r['loop_skip_overhead']:.3f} / {r['loop_skip_overhead_split']:.3f}"
        for n, r in records.items()
      ),
    ],
    targets={f"best teleport time ratio {n}": v for n, v in best.items()},
  )


def markdown_table(records: dict) -> str:
  """The results table, per workload and method, medians over the evaluation seeds.

  ``python -m benchmarks.report`` renders the same table into docs/performance.md
  from ``benchmarks/results/workloads.json``.
  """

  def g(x, fmt="{:.3g}"):
    return "–" if x is None else fmt.format(x)

  lines = [
    "| workload (target) | method | final val. loss | reached | time to target | ratio "
    "| vs fastest baseline | steps to target | teleport cost (AdamW steps) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, rec in records.items():
    for m, r in rec["methods"].items():
      finals = [f for f in r["final_val_loss"] if f is not None]
      reached = sum(t is not None for t in r["time_to_target_s"])
      star = " (target)" if m == rec["baseline"] else ""
      lines.append(
        f"| {name} ({rec['target_val_loss']:.4g}) | `{m}`{star} "
        f"| {g(statistics.median(finals) if finals else None, '{:.4g}')} "
        f"| {reached} of {len(r['time_to_target_s'])} "
        f"| {g(_median(r['time_to_target_s']), '{:.2f} s')} | {g(r['time_ratio'], '{:.2f}')} "
        f"| {g(r['time_ratio_vs_fastest_baseline'], '{:.2f}')} "
        f"| {g(_median(r['steps_to_target']), '{:.0f}')} | {g(r['teleport_cost_grad_steps'])} |"
      )
  return "\n".join(lines)
