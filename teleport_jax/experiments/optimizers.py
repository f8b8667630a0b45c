"""Teleportation with every common optimizer, and what to do with its state.

SGD, SGD with momentum 0.9, AdaGrad, RMSProp and Adam, each with and without
teleport, on two problems:

* ``regression``: the published MLP regression problem of
  :mod:`teleport_jax.experiments.regression` (full batch, exact
  :class:`teleport_jax.DataDependentGL`, teleport at epoch 5, 30 inner steps,
  as there).
* ``classification``: the digits/MNIST MLP of
  :mod:`teleport_jax.experiments.classification` (minibatches, exact
  :class:`teleport_jax.PositiveRescaling`, teleports at the first step of each of
  the first 3 epochs, 10 inner steps, as its ``sgd_teleport_lookahead``).

Objective: ``with_teleport``'s default, :func:`teleport_jax.objectives.optimizer_lookahead`
(the loss after 5 steps of the wrapped optimizer, from the optimizer state the
``state_policy`` gives the candidate point). Each optimizer's teleport then
looks for the point from which *that* optimizer, with its learning rate and
state, decreases the loss most. (An earlier version simulated plain GD steps
of one step size for every optimizer, so that the teleport target did not
depend on the optimizer; that target is not what the library does by default,
and for AdaGrad on the regression problem it is worse, see
:mod:`teleport_jax.experiments.regression`.) Stability: off for the single
regression teleport, on for the three classification teleports (the default
of ``with_teleport`` for schedules that fire more than once).

For the stateful optimizers (momentum, AdaGrad, RMSProp, Adam) the teleport is
run with each ``state_policy`` of :func:`teleport_jax.with_teleport`: ``keep``
(state unchanged), ``reset`` (re-initialised at the teleported point) and
``transport`` (moved with the group element by
:func:`teleport_jax.transport_state`: momentum/first moments exactly as
cotangents; second moments exactly by the squared factor under rescaling, kept
under the GL action). The measure is the final training loss, mean and standard
deviation over seeds.

Measured (tables in docs/results.md): no policy wins everywhere. On the
regression problem, momentum ends within the spread over seeds under every
policy; ``transport`` is exact (the transported momentum equals the gradient at
the teleported point, see the tests) but, 5 steps from the published
initialisation, that momentum is dominated by the first, huge gradients, which
the teleport stretches, so it does not end lower than ``keep``.

Learning rates (``LEARNING_RATES``) were tuned once per optimizer *without*
teleport (:func:`tune` reproduces the search): on a grid of half-decades
(``GRID``), full-length runs on two held-out seeds (100, 101), the rate with the
lowest mean final training loss among those whose next larger grid rate also
stayed finite on both seeds (one half-decade of margin: a teleport moves to
steeper points, and the rate at the edge of divergence is the one the
teleport would push over). SGD keeps the published rates (1e-4 regression, 0.1 classification).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax.experiments import classification
from teleport_jax.experiments import common
from teleport_jax.experiments import data as data_lib
from teleport_jax.experiments import plotting
from teleport_jax.experiments import regression

PROBLEMS = ("regression", "classification")
OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adam")
QUICK_OPTIMIZERS = ("sgd", "adam")  # ``--quick``: compile time dominates, so two optimizers
STATEFUL = ("momentum", "adagrad", "rmsprop", "adam")
POLICIES = ("keep", "reset", "transport")
# measured with :func:`tune` (see the module docstring)
LEARNING_RATES = {
  "regression": dict(sgd=1e-4, momentum=3e-4, adagrad=1e-1, rmsprop=1e-2, adam=3e-2),
  "classification": dict(sgd=0.1, momentum=0.03, adagrad=0.1, rmsprop=1e-2, adam=1e-2),
}
# XLA options of every training run here: compilation, not running, is what these
# tiny problems spend their time on; level 0 compiles about twice as fast
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# Adam's sqrt(nu) has an infinite derivative where nu = 0: the teleport's objective
# differentiates through Adam's steps, and on the digits some input pixels are 0 in every
# image (their kernel gradients are exactly 0), so without eps_root every inner step is
# non-finite and no teleport moves. 1e-16 changes Adam's steps by far less than its eps;
# it is used for every Adam run, with and without teleport.
ADAM_EPS_ROOT = 1e-16
LOOKAHEAD_STEPS = 5
NUM_STEPS = {"regression": 30, "classification": 10}
# classification: teleport at the first step of each of the first this many epochs
CLASSIFICATION_TELEPORT_EPOCHS = 3
GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def make_base(name: str, lr: float) -> optax.GradientTransformation:
  """The plain optax optimizer ``name`` with step size ``lr``."""
  if name == "sgd":
    return optax.sgd(lr)
  if name == "momentum":
    return optax.sgd(lr, momentum=0.9)
  if name == "adagrad":
    return optax.adagrad(lr)
  if name == "rmsprop":
    return optax.rmsprop(lr)
  if name == "adam":
    return optax.adam(lr, eps_root=ADAM_EPS_ROOT)
  raise ValueError(f"Unknown optimizer {name!r}.")


def variants(names=None) -> list[tuple[str, str]]:
  """``(optimizer, variant)`` pairs; variant ``"none"`` (no teleport) or a state policy."""
  out = []
  for name in OPTIMIZERS if names is None else names:
    out.append((name, "none"))
    for policy in POLICIES if name in STATEFUL else ("keep",):
      out.append((name, policy))
  return out


def _sizes(config: common.RunConfig) -> dict:
  if config.quick:
    return dict(regression=(range(2), 100), classification=((0, 1), 10))
  return dict(regression=(range(5), 300), classification=((0, 1, 2), 20))


def _names(config: common.RunConfig) -> tuple[str, ...]:
  if config.quick:
    return tuple(n for n in OPTIMIZERS if n in QUICK_OPTIMIZERS) or OPTIMIZERS
  return OPTIMIZERS


def num_units(config: common.RunConfig) -> int:
  return len(PROBLEMS) * len(variants(_names(config)))


# ------------------------------------------------------------------ problems
def _regression_trainer(opt, epochs: int):
  """``run(params, x, y) -> (losses (epochs,), teleports, rejected, max_rel_loss_drift)``."""
  opt = optax.with_extra_args_support(opt)
  loss_fn = regression.loss_fn

  def run(params, x, y):
    def step(carry, _):
      p, s = carry
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = opt.update(grads, s, p, value_fn=loss_fn, x=x, y=y)
      return (optax.apply_updates(p, u), s), loss

    (_, s), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=epochs)
    return losses, *_teleport_stats(s, params)

  return jax.jit(run)


def _teleport_stats(state, params):
  """``(accepted teleports, rejected teleports, max relative loss drift of the accepted)``."""
  if isinstance(state, tj.TeleportState):
    return state.num_teleports, state.num_rejected, state.max_rel_loss_drift
  zero = jnp.zeros((), jnp.int32)
  return zero, zero, jnp.zeros((), jax.tree_util.tree_leaves(params)[0].dtype)


def _classification_trainer(opt, epochs: int, batch_size: int, steps: int):
  """``run(params, x, y, x_val, y_val, key) -> (train losses (epochs+1,), val loss, ...)``."""
  opt = optax.with_extra_args_support(opt)
  loss_fn = classification.loss_fn

  def run(params, x, y, x_val, y_val, key):
    def step(carry, batch):
      p, s = carry
      xb, yb = batch
      grads = jax.grad(loss_fn)(p, xb, yb)
      u, s = opt.update(grads, s, p, value_fn=loss_fn, x=xb, y=yb)
      return (optax.apply_updates(p, u), s), None

    def epoch(carry, k):
      perm = jax.random.permutation(k, x.shape[0])[: steps * batch_size]
      xb = x[perm].reshape(steps, batch_size, x.shape[1])
      yb = y[perm].reshape(steps, batch_size)
      carry, _ = jax.lax.scan(step, carry, (xb, yb))
      return carry, loss_fn(carry[0], x, y)

    (p, s), curve = jax.lax.scan(epoch, (params, opt.init(params)), jax.random.split(key, epochs))
    curve = jnp.concatenate([loss_fn(params, x, y)[None], curve])
    return curve, loss_fn(p, x_val, y_val), *_teleport_stats(s, params)

  return jax.jit(run)


def teleport_config(problem: str) -> tj.TeleportConfig:
  """The teleport settings on ``problem`` (the same for every optimizer and policy)."""
  return common.teleport_config(
    tj.objectives.optimizer_lookahead(LOOKAHEAD_STEPS), NUM_STEPS[problem]
  )


def stability(problem: str) -> bool:
  """``with_teleport``'s ``stability`` on ``problem``: on where the schedule repeats."""
  return problem == "classification"


