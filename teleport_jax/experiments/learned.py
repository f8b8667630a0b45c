"""Learned teleports on the published learn-to-teleport problem (Zhao et al., ICLR 2024).

The problem of the published experiment: an MLP regression with dims
``[20, 20, 20, 20]`` in the published code's convention (20 samples, 20 input
features, a hidden layer of 20 LeakyReLU(0.1) units, 20 outputs: data ``X``
``20x20``, weights ``W1``, ``W2`` ``20x20``, targets ``Y`` ``20x20``, every entry
uniform on ``[0, 1)``), the loss ``1/2 |Y - sigma(X W1) W2|^2``, and the
data-dependent GL(20) symmetry of the hidden layer. We use its exact action
(:class:`teleport_jax.DataDependentGL`, Cayley elements), not the published
first-order one, which changes the loss.

Methods (a task is one training run from one initialisation; every method
trains the same test tasks, never seen in meta-training):

* ``gd``: gradient descent, step ``3e-4`` (the published baseline);
* ``lr``: a learned step size alone (the policy proposes the step, it does not
  move the parameters): what a learned step size gives by itself;
* ``lr_tele``: a learned step size and a learned teleport before every step
  (the published "LSTM(lr, tele)"), with :class:`~teleport_jax.learned.EquivariantPolicy`;
* ``lr_tele_lstm``: the same with the published LSTM configuration
  (:class:`~teleport_jax.learned.LSTMPolicy`, hidden 20);
* ``update``: a learned optimizer (two LSTM cells on the flattened gradient, a
  linear map to the update, as the published "LSTM(update)");
* ``update_tele``: that optimizer with a learned teleport before every step;
* ``gd_width32``, ``lr_tele_width32``: the same problem at dims ``[32, 32, 32, 32]``,
  with the ``lr_tele`` policy trained at width 20 (transfer).

Every learned method runs inside :func:`teleport_jax.learned.learned_teleport`
(the guard: a move that changes the loss beyond ``rtol`` is refused). Each
method's training is one compiled ``lax.scan`` over the epochs; ``time_s`` is
the median wall-clock of that loop over repeats, spread over the epochs in
proportion (every epoch of a compiled loop costs the same), the policy's
forward pass included. Meta-training time is reported apart.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import flatten_util

import teleport_jax as tj
from teleport_jax import learned as L
from teleport_jax._src.learned import policy as policy_lib
from teleport_jax._src.solver import state_transport
from teleport_jax.experiments import common
from teleport_jax.experiments import plotting

DIMS = (20, 20, 20, 20)
WIDE = (32, 32, 32, 32)
GD_LR = 3e-4
LR_RANGE = (1e-7, 5e-3)  # the published clamp of the learned step size
PUBLISHED_RMS = 0.01 / 20  # the published magnitude 0.01 (Frobenius) of a 20x20 element, as RMS
# the equivariant policy's largest move: six times the published one (a greedy search over
# moves of up to this size gains several times more than at the published size), learned
# from a small start
MAX_RMS = 3e-3
MOVE_INIT = 0.1
SLOPE = 0.1
TEST_KEY = 10**6  # test task i: jax.random.key(TEST_KEY + i); meta-training draws from key(seed)
VALIDATION_KEY = 2 * 10**6  # the tasks that choose among meta-training seeds
METHODS = (
  "gd",
  "lr",
  "lr_tele",
  "lr_tele_lstm",
  "update",
  "update_tele",
  "gd_momentum",
  "lr_tele_momentum",
  "gd_width32",
  "lr_tele_width32",
)
UPDATE_METHODS = ("update", "update_tele")
BETA = 0.9  # heavy-ball momentum of the momentum variant

SIZES = {
  "full": dict(
    epochs=300,
    update_epochs=101,
    seeds=5,
    repeats=5,
    tasks=8,
    lr_steps=1200,
    update_steps=800,
    meta_seeds=3,
    validation=3,
  ),
  "quick": dict(
    epochs=300,
    update_epochs=101,
    seeds=3,
    repeats=3,
    tasks=8,
    lr_steps=300,
    update_steps=300,
    meta_seeds=1,
    validation=2,
  ),
  "smoke": dict(
    epochs=12,
    update_epochs=12,
    seeds=2,
    repeats=1,
    tasks=2,
    lr_steps=2,
    update_steps=2,
    meta_seeds=1,
    validation=1,
  ),
}


# ------------------------------------------------------------------ problem
def loss_fn(params, data):
  """``1/2 |Y - sigma(X W1) W2|^2`` (sum over entries, as published)."""
  x, y = data
  h = jax.nn.leaky_relu(x @ params[0], SLOPE)
  return 0.5 * jnp.sum((h @ params[1] - y) ** 2)


def sampler(dims=DIMS) -> Callable:
  """``sample(key) -> (params, (X, Y))``: one task, every entry uniform on ``[0, 1)``."""
  n, d, h, o = dims

  def sample(key):
    k = jax.random.split(key, 4)
    params = [jax.random.uniform(k[0], (d, h)), jax.random.uniform(k[1], (h, o))]
    return params, (jax.random.uniform(k[2], (n, d)), jax.random.uniform(k[3], (n, o)))

  return sample


def family(dims=DIMS) -> L.TaskFamily:
  """The tasks at ``dims``, with the exact data-dependent GL symmetry bound to the model."""
  sample = sampler(dims)
  params, data = sample(jax.random.key(0))
  sym = tj.DataDependentGL(activation=tj.activations.leaky_relu(SLOPE))
  return L.TaskFamily(sample, loss_fn, sym.bind(loss_fn, params, data))


def sharpness(dims, draws: int = 3, iters: int = 50) -> float:
  """Mean top Hessian eigenvalue at initialisation (power iteration) over meta-training draws."""
  fam = family(dims)
  out = []
  for i in range(draws):
    params, data = fam.sample(jax.random.key(i))
    hvp = jax.jit(lambda v: jax.jvp(jax.grad(lambda p: loss_fn(p, data)), (params,), (v,))[1])
    v, lam = jax.tree.map(jnp.ones_like, params), 0.0
    for _ in range(iters):
      hv = hvp(v)
      lam = float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(hv))))
      v = jax.tree.map(lambda a: a / lam, hv)
    out.append(lam)
  return float(np.mean(out))


@functools.cache
def gd_step(dims) -> float:
  """GD's step at ``dims``: the published step scaled by the initial sharpness at width 20 over
  that at ``dims`` (the published step diverges at width 32: the curvature grows with the
  widths, every entry being positive)."""
  return GD_LR if tuple(dims) == DIMS else GD_LR * sharpness(DIMS) / sharpness(dims)


# ------------------------------------------------------------------ learned optimizer
class UpdateLSTM(nnx.Module):
  """A learned optimizer: two LSTM cells on the flattened gradient, a linear map to the update.

  The published configuration reads the raw gradient and writes the update
  directly; from a random start its updates are of order one where the
  weights are, and in our runs it diverged at test (losses of 1e9-1e10 after
  300 meta-steps). Here the cells read the gradient's direction ``g / |g|_rms``
  and ``log |g|_rms`` (scale-free inputs, whatever the stage of training) and
  the update is ``lr * g + lr * |g|_rms * delta``: a step size and a
  correction, both read from the cells, the step size starting at ``lr_init``
  and the correction at zero. A new optimizer is GD; meta-training learns
  what to change.
  """

  def __init__(
    self, n: int, hidden: int = 300, seed: int = 0, lr_init: float = GD_LR, lr_range=LR_RANGE
  ):
    rngs = nnx.Rngs(seed)
    self.hidden = hidden
    self.lr_range = tuple(lr_range)
    self.cell1 = nnx.LSTMCell(n + 1, hidden, rngs=rngs)
    self.cell2 = nnx.LSTMCell(hidden, hidden, rngs=rngs)
    zeros = nnx.initializers.zeros
    self.out = nnx.Linear(hidden, n, kernel_init=zeros, rngs=rngs)
    cfg = L.PolicyConfig(lr_range=self.lr_range, lr_init=lr_init)
    self.lr_head = policy_lib._lr_head(cfg, hidden, rngs)

  def initial_carry(self):
    z = jnp.zeros((self.hidden,), jnp.float32)
    return ((z, z), (z, z))

  def __call__(self, flat_grad, carry):
    rms = jnp.sqrt(jnp.mean(jnp.square(flat_grad)) + 1e-30)
    x = jnp.concatenate([flat_grad / rms, jnp.log(rms)[None] / 20.0]).astype(jnp.float32)
    c1, h = self.cell1(carry[0], x)
    c2, h = self.cell2(carry[1], h)
    lr = policy_lib._lr(self.lr_head(h)[0], self.lr_range)
    step = lr * (flat_grad + rms * self.out(h))
    return jnp.clip(step, -1e7, 1e7), (c1, c2)


class UpdateAndTeleport(nnx.Module):
  """A learned optimizer and a teleport policy, meta-trained together."""

  def __init__(self, update: UpdateLSTM, teleport: nnx.Module | None):
    self.update = update
    self.teleport = teleport

  def initial_carry(self):
    tele = () if self.teleport is None else self.teleport.initial_carry()
    return (self.update.initial_carry(), tele)


def learned_update(module: UpdateLSTM) -> optax.GradientTransformation:
  """``module`` as an optax optimizer (its recurrent state is the optimizer state)."""
  graphdef, weights = nnx.split(module)

  def init(params):
    del params
    return module.initial_carry()

  def update(grads, carry, params=None):
    del params
    flat, unravel = flatten_util.ravel_pytree(grads)
    step, carry = nnx.merge(graphdef, weights)(flat, carry)
    return jax.tree.map(jnp.negative, unravel(step)), carry

  return optax.GradientTransformation(init, update)


def update_step(fam: L.TaskFamily) -> Callable:
  """``meta_train``'s ``step`` for :class:`UpdateAndTeleport`: teleport, then the learned update."""

  def make(module: UpdateAndTeleport):
    def step(state, data):
      params, (ucarry, tcarry) = state
      loss, grads = jax.value_and_grad(fam.loss)(params, data)
      if module.teleport is not None:
        mv = L.learned_move(module.teleport, fam.symmetry, params, grads, loss, tcarry, data)
        params, grads, tcarry = mv.params, mv.grads, mv.proposal.carry
      flat, unravel = flatten_util.ravel_pytree(grads)
      step, ucarry = module.update(flat, ucarry)
      new = jax.tree.map(lambda w, u: w - u, params, unravel(step))
      return (new, (ucarry, tcarry)), loss

    return step

  return make


