"""MLP regression (seed Figure 2), on the published protocol.

X is 5x4 (5 features, 4 samples), W1 6x5, W2 7x6, W3 8x7, Y 8x4, all uniform on
[0, 1); loss 1/2 |Y - W3 s(W2 s(W1 X))|^2 with s = LeakyReLU(0.1). GD with
lr 1e-4 and AdaGrad with lr 1e-1 for 300 epochs, 5 seeds, teleport at epoch 5
with the exact data-dependent GL action.

Teleport settings (measured, see the README): maximising the gradient norm
with 10+ normalised steps reaches points so steep that GD with lr 1e-4
diverges; our teleports therefore minimise the loss after a few GD steps of
the optimizer's own step size (:func:`teleport_jax.lookahead_loss`), which
keeps the speed-up and never produces a non-finite loss.

The ``*_published`` methods run the published first-order action (``I - T``
in place of ``(I + T)^{-1}``) with the published hyper-parameters (8 plain
steps of size 1e-7 for GD, 2 of 1e-5 for AdaGrad, objective max |grad|^2) and
no loss check, so the per-teleport loss change it causes can be read next to
ours. ``gd_teleport_max_grad_norm`` is the exact action with the paper's
objective (10 normalised steps): it shows what maximising the gradient norm
does to GD with a fixed step size; ``gd_teleport_max_grad_norm_safe`` is the
same under :func:`teleport_jax.stability_constrained` (every inner step keeps
``lr * |lambda_max(H)| <= 2``).

``gd_teleport_every20`` teleports every 20 epochs (5, 25, ..., 285) with the
stability-constrained lookahead objective. Unconstrained, such a schedule is
fragile: later teleports, taken when GD already runs near the edge of
stability, can buy a 1-2 % lower lookahead loss with a point where
``lr * lambda_max`` is 20x the stability limit, which a 5-step lookahead
does not see (the unstable direction is barely excited yet) and GD then
diverges on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax.experiments import common

DIMS = (4, 5, 6, 7, 8)  # samples, then layer widths: X 5x4, W1 6x5, ..., Y 8x4
ACTIVATION = tj.leaky_relu(0.1)
GD_LR = 1e-4
ADAGRAD_LR = 1e-1
TELEPORT_EPOCH = 5
REPEATED_SCHEDULE = (5, 25, 45)
EVERY = 20  # period of gd_teleport_every20 (epochs 5, 25, 45, ...)
EPOCH_OF_INTEREST = 50

METHODS = (
  "gd",
  "gd_teleport",
  "adagrad",
  "adagrad_teleport",
  "gd_teleport_repeated",
  "gd_teleport_every20",
)
PUBLISHED = ("gd_teleport_published", "adagrad_teleport_published")
# Comparison: the exact action with the paper's objective (max |grad|^2), 10 normalised steps.
# ... and the same with the stability constraint (lr * |lambda_max(H)| <= 2 at every inner step).
ABLATIONS = ("gd_teleport_max_grad_norm", "gd_teleport_max_grad_norm_safe")
COMPARISONS = PUBLISHED + ABLATIONS


def make_problem(seed: int, dims=DIMS, dtype=jnp.float32):
  """Weights, inputs and targets of the published problem, uniform on [0, 1).

  Returns:
    ``(params, x, y)`` with ``params = [W1, W2, W3]`` (``W_m`` of shape
    ``(d_{m+1}, d_m)``), ``x`` of shape ``(dims[1], dims[0])`` and ``y`` of
    shape ``(dims[-1], dims[0])``.
  """
  n = dims[0]
  keys = jax.random.split(jax.random.key(seed), len(dims))
  params = [
    jax.random.uniform(keys[i], (dims[i + 2], dims[i + 1]), dtype) for i in range(len(dims) - 2)
  ]
  x = jax.random.uniform(keys[-2], (dims[1], n), dtype)
  y = jax.random.uniform(keys[-1], (dims[-1], n), dtype)
  return params, x, y


def loss_fn(params, x, y):
  """``1/2 |Y - W_L s(... s(W_1 X))|^2``."""
  h = x
  for w in params[:-1]:
    h = ACTIVATION(w @ h)
  return 0.5 * jnp.sum((y - params[-1] @ h) ** 2)


def symmetry(variant: str = "exact") -> tj.DataDependentGL:
  if variant == "published":
    return tj.PublishedDataDependentGL(activation=ACTIVATION)
  return tj.DataDependentGL(activation=ACTIVATION)


def make_optimizer(method: str) -> optax.GradientTransformation:
  """The optax optimizer of each method (see the module docstring)."""
  exact = symmetry("exact")
  ours = dict(num_steps=30, step_size=0.1)
  if method == "gd":
    return optax.sgd(GD_LR)
  if method == "adagrad":
    return optax.adagrad(ADAGRAD_LR)
  if method == "gd_teleport":
    return tj.with_teleport(
      optax.sgd(GD_LR), exact, [TELEPORT_EPOCH], objective=tj.lookahead_loss(GD_LR, 5), **ours
    )
  if method == "gd_teleport_repeated":
    return tj.with_teleport(
      optax.sgd(GD_LR),
      exact,
      list(REPEATED_SCHEDULE),
      objective=tj.lookahead_loss(GD_LR, 5),
      **ours,
    )
  if method == "adagrad_teleport":
    return tj.with_teleport(
      optax.adagrad(ADAGRAD_LR),
      exact,
      [TELEPORT_EPOCH],
      objective=tj.lookahead_loss(GD_LR, 5),
      **ours,
    )
  if method == "gd_teleport_every20":
    return tj.with_teleport(
      optax.sgd(GD_LR),
      exact,
      tj.every(EVERY, start=TELEPORT_EPOCH),
      objective=tj.stability_constrained(tj.lookahead_loss(GD_LR, 5), GD_LR),
      **ours,
    )
  if method in ("gd_teleport_max_grad_norm", "gd_teleport_max_grad_norm_safe"):
    objective = tj.grad_norm_sq()
    if method.endswith("_safe"):
      objective = tj.stability_constrained(objective, GD_LR)
    return tj.with_teleport(
      optax.sgd(GD_LR),
      exact,
      [TELEPORT_EPOCH],
      objective=objective,
      num_steps=10,
      step_size=0.1,
    )
  # the published first-order action is not loss-invariant: no symmetry check, no loss check
  published = dict(
    objective="max_grad_norm", normalize=False, safeguard=False, rtol=float("inf"), check=False
  )
  if method == "gd_teleport_published":
    return tj.with_teleport(
      optax.sgd(GD_LR),
      symmetry("published"),
      [TELEPORT_EPOCH],
      num_steps=8,
      step_size=1e-7,
      **published,
    )
  if method == "adagrad_teleport_published":
    return tj.with_teleport(
      optax.adagrad(ADAGRAD_LR),
      symmetry("published"),
      [TELEPORT_EPOCH],
      num_steps=2,
      step_size=1e-5,
      **published,
    )
  raise ValueError(f"Unknown method {method!r}.")


def run_method(method: str, seeds, epochs: int, progress=None):
  """Trains one method on each seed; returns per-seed curves and teleport records."""
  progress = progress or common.NullProgress()
  opt = make_optimizer(method)
  step = common.make_train_step(opt, loss_fn)
  curves, gns, times, drifts, compile_s = [], [], [], [], []
  n_teleports = []
  for seed in seeds:
    params, x, y = make_problem(seed)
    state = opt.init(params)
    seed_drifts = []

    def on_epoch(epoch, p, s, seed_drifts=seed_drifts):
      if isinstance(s, tj.TeleportState) and int(s.info.status) != tj.TeleportStatus.SKIPPED:
        if epoch in _teleport_epochs(method, epochs):
          seed_drifts.append(float(s.info.rel_loss_drift))

    _, state, losses, gn, t, c = common.timed_training(
      step, params, state, lambda e, x=x, y=y: (x, y), epochs, on_epoch
    )
    curves.append(losses)
    gns.append(gn)
    times.append(t)
    compile_s.append(c)
    drifts.append(seed_drifts)
    n_teleports.append(int(state.num_teleports) if isinstance(state, tj.TeleportState) else 0)
    progress.update(1)
  return dict(
    losses=np.stack(curves),
    grad_norms=np.stack(gns),
    times=np.stack(times),
    drifts=drifts,
    compile_s=compile_s,
    num_teleports=n_teleports,
  )


def _teleport_epochs(method, epochs):
  if method == "gd_teleport_repeated":
    return [e for e in REPEATED_SCHEDULE if e < epochs]
  if method == "gd_teleport_every20":
    return list(range(TELEPORT_EPOCH, epochs, EVERY))
  if "teleport" in method:
    return [TELEPORT_EPOCH] if TELEPORT_EPOCH < epochs else []
  return []


def num_units(config: common.RunConfig) -> int:
  seeds, _ = _sizes(config)
  return len(seeds) * (len(METHODS) + len(COMPARISONS))


def _sizes(config):
  return (range(2), 100) if config.quick else (range(5), 300)


def run(config: common.RunConfig, progress=None) -> dict:
  """Runs every method, writes the plots, returns the summary section."""
  seeds, epochs = _sizes(config)
  results = {m: run_method(m, seeds, epochs, progress) for m in METHODS + COMPARISONS}
  runs = {}
  for m, r in results.items():
    mean, std = common.mean_std(r["losses"])
    entry = dict(
      loss_mean=common.finite_list(mean),
      loss_std=common.finite_list(std),
      grad_norm_sq_mean=common.finite_list(common.mean_std(r["grad_norms"])[0]),
      wall_time_s=float(np.mean(r["times"][:, -1])),
      wall_time_per_epoch_s=common.finite_list(np.mean(r["times"], axis=0)),
      compile_time_s=float(np.mean(r["compile_s"])),
      n_seeds=len(seeds),
      epochs=epochs,
      final_loss_per_seed=common.finite_list(r["losses"][:, -1]),
    )
    if "teleport" in m:
      all_drifts = [d for ds in r["drifts"] for d in ds]
      entry.update(
        max_rel_loss_drift=float(np.max(all_drifts)) if all_drifts else None,
        rel_loss_drift_per_teleport=all_drifts,
        nonfinite_runs=int(np.sum(~np.all(np.isfinite(r["losses"]), axis=1))),
        num_teleports=r["num_teleports"],
        teleport_epochs=_teleport_epochs(m, epochs),
      )
    runs[m] = entry
  _plot(results, config)
  summary = dict(
    protocol=dict(
      dims=list(DIMS),
      activation="leaky_relu(0.1)",
      gd_lr=GD_LR,
      adagrad_lr=ADAGRAD_LR,
      teleport_epoch=TELEPORT_EPOCH,
      repeated_schedule=list(REPEATED_SCHEDULE),
      epochs=epochs,
      seeds=list(seeds),
    ),
    runs=runs,
    targets=_targets(runs, epochs),
    notes=_notes(runs, epochs),
  )
  summary["table"] = _table(runs, epochs)
  return summary


def _at(entry, epoch):
  v = entry["loss_mean"][min(epoch, len(entry["loss_mean"]) - 1)]
  return float("nan") if v is None else v


def _targets(runs, epochs):
  """The reproduction targets, for the methods that were run."""
  e = min(EPOCH_OF_INTEREST, epochs - 1)
  ours = [m for m in METHODS if "teleport" in m and m in runs]
  out = {
    "epoch": e,
    "every_teleport_drift_le_1e-4": all(
      (runs[m]["max_rel_loss_drift"] or 0.0) <= 1e-4 for m in ours
    ),
    "no_nonfinite_run": all(runs[m]["nonfinite_runs"] == 0 for m in ours),
  }
  pairs = (
    ("gd_teleport_le_fifth_of_gd", "gd_teleport", "gd", e, 5.0),
    ("adagrad_teleport_below_adagrad", "adagrad_teleport", "adagrad", e, 1.0),
    ("gd_teleport_repeated_ends_below_gd", "gd_teleport_repeated", "gd", epochs - 1, 1.0),
  )
  for name, ours_m, base, epoch, factor in pairs:
    if ours_m in runs and base in runs:
      out[name] = bool(
        _at(runs[ours_m], epoch) * factor <= _at(runs[base], epoch)
        if factor > 1
        else _at(runs[ours_m], epoch) < _at(runs[base], epoch)
      )
  if "gd_teleport_every20" in runs and "gd" in runs:
    out["gd_teleport_every20_below_gd_every_seed"] = all(
      a is not None and b is not None and a < b
      for a, b in zip(
        runs["gd_teleport_every20"]["final_loss_per_seed"], runs["gd"]["final_loss_per_seed"]
      )
    )
  return out


def _notes(runs, epochs):
  """Per-seed final losses of the repeated teleports next to GD's, and non-finite runs."""
  notes = []
  if "gd" in runs:
    gd = runs["gd"]["final_loss_per_seed"]
    fmt = lambda v: "nan" if v is None else f"{v:.4g}"  # noqa: E731
    for m in ("gd_teleport_repeated", "gd_teleport_every20"):
      if m in runs:
        pairs = ", ".join(
          f"{fmt(a)} vs {fmt(b)}" for a, b in zip(runs[m]["final_loss_per_seed"], gd)
        )
        notes.append(f"final loss (epoch {epochs - 1}) per seed, {m} vs gd: {pairs}.")
  for m, r in runs.items():
    if r.get("nonfinite_runs"):
      notes.append(f"{m}: {r['nonfinite_runs']} of {r['n_seeds']} runs reached a non-finite loss.")
  return notes