def make_optimizer(problem: str, name: str, variant: str, lr: float | None = None, steps=1):
  """The optimizer of one run (``variant`` ``"none"`` or a state policy)."""
  lr = LEARNING_RATES[problem][name] if lr is None else lr
  base = make_base(name, lr)
  if variant == "none":
    return base
  if problem == "regression":
    symmetry, schedule = regression.symmetry(), [regression.TELEPORT_EPOCH]
  else:
    symmetry, schedule = (
      tj.PositiveRescaling(),
      tj.every(steps, start=0, stop=CLASSIFICATION_TELEPORT_EPOCHS * steps),
    )
  return tj.with_teleport(
    base,
    symmetry,
    schedule,
    config=teleport_config(problem),
    stability=stability(problem),
    state_policy=variant,
  )


def _classification_data(config):
  name = "mnist" if data_lib.find_mnist(config.data_dir) is not None else "sklearn_digits"
  s = classification.default_settings(config, name)
  ds = data_lib.load_classification_data(
    config.data_dir, max_train=s.max_train, max_val=s.max_val, seed=0
  )
  return ds, s


def run_problem(problem, config, progress=None, lrs=None, seeds=None, epochs=None, pairs=None):
  """Trains every ``(optimizer, variant)`` on ``problem``; returns per-run records."""
  progress = progress or common.NullProgress()
  sizes = _sizes(config)[problem]
  seeds = sizes[0] if seeds is None else seeds
  epochs = sizes[1] if epochs is None else epochs
  lrs = LEARNING_RATES[problem] if lrs is None else lrs
  if problem == "classification":
    ds, s = _classification_data(config)
    n = len(ds.y_train)
    batch_size = min(s.batch_size, n)
    steps = n // batch_size
    widths = (ds.num_features, s.hidden, s.hidden, ds.num_classes)
    arrays = tuple(
      jnp.asarray(a, t)
      for a, t in (
        (ds.x_train, jnp.float32), (ds.y_train, jnp.int32),
        (ds.x_val, jnp.float32), (ds.y_val, jnp.int32),
      )
    )  # fmt: skip
  out = {}
  for name, variant in pairs or variants():
    opt = make_optimizer(problem, name, variant, lrs[name], steps if problem != "regression" else 1)
    t0 = time.perf_counter()
    if problem == "regression":
      trainer = _regression_trainer(opt, epochs)
      inputs = [regression.make_problem(seed) for seed in seeds]
    else:
      trainer = _classification_trainer(opt, epochs, batch_size, steps)
      inputs = []
      for seed in seeds:
        k_init, k_data = jax.random.split(jax.random.key(seed))
        inputs.append((classification.init_params(k_init, widths), *arrays, k_data))
    curves, finals_val, teleports, rejected, drifts = [], [], [], [], []
    # compile time dominates these runs: a lower XLA optimisation level halves it
    trainer = trainer.lower(*inputs[0]).compile(compiler_options=COMPILER_OPTIONS)
    for args in inputs:
      res = jax.device_get(trainer(*args))
      curves.append(np.asarray(res[0], np.float64))
      if problem == "classification":
        finals_val.append(float(res[1]))
      teleports.append(int(res[-3]))
      rejected.append(int(res[-2]))
      drifts.append(float(res[-1]))
    out[(name, variant)] = dict(
      losses=np.stack(curves),
      val_loss=np.asarray(finals_val),
      num_teleports=teleports,
      num_rejected=rejected,
      max_rel_loss_drift=float(np.max(drifts)),
      seconds=time.perf_counter() - t0,
      lr=lrs[name],
    )
    progress.update(1)
  return out