class MomentumTeleport(nnx.Module):
  """A teleport and step-size policy on heavy-ball momentum; the buffer moves with every teleport.

  The momentum variant (Zamir, Dokania, Zhao and Yu, 2025): the buffer is a
  running sum of gradients, a cotangent, so a teleport carries it to the new
  point as it carries the gradient (``D phi_g^{-T} m``); the optax
  transformation at test does the same through ``state_policy="transport"``.
  """

  def __init__(self, policy: nnx.Module, params: chex.ArrayTree):
    self.policy = policy
    self.shapes = tuple(tuple(int(k) for k in jnp.shape(a)) for a in jax.tree.leaves(params))
    self.dtypes = tuple(str(jnp.asarray(a).dtype) for a in jax.tree.leaves(params))
    self.treedef = jax.tree.structure(params)

  def initial_carry(self):
    zeros = [jnp.zeros(s, d) for s, d in zip(self.shapes, self.dtypes)]
    return (self.policy.initial_carry(), jax.tree.unflatten(self.treedef, zeros))


def momentum_step(fam: L.TaskFamily, beta: float = BETA) -> Callable:
  """``meta_train``'s ``step`` for :class:`MomentumTeleport`: teleport (carrying the buffer),
  then heavy-ball momentum at the policy's step size."""

  def make(module: MomentumTeleport):
    def step(state, data):
      params, (pcarry, m) = state
      loss, grads = jax.value_and_grad(fam.loss)(params, data)
      mv = L.learned_move(module.policy, fam.symmetry, params, grads, loss, pcarry, data)
      m = state_transport.transport_cotangent(
        m, params, mv.params, mv.element, symmetry=fam.symmetry, data=data
      )
      m = jax.tree.map(lambda a, g: beta * a + g, m, mv.grads)
      new = jax.tree.map(lambda w, a: w - mv.proposal.lr * a, mv.params, m)
      return (new, (mv.proposal.carry, m)), loss

    return step

  return make