def _table(runs, epochs):
  e = min(EPOCH_OF_INTEREST, epochs - 1)
  rows = []
  for m, r in runs.items():
    rows.append(
      {
        "method": m,
        f"loss@{e}": _at(r, e),
        f"loss@{epochs - 1}": _at(r, epochs - 1),
        "wall_s": r["wall_time_s"],
        "max_rel_drift": r.get("max_rel_loss_drift"),
        "nonfinite": r.get("nonfinite_runs", 0),
      }
    )
  return rows


def _plot(results, config):
  plt = common.plt()
  out = config.out_dir
  colors = {m: f"C{i}" for i, m in enumerate(results)}
  for xaxis, fname in (("epoch", "mlp_loss_vs_epoch.png"), ("time", "mlp_loss_vs_time.png")):
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in (m for m in METHODS if m in results):
      mean, std = common.mean_std(results[m]["losses"])
      x = np.arange(len(mean)) if xaxis == "epoch" else np.mean(results[m]["times"], axis=0)
      ax.plot(x, mean, color=colors[m], label=m, lw=2)
      ax.fill_between(x, np.maximum(mean - std, 1e-12), mean + std, color=colors[m], alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel(
      "epoch" if xaxis == "epoch" else "wall-clock time (s, run time, teleport included)"
    )
    ax.set_ylabel("training loss")
    ax.set_title("MLP regression (published protocol), mean ± std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=120)
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for m in (m for m in METHODS if m in results):
    lm, _ = common.mean_std(results[m]["losses"])
    gm, gs = common.mean_std(results[m]["grad_norms"])
    ax.plot(lm, gm, color=colors[m], label=m, lw=2)
    ax.fill_between(lm, np.maximum(gm - gs, 1e-12), gm + gs, color=colors[m], alpha=0.2)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training loss")
  ax.set_ylabel(r"$\|\nabla L\|^2$")
  ax.set_title("squared gradient norm vs loss, mean ± std")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "mlp_grad_norm_vs_loss.png", dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  exact_vs_published = (
    "gd",
    "gd_teleport",
    "gd_teleport_published",
    "adagrad_teleport",
    "adagrad_teleport_published",
    "gd_teleport_max_grad_norm",
    "gd_teleport_max_grad_norm_safe",
  )
  for m in (m for m in exact_vs_published if m in results):
    mean, _ = common.mean_std(results[m]["losses"])
    ax.plot(mean, color=colors[m], label=m, lw=2, ls="--" if "published" in m else "-")
  ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("training loss")
  ax.set_title("exact action vs published first-order action")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "mlp_exact_vs_published.png", dpi=120)
  plt.close(fig)