# ------------------------------------------------------------------- tuning
def pick_learning_rate(losses: dict[float, float]) -> float:
  """The tuning rule: lowest loss among rates whose next larger rate stays finite."""
  rates = sorted(losses)
  ok = [r for r, nxt in zip(rates[:-1], rates[1:]) if np.isfinite(losses[nxt])]
  ok = [r for r in ok if np.isfinite(losses[r])]
  if not ok:
    raise ValueError(f"losses: no rate with a finite larger neighbour in {losses}.")
  return min(ok, key=losses.get)


def tune(problem: str, config: common.RunConfig | None = None, seeds=(100, 101), grid=GRID):
  """The learning-rate search behind ``LEARNING_RATES`` (no teleport).

  Returns:
    ``{optimizer: {lr: mean final loss (inf if any seed diverged)}}``; apply
    :func:`pick_learning_rate` to each entry.
  """
  config = config or common.RunConfig()
  table = {}
  for name in OPTIMIZERS:
    table[name] = {}
    for lr in grid:
      rec = run_problem(problem, config, lrs={name: lr}, seeds=seeds, pairs=[(name, "none")])[
        (name, "none")
      ]
      final = rec["losses"][:, -1]
      table[name][lr] = float(np.mean(final)) if np.all(np.isfinite(final)) else float("inf")
  return table