# ------------------------------------------------------------------ meta-training
def _policy(
  kind: str, fam: L.TaskFamily, lr: bool = True, seed: int = 0, lr_scale: float = 1.0
) -> nnx.Module:
  """A new policy; ``lr_scale`` scales its step-size range and start (``1 - beta`` under
  momentum, whose steps add up to ``1 / (1 - beta)`` times the gradient's)."""
  params, _ = fam.sample(jax.random.key(0))
  cfg = L.PolicyConfig(
    kind=kind,
    hidden=20 if kind == "lstm" else 32,
    # the published LSTM writes every move at the published magnitude; the equivariant
    # policy learns its own, up to MAX_RMS, from a small start
    max_rms=PUBLISHED_RMS if kind == "lstm" else MAX_RMS,
    move_init=MOVE_INIT,
    lr_range=(LR_RANGE[0] * lr_scale, LR_RANGE[1] * lr_scale) if lr else None,
    lr_init=GD_LR * lr_scale if lr else None,  # a new policy starts as the published GD
    seed=seed,
  )
  return L.make_policy(cfg, fam.symmetry, params)


def _jobs(size: dict, fam: L.TaskFamily, seed: int) -> dict:
  """``{method: (module, MetaConfig, step)}``: what each learned method meta-trains, at ``seed``."""
  n = sum(int(np.prod(jnp.shape(a))) for a in jax.tree.leaves(fam.sample(jax.random.key(0))[0]))
  lr_cfg = dict(tasks=size["tasks"], unroll=10, horizon=300, meta_steps=size["lr_steps"], seed=seed)
  up_cfg = dict(
    tasks=size["tasks"], unroll=10, horizon=100, meta_steps=size["update_steps"], seed=seed
  )
  if size["lr_steps"] < 30:  # smoke sizes: short horizons
    lr_cfg["horizon"] = up_cfg["horizon"] = 10
  lr_meta = dict(meta_lr=3e-3, meta_lr_final=3e-4)
  up_meta = dict(meta_lr=1e-3, meta_lr_final=1e-4)
  return {
    "lr": (
      _policy("equivariant", fam, seed=seed),
      L.MetaConfig(**lr_cfg, **lr_meta, teleport=False),
      None,
    ),
    "lr_tele": (_policy("equivariant", fam, seed=seed), L.MetaConfig(**lr_cfg, **lr_meta), None),
    "lr_tele_lstm": (_policy("lstm", fam, seed=seed), L.MetaConfig(**lr_cfg, **lr_meta), None),
    "lr_tele_momentum": (
      MomentumTeleport(
        _policy("equivariant", fam, seed=seed, lr_scale=1 - BETA), fam.sample(jax.random.key(0))[0]
      ),
      L.MetaConfig(**lr_cfg, **lr_meta),
      momentum_step(fam),
    ),
    "update": (
      UpdateAndTeleport(UpdateLSTM(n, seed=seed), None),
      L.MetaConfig(**up_cfg, **up_meta),
      update_step(fam),
    ),
    "update_tele": (
      UpdateAndTeleport(UpdateLSTM(n, seed=seed), _policy("equivariant", fam, lr=False, seed=seed)),
      L.MetaConfig(**up_cfg, **up_meta),
      update_step(fam),
    ),
  }