# ------------------------------------------------------------------ summary
def _final(rec):
  return rec["losses"][:, -1]


def _fmt_pm(values) -> str:
  v = np.asarray(values, np.float64)
  if not np.all(np.isfinite(v)):
    return f"nan ({int(np.sum(~np.isfinite(v)))} non-finite)"
  return f"{v.mean():.4g} ± {v.std():.2g}"


def _summarise(problem, results, seeds, epochs):
  runs, table = {}, []
  for (name, variant), rec in results.items():
    mean, std = common.mean_std(rec["losses"])
    final = _final(rec)
    key = name if variant == "none" else f"{name}_teleport_{variant}"
    entry = dict(
      optimizer=name,
      variant=variant,
      learning_rate=rec["lr"],
      loss_mean=common.finite_list(mean),
      loss_std=common.finite_list(std),
      final_loss=common.finite_list(final),
      final_loss_mean=float(np.mean(final)),
      final_loss_std=float(np.std(final)),
      nonfinite_runs=int(np.sum(~np.all(np.isfinite(rec["losses"]), axis=1))),
      seconds=rec["seconds"],
      n_seeds=len(seeds),
      epochs=epochs,
    )
    if problem == "classification":
      entry["final_val_loss_mean"] = float(np.mean(rec["val_loss"]))
      entry["final_val_loss"] = common.finite_list(rec["val_loss"])
    if problem == "regression":
      e = min(regression.EPOCH_OF_INTEREST, epochs - 1)
      entry["loss_at_epoch_per_seed"] = {str(e): common.finite_list(rec["losses"][:, e])}
    if variant != "none":
      entry.update(
        num_teleports=rec["num_teleports"],
        num_rejected=rec["num_rejected"],
        max_rel_loss_drift=rec["max_rel_loss_drift"],
      )
    runs[key] = entry
    row = {
      "problem": problem,
      "optimizer": name,
      "teleport": "-" if variant == "none" else variant,
      "lr": rec["lr"],
    }
    if problem == "regression":
      e = min(regression.EPOCH_OF_INTEREST, epochs - 1)
      row[f"loss@{e}"] = float(mean[e])
    row["final loss (mean ± std)"] = _fmt_pm(final)
    if problem == "classification":
      row["val loss"] = float(np.mean(rec["val_loss"]))
    row["max_rel_drift"] = rec["max_rel_loss_drift"] if variant != "none" else None
    table.append(row)
  policy_rows = []
  for name in STATEFUL:
    recs = {p: results.get((name, p)) for p in POLICIES}
    if any(r is None for r in recs.values()):
      continue
    means = {p: float(np.mean(_final(r))) for p, r in recs.items()}
    finite = {p: m for p, m in means.items() if np.isfinite(m)}
    best = min(finite, key=finite.get) if finite else None
    row = {"problem": problem, "optimizer": name}
    row.update({p: _fmt_pm(_final(r)) for p, r in recs.items()})
    base = results.get((name, "none"))
    if base is not None:
      row["no teleport"] = _fmt_pm(_final(base))
    row["best policy"] = best
    policy_rows.append(row)
  return runs, table, policy_rows


def run(config: common.RunConfig, progress=None) -> dict:
  """Runs both problems, writes the plots, returns the summary section."""
  sizes = _sizes(config)
  sections, table, policy_table, notes = {}, [], [], []
  for problem in PROBLEMS:
    seeds, epochs = sizes[problem]
    results = run_problem(problem, config, progress, pairs=variants(_names(config)))
    runs, rows, prow = _summarise(problem, results, seeds, epochs)
    _plot(problem, results, config)
    sections[problem] = dict(runs=runs, seeds=list(seeds), epochs=epochs)
    table += rows
    policy_table += prow
  teleported = [r for s in sections.values() for r in s["runs"].values() if r["variant"] != "none"]
  targets = {
    "every_teleport_within_rtol": all(
      r["max_rel_loss_drift"] <= common.RTOL_FLOAT32 for r in teleported
    ),
    "every_run_teleported": all(min(r["num_teleports"]) >= 1 for r in teleported),
    "no_nonfinite_run_without_teleport_or_with_keep": all(
      r["nonfinite_runs"] == 0
      for s in sections.values()
      for r in s["runs"].values()
      if r["variant"] in ("none", "keep")
    ),
  }
  for problem, s in sections.items():
    for key, r in s["runs"].items():
      if r["nonfinite_runs"]:
        notes.append(
          f"{problem}/{key}: {r['nonfinite_runs']} of {r['n_seeds']} runs reached a "
          "non-finite loss."
        )
  for problem, s in sections.items():
    for key, r in s["runs"].items():
      if sum(r.get("num_rejected", [0])):
        notes.append(
          f"{problem}/{key}: {sum(r['num_teleports'])} teleports moved, "
          f"{sum(r['num_rejected'])} did not (no improving step within rtol and the "
          "stability bound)."
        )
  for row in policy_table:
    finals = ", ".join(f"{p} {row[p]}" for p in POLICIES)
    notes.append(
      f"{row['problem']}/{row['optimizer']}: final loss {finals} -> lowest mean: "
      f"{row['best policy']}."
    )
  return dict(
    protocol=dict(
      learning_rates=LEARNING_RATES,
      learning_rate_tuning="once per optimizer without teleport (optimizers.tune): the "
      "lowest final loss on held-out seeds 100, 101 among the rates whose next larger "
      "half-decade also stayed finite",
      momentum=0.9,
      adam=f"optax.adam(lr, eps_root={ADAM_EPS_ROOT:g}): a finite derivative of sqrt(nu) at "
      "nu = 0 (pixels that are 0 in every image), which the teleport's objective needs",
      dtype="float32",
      compiler_options=COMPILER_OPTIONS,
      regression=dict(
        symmetry="DataDependentGL (exact)",
        seeds=sections["regression"]["seeds"],
        epochs=sections["regression"]["epochs"],
        teleport=common.describe_teleport(
          teleport_config("regression"),
          schedule=f"epoch {regression.TELEPORT_EPOCH}",
          stability=stability("regression"),
          state_policy="keep / reset / transport (one run each)",
        ),
      ),
      classification=dict(
        symmetry="PositiveRescaling (both hidden layers)",
        seeds=sections["classification"]["seeds"],
        epochs=sections["classification"]["epochs"],
        teleport=common.describe_teleport(
          teleport_config("classification"),
          schedule="first step of epochs 0, 1, 2 (its minibatch)",
          stability=stability("classification"),
          state_policy="keep / reset / transport (one run each)",
        ),
      ),
      objective_why="optimizer_lookahead simulates the optimizer that runs after the "
      "teleport, with its learning rate and the state the policy gives the new point",
    ),
    problems=sections,
    table=table,
    policy_table=policy_table,
    targets=targets,
    notes=notes,
  )