class Trained(NamedTuple):
  """A learned method's meta-training: the chosen run, and every seed's validation score.

  Attributes:
    policy: the chosen module.
    seconds: meta-training time of every seed together (the cost of the choice included).
    losses: the chosen run's meta-losses.
    validation: per meta-training seed, the median over validation tasks of the
      mean log loss of a whole run (the meta-objective over the full horizon);
      zeros where there is one seed (nothing to choose).
    chosen: the seed with the lowest validation score.
  """

  policy: nnx.Module
  seconds: float
  losses: np.ndarray
  validation: list
  chosen: int


def validation_score(method: str, module: nnx.Module, size: dict) -> float:
  """Median over the validation tasks of the mean ``log`` loss of a whole training run."""
  epochs = size["update_epochs"] if method in UPDATE_METHODS else size["epochs"]
  opt, wrapped = optimizer(method, {method: Trained(module, 0.0, np.zeros(0), [], 0)})
  run = jax.jit(train_loop(opt, wrapped, epochs))
  sample = sampler(DIMS)
  scores = []
  for i in range(size["validation"]):
    losses = np.asarray(run(*sample(jax.random.key(VALIDATION_KEY + i)))[0], np.float64)
    scores.append(float(np.mean(np.log(losses))) if np.all(np.isfinite(losses)) else np.inf)
  return float(np.median(scores))


def meta_train_all(size: dict, progress=None) -> dict:
  """Meta-trains every learned method on width-20 tasks at ``size["meta_seeds"]`` seeds and
  keeps, per method, the run with the best validation score; ``{method: Trained}``.

  Meta-training outcomes vary from seed to seed as much as methods differ, so one
  run per method would rank the seeds, not the methods; the choice uses
  validation tasks, never the test tasks.
  """
  fam = family(DIMS)
  runs: dict = {}
  for seed in range(size["meta_seeds"]):
    for name, (module, cfg, step) in _jobs(size, fam, seed).items():
      res = L.meta_train(module, fam, cfg, step=step)
      # one seed: nothing to choose, no validation runs
      score = validation_score(name, res.policy, size) if size["meta_seeds"] > 1 else 0.0
      runs.setdefault(name, []).append((res, score))
    if progress is not None:
      progress.update()
  out = {}
  for name, rs in runs.items():
    scores = [v for _, v in rs]
    best = int(np.argmin(scores))
    res = rs[best][0]
    out[name] = Trained(
      res.policy, sum(r.seconds for r, _ in rs), np.asarray(res.losses), scores, best
    )
  return out


# ------------------------------------------------------------------ evaluation
def optimizer(method: str, trained: dict) -> tuple[optax.GradientTransformation, bool]:
  """``(optimizer, wrapped)``: the test-time optimizer of ``method``; ``wrapped`` if it is a
  :func:`~teleport_jax.learned.learned_teleport` (its state has the guard's counters)."""
  fam = family(WIDE if method.endswith("width32") else DIMS)
  if method == "gd_momentum":  # heavy-ball at GD's effective step, lr / (1 - beta)
    return optax.sgd(GD_LR * (1 - BETA), momentum=BETA), False
  if method.startswith("gd"):
    return optax.sgd(gd_step(WIDE) if method.endswith("width32") else GD_LR), False
  if method == "lr_tele_momentum":
    policy = trained[method].policy.policy
    return L.learned_teleport(optax.sgd(1.0, momentum=BETA), fam.symmetry, policy), True
  if method in UPDATE_METHODS:
    module = trained[method].policy
    opt = learned_update(module.update)
    if module.teleport is None:
      return opt, False
    return L.learned_teleport(opt, fam.symmetry, module.teleport), True
  policy = trained[method.removesuffix("_width32")].policy
  if method == "lr":  # the step size alone: the policy moves nothing
    return learned_step_size(fam.symmetry, policy), False
  return L.learned_teleport(optax.sgd(1.0), fam.symmetry, policy), True