def teleport_epochs(problem: str, epochs: int) -> list[int]:
  """The points of a loss curve of ``problem`` at which the teleporting runs teleport.

  Regression: ``losses[e]`` is the loss before epoch ``e``'s step, whose update
  teleports at :data:`teleport_jax.experiments.regression.TELEPORT_EPOCH`.
  Classification: ``curve[e]`` is the loss after ``e`` epochs, and the teleports
  come at the first step of each of the first :data:`CLASSIFICATION_TELEPORT_EPOCHS`
  epochs, right after the points ``0, 1, ...``.
  """
  if problem == "regression":
    at = [regression.TELEPORT_EPOCH]
  else:
    at = list(range(CLASSIFICATION_TELEPORT_EPOCHS))
  return [e for e in at if e < epochs]


@plotting.styled
def _plot(problem, results, config) -> None:
  names = [n for n in OPTIMIZERS if any(k[0] == n for k in results)]
  n = len(next(iter(results.values()))["losses"])
  titles = []
  for name in names:
    bad = {
      variant: int(np.sum(~np.all(np.isfinite(rec["losses"]), axis=1)))
      for (opt, variant), rec in results.items()
      if opt == name
    }
    diverged = ", ".join(f"{v} {k} of {n}" for v, k in bad.items() if k)
    title = f"{name} (lr {LEARNING_RATES[problem][name]:g})"
    titles.append(title + (f"\ndiverged: {diverged}" if diverged else ""))
  fig, axes = plotting.panels(
    len(names),
    xlabel="epoch",
    ylabel="training loss",
    titles=titles,
    suptitle=f"{problem}: each optimizer with and without teleport (geometric mean over {n} "
    "seeds,\nband x/÷ geometric std; a curve stops where a seed diverges)",
  )
  linestyles = {"none": "-", "keep": "--", "reset": ":", "transport": "-."}
  for ax, name in zip(axes, names):
    starts = [r["losses"][:, 0] for k, r in results.items() if k[0] == name]
    top = 10 * float(np.nanmax(np.concatenate(starts)))  # a diverged run leaves the panel
    for (opt, variant), rec in results.items():
      if opt != name:
        continue
      center, lo, hi = common.log_band(rec["losses"])
      color = plotting.color(variant)
      label = "no teleport" if variant == "none" else f"teleport, state: {variant}"
      x = np.arange(len(center))
      ax.plot(x, center, color=color, ls=linestyles[variant], label=label)
      ax.fill_between(x, lo, hi, color=color, alpha=0.12, lw=0)
      if variant != "none":
        at = teleport_epochs(problem, len(center))
        plotting.mark_teleports(ax, x[at], center[at], color=color)
    ax.set_yscale("log")
    ax.set_ylim(top=top)
  plotting.legend(fig)
  plotting.savefig(fig, config.out_dir / f"optimizers_{problem}.png")