def train_loop(opt: optax.GradientTransformation, wrapped: bool, epochs: int) -> Callable:
  """``run(params, data) -> (losses (epochs,), max drift, rejected, nonfinite)``, one ``lax.scan``."""

  def value_fn(p, x, y):
    return loss_fn(p, (x, y))

  def run(params, data):
    x, y = data

    def step(carry, _):
      p, s = carry
      v, g = jax.value_and_grad(loss_fn)(p, data)
      if wrapped:
        u, s = opt.update(g, s, p, value=v, value_fn=value_fn, x=x, y=y)
      elif isinstance(opt, optax.GradientTransformationExtraArgs):
        u, s = opt.update(g, s, p, value=v, data=data)
      else:
        u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), v

    (p, s), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=epochs)
    drift = s.max_rel_loss_drift if wrapped else jnp.float32(0)
    rejected = s.num_rejected if wrapped else jnp.int32(0)
    return losses, drift, rejected

  return run


def evaluate(method: str, trained: dict, size: dict) -> dict:
  """Trains the test tasks with ``method``; losses per epoch, times, the guard's record."""
  dims = WIDE if method.endswith("width32") else DIMS
  epochs = size["update_epochs"] if method in UPDATE_METHODS else size["epochs"]
  opt, wrapped = optimizer(method, trained)
  run = jax.jit(train_loop(opt, wrapped, epochs))
  sample = sampler(dims)
  tasks = [sample(jax.random.key(TEST_KEY + i)) for i in range(size["seeds"])]
  t0 = time.perf_counter()
  compiled = run.lower(*tasks[0]).compile()
  compile_s = time.perf_counter() - t0
  losses, seconds, drift, rejected = [], [], 0.0, 0
  for params, data in tasks:
    out = jax.block_until_ready(compiled(params, data))
    times = []
    for _ in range(size["repeats"]):
      t = time.perf_counter()
      jax.block_until_ready(compiled(params, data))
      times.append(time.perf_counter() - t)
    total = statistics.median(times)
    losses.append(np.asarray(out[0], np.float64))
    seconds.append(total * np.arange(1, epochs + 1) / epochs)
    drift = max(drift, float(out[1]))
    rejected += int(out[2])
  return dict(
    loss=np.stack(losses),
    time_s=np.stack(seconds),
    max_rel_loss_drift=drift,
    rejected=rejected,
    compile_s=compile_s,
    dims=list(dims),
  )


def learned_step_size(symmetry, policy: nnx.Module) -> optax.GradientTransformation:
  """``lr``'s optimizer: SGD at the policy's proposed step size; the policy moves nothing.

  Its update takes the loss as ``value=`` and, for data-dependent groups, the batch
  as ``data=``; other keyword arguments (a ``value_fn``, the batch by name) are ignored.
  """
  graphdef, weights = nnx.split(policy)

  def init(params):
    del params
    return policy.initial_carry()

  def update(grads, carry, params=None, *, value, data=None, **extra):
    del extra
    feats = L.algebra_features(symmetry, params, grads, value, data)
    prop = nnx.merge(graphdef, weights)(L.PolicyInputs(feats, grads), carry)
    return jax.tree.map(lambda g: -prop.lr * g, grads), prop.carry

  return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------ the experiment
def _sizes(config: common.RunConfig) -> dict:
  return SIZES[config.mode or ("quick" if config.quick else "full")]


def num_units(config: common.RunConfig) -> int:
  return _sizes(config)["meta_seeds"] + len(METHODS)


def at(run: dict, epoch: int) -> np.ndarray:
  """The loss of every test seed at ``epoch`` (0-based: before that epoch's step)."""
  return run["loss"][:, epoch]


def time_to(run: dict, targets: np.ndarray) -> list[float | None]:
  """Per seed, the seconds until the loss is first at or below that seed's target."""
  out = []
  for loss, secs, target in zip(run["loss"], run["time_s"], targets):
    hit = np.flatnonzero(loss <= target)
    out.append(float(secs[hit[0]]) if hit.size else None)
  return out


def run(config: common.RunConfig, progress=None) -> dict:
  """Meta-trains the policies, evaluates every method on the test tasks, plots, judges."""
  progress = progress or common.NullProgress()
  size = _sizes(config)
  t0 = time.perf_counter()
  trained = meta_train_all(size, progress)
  meta_s = time.perf_counter() - t0
  runs = {}
  for m in METHODS:
    runs[m] = evaluate(m, trained, size)
    progress.update()
  e100 = min(100, size["update_epochs"] - 1, size["epochs"] - 1)
  gd_final = at(runs["gd"], size["epochs"] - 1)
  to_gd = time_to(runs["lr_tele"], gd_final)
  gd_total = runs["gd"]["time_s"][:, -1]
  ratios = [None if t is None else t / g for t, g in zip(to_gd, gd_total)]
  reached = [r for r in ratios if r is not None]
  median_ratio = statistics.median(reached) if len(reached) * 2 > len(ratios) else None
  below = lambda a, b: bool(np.all(at(runs[a], e100) < at(runs[b], e100)))  # noqa: E731
  nonfinite = any(not np.all(np.isfinite(r["loss"])) for r in runs.values())
  drift = max(r["max_rel_loss_drift"] for r in runs.values())
  table = [
    dict(
      method=m,
      epochs=r["loss"].shape[1],
      loss_epoch_0=float(np.median(at(r, 0))),
      loss_epoch_100=float(np.median(at(r, min(e100, r["loss"].shape[1] - 1)))),
      final_loss=float(np.median(r["loss"][:, -1])),
      us_per_epoch=1e6 * float(np.median(r["time_s"][:, -1])) / r["loss"].shape[1],
      meta_train_s=_meta_seconds(m, trained),
      compile_s=r["compile_s"],
      max_rel_loss_drift=r["max_rel_loss_drift"],
      rejected=r["rejected"],
    )
    for m, r in runs.items()
  ]
  _plot(runs, config)
  return dict(
    protocol=_protocol(size),
    table=table,
    runs={
      m: dict(
        loss=r["loss"].tolist(),
        time_s=r["time_s"].tolist(),
        max_rel_loss_drift=r["max_rel_loss_drift"],
        rejected=r["rejected"],
        dims=r["dims"],
      )
      for m, r in runs.items()
    },
    meta_train_s=meta_s,
    meta_train_s_per_method={m: res.seconds for m, res in trained.items()},
    meta_losses={m: np.asarray(res.losses).tolist() for m, res in trained.items()},
    meta_seeds={
      m: dict(validation_mean_log_loss=res.validation, chosen=res.chosen)
      for m, res in trained.items()
    },
    lr_tele_time_to_gd_final_ratio=ratios,
    notes=_notes(runs, e100, ratios, meta_s, drift),
    targets={
      f"update_tele_below_update_at_epoch_{e100}": below("update_tele", "update"),
      f"lr_tele_below_gd_at_epoch_{e100}": below("lr_tele", "gd"),
      f"lr_tele_below_lr_at_epoch_{e100}": below("lr_tele", "lr"),
      f"lr_tele_width32_below_gd_width32_at_epoch_{e100}": below("lr_tele_width32", "gd_width32"),
      f"lr_tele_momentum_below_gd_momentum_at_epoch_{e100}": below(
        "lr_tele_momentum", "gd_momentum"
      ),
      f"lr_tele_momentum_below_lr_tele_at_epoch_{e100}": below("lr_tele_momentum", "lr_tele"),
      "lr_tele_reaches_gd_final_in_0.3x_time": median_ratio is not None and median_ratio <= 0.3,
      "lr_tele_time_to_gd_final_ratio": median_ratio,
      "every_learned_teleport_within_rtol": drift <= common.RTOL_FLOAT32,
      "nothing_nonfinite": not nonfinite,
      "meta_train_s": meta_s,
    },
  )


def _meta_seconds(method: str, trained: dict) -> float | None:
  res = trained.get(method.removesuffix("_width32"))
  return None if res is None else res.seconds


def _protocol(size: dict) -> dict:
  return dict(
    problem=f"MLP regression dims {list(DIMS)} (published convention: samples, input features, "
    "hidden, outputs), LeakyReLU(0.1), 1/2 |Y - sigma(X W1) W2|^2, entries uniform on [0, 1)",
    symmetry="exact data-dependent GL(20) of the hidden layer (DataDependentGL, Cayley elements)",
    gd=f"step {GD_LR:g}; at width 32 {gd_step(WIDE):.3g}: the published step divided by the "
    "growth of the initial sharpness (the published step diverges there)",
    learned_step_size=f"in [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] (the published clamp)",
    teleport_magnitude=f"root mean square <= {MAX_RMS:g} per element for the equivariant "
    f"policy, starting at {MOVE_INIT:g} of it; the LSTM policy's is the published Frobenius 0.01 "
    f"(RMS {PUBLISHED_RMS:g})",
    meta_training=f"{size['tasks']} tasks per meta-step (staggered ages), unroll 10; "
    f"step-size/teleport policies {size['lr_steps']} meta-steps (horizon 300), learned "
    f"optimizers {size['update_steps']} (horizon 100); Adam (cosine decay to a tenth, "
    "global-norm clip 1) on the mean log loss, every task's meta-gradient normalised; "
    f"{size['meta_seeds']} meta-training seed(s) per method, the one with the lowest mean log "
    f"loss over {size['validation']} validation tasks (never the test tasks) kept",
    test=f"{size['seeds']} tasks never seen in meta-training; {size['epochs']} epochs "
    f"({size['update_epochs']} for the learned optimizers); time: median of {size['repeats']} "
    "runs of the compiled loop",
    guard=f"learned_teleport, rtol {common.RTOL_FLOAT32:g}",
  )


def _notes(runs, e100, ratios, meta_s, drift) -> list[str]:
  def med(m, e):
    return float(np.median(at(runs[m], min(e, runs[m]["loss"].shape[1] - 1))))

  shown = ", ".join(f"{m} {med(m, e100):.3g}" for m in runs)
  per_step = {
    m: 1e6 * float(np.median(r["time_s"][:, -1])) / r["loss"].shape[1] for m, r in runs.items()
  }
  return [
    f"median loss at epoch {e100} over the test tasks: {shown}",
    "lr_tele's time to gd's final loss / gd's time, per test task: "
    + ", ".join("not reached" if r is None else f"{r:.2f}" for r in ratios),
    "microseconds per epoch (compiled loop, policy included): "
    + ", ".join(f"{m} {v:.0f}" for m, v in per_step.items()),
    f"meta-training: {meta_s:.0f} s in all (compilation included); the largest relative loss "
    f"change of an accepted learned teleport: {drift:.2g}",
  ]


@plotting.styled
def _plot(runs: dict, config: common.RunConfig) -> None:
  fig, axes = plotting.panels(
    2,
    xlabel=["epoch", "seconds"],
    ylabel="training loss",
    panel_size=(5.6, 4.0),
    suptitle="learned teleports, MLP regression [20, 20, 20, 20] (median over test tasks; "
    "dashed: width 32)",
  )
  for m, r in runs.items():
    loss = np.median(r["loss"], axis=0)
    secs = np.median(r["time_s"], axis=0)
    ls = "--" if m.endswith("width32") else "-"
    color = plotting.color(m)
    axes[0].plot(np.arange(loss.size), loss, ls=ls, color=color, label=m)
    axes[1].plot(secs, loss, ls=ls, color=color, label=m)
  for ax in axes:
    ax.set_yscale("log")
  axes[1].set_xscale("log")
  plotting.legend(fig, ncol=4)
  plotting.savefig(fig, config.out_dir / "learned_teleports.png")
