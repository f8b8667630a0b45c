"""MLP classification (seed Figure 3): does teleporting early cause early overfitting?

A three-layer feed-forward network ``x -> Dense(h) -> LeakyReLU(0.1) -> Dense(h)
-> LeakyReLU(0.1) -> Dense(classes)`` with softmax cross-entropy, trained with
minibatch SGD, with and without teleportation. After every epoch the loss and
accuracy on the whole training set and on the validation set are recorded
(index 0 of every curve is the initial point, index ``e`` is after ``e``
epochs), so the two curves of a method show whether the validation loss
starts to rise while the training loss still falls, and whether teleporting
makes this happen earlier.

Data: MNIST if ``--data-dir`` (or ``$TELEPORT_JAX_MNIST_DIR``) holds the IDX
files, or the user's cache does, or it can be fetched (checksum-verified;
``--no-download`` turns that off), else scikit-learn's bundled 8x8 digits (see
:mod:`teleport_jax.experiments.data`).

Teleport settings (chosen and measured for this experiment, not taken from the
paper):

* Group: :class:`teleport_jax.PositiveRescaling` of both hidden layers. Its
  action is data-free: the network function is unchanged on *every* input
  (LeakyReLU is positively homogeneous), so a teleport computed on one
  minibatch leaves the validation predictions exactly as they were. The
  data-dependent GL action of the paper keeps the loss only on the batch it
  was built from (and needs the batch to be no larger than the layer widths),
  so it would change the predictions on all other data. Every teleport's
  relative loss change is recorded and must stay within the loss check (``rtol``).
* Schedule: at the first step of each of the first ``teleport_epochs`` (3)
  epochs (:func:`teleport_jax.every` with ``period = steps per epoch`` and
  ``stop``), i.e. a few teleports early in training, where they change the
  loss curve most; plain SGD runs after them. The teleport uses the minibatch
  of that step.
* ``sgd_teleport``: the paper's objective, maximise the squared gradient norm
  (:func:`teleport_jax.objectives.grad_norm_sq`), with 10 normalised, safeguarded steps on
  the Lie algebra whose size is capped at 0.1 (``max_step_size=0.1``), and no
  stability constraint (``stability=False``, opting out of ``with_teleport``'s
  default for repeating schedules: this method is the paper's teleport, and
  the cap is what bounds it). The cap is needed: the rescaling orbit is
  unbounded and the gradient norm grows without limit along it. Measured on
  the digits data (lr 0.1, 3 seeds, 30 epochs): with a cap of 1.0 the first
  teleport multiplied the squared gradient norm by 1e3 and the second by
  1e5-1e6, and SGD then diverged to NaN in all three seeds; with 0.3 all three
  seeds also ended in NaN; with 0.2 the training loss jumped to as much as 514
  before recovering; with 0.1 the training loss has no spike.
* ``sgd_teleport_lookahead``: ``with_teleport``'s default objective,
  :func:`teleport_jax.objectives.optimizer_lookahead` (the loss after 5 steps of the
  wrapped SGD, i.e. 5 SGD steps of the training learning rate on the teleport's
  minibatch), 10 normalised steps of initial size 0.1 (cap 1.0), with the
  default stability constraint of a repeating schedule
  (:class:`teleport_jax.objectives.Stability`). It knows the step size, so it does not
  pick points too steep for it.

Every teleport is checked against the library's float32 loss tolerance
(:data:`teleport_jax.experiments.common.RTOL_FLOAT32`) and its status recorded;
one that finds nothing to improve does not move and is not counted as accepted.

Sizes (:func:`default_settings`): hidden width 64, batch 32, lr 0.1 on the
digits (1,078 training images; 100 epochs and 3 seeds, ``--quick`` 30 epochs
and 2 seeds); hidden width 128, batch 64, lr 0.1 on MNIST with a random
10,000-image training subset and the 10,000 test images as validation set (30
epochs, 3 seeds; ``--quick`` 3,000/2,000 images, 6 epochs, 1 seed). The small
training sets make overfitting appear within the epoch budget. The curves are
means over seeds; the best validation epoch is read from the mean curve.

SGD uses a constant learning rate, minibatches drawn by a fresh permutation
every epoch (the last incomplete batch is dropped), and each epoch is one
jit-compiled ``lax.scan`` over its minibatches; the teleport happens inside it
(``lax.cond`` on the step count). Reported wall-clock times are training time
only: compilation is done ahead of time and measured separately, and the
per-epoch evaluation on the full sets is not counted.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax.experiments import common
from teleport_jax.experiments import data as data_lib
from teleport_jax.experiments import plotting

ACTIVATION = tj.activations.leaky_relu(0.1)
METHODS = ("sgd", "sgd_teleport", "sgd_teleport_lookahead")
LOOKAHEAD_STEPS = 5
# XLA options of the compiled epochs (the default; tests lower the optimisation level)
COMPILER_OPTIONS: dict = {}
# with_teleport's ``stability`` argument of each teleporting method (spelled out)
STABILITY = {"sgd_teleport": False, "sgd_teleport_lookahead": True}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one run of the experiment.

  Attributes:
    hidden: width of both hidden layers.
    epochs: training epochs.
    batch_size: minibatch size.
    learning_rate: SGD step size.
    seeds: training seeds (initialisation and minibatch order).
    teleport_epochs: teleport at the first step of each of these many epochs.
    max_train: cap on the training set (random subset), ``None`` for all.
    max_val: cap on the validation set, ``None`` for all.
  """

  hidden: int = 64
  epochs: int = 100
  batch_size: int = 32
  learning_rate: float = 0.1
  seeds: tuple[int, ...] = (0, 1, 2)
  teleport_epochs: int = 3
  max_train: int | None = None
  max_val: int | None = None


def default_settings(config: common.RunConfig, dataset_name: str) -> Settings:
  """The sizes for ``config`` (quick or full) on the data set that will be used."""
  if dataset_name == "mnist":
    if config.quick:
      return Settings(
        hidden=128, epochs=6, batch_size=64, learning_rate=0.1, seeds=(0,),
        max_train=3000, max_val=2000,
      )  # fmt: skip
    return Settings(
      hidden=128, epochs=30, batch_size=64, learning_rate=0.1, seeds=(0, 1, 2),
      max_train=10000, max_val=10000,
    )  # fmt: skip
  if config.quick:
    return Settings(epochs=30, seeds=(0, 1))
  return Settings(epochs=100, seeds=(0, 1, 2))


def _dataset_name(config: common.RunConfig) -> str:
  return "mnist" if data_lib.find_mnist(config.data_dir) is not None else "sklearn_digits"


def num_units(config: common.RunConfig) -> int:
  """Progress units of :func:`run`: one per (method, seed)."""
  return len(METHODS) * len(default_settings(config, _dataset_name(config)).seeds)


# ----------------------------------------------------------------- the model
def init_params(key, widths, dtype=jnp.float32) -> list[tuple[jax.Array, jax.Array]]:
  """He-initialised ``[(W, b), ...]`` with ``W`` of shape ``(out, in)``, ``b = 0``."""
  keys = jax.random.split(key, len(widths) - 1)
  params = []
  for k, d_in, d_out in zip(keys, widths[:-1], widths[1:]):
    w = jax.random.normal(k, (d_out, d_in), dtype) * math.sqrt(2.0 / d_in)
    params.append((w.astype(dtype), jnp.zeros((d_out,), dtype)))
  return params


def logits_fn(params, x):
  """``x`` of shape ``(batch, features)`` -> logits ``(batch, classes)``."""
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w.T + b
    if i < len(params) - 1:
      h = ACTIVATION(h)
  return h


def loss_fn(params, x, y):
  """Mean softmax cross-entropy with integer labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y))


@jax.jit
def evaluate(params, x, y):
  """``(mean cross-entropy, accuracy)`` on a whole set."""
  logits = logits_fn(params, x)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def make_optimizer(method: str, s: Settings, steps_per_epoch: int):
  """The optax optimizer of ``method`` (see the module docstring)."""
  if method == "sgd":
    return optax.sgd(s.learning_rate)
  return tj.with_teleport(
    optax.sgd(s.learning_rate),
    tj.PositiveRescaling(),
    make_schedule(s, steps_per_epoch),
    config=teleport_config(method),
    stability=STABILITY[method],
  )


def make_schedule(s: Settings, steps_per_epoch: int):
  """The first step of each of the first ``s.teleport_epochs`` epochs."""
  return tj.every(steps_per_epoch, start=0, stop=max(s.teleport_epochs * steps_per_epoch, 1))


def teleport_config(method: str) -> tj.TeleportConfig:
  """Objective and solver settings of a teleporting ``method``."""
  if method == "sgd_teleport":
    return common.teleport_config(tj.objectives.grad_norm_sq(), 10, max_step_size=0.1)
  if method == "sgd_teleport_lookahead":
    return common.teleport_config(tj.objectives.optimizer_lookahead(LOOKAHEAD_STEPS), 10)
  raise ValueError(f"Unknown method {method!r}.")


def describe_method(method: str, s: Settings) -> dict:
  """The protocol entry of ``method``."""
  out = dict(optimizer=f"sgd(lr={s.learning_rate:g})")
  if method == "sgd":
    return out
  schedule = f"first step of each of the first {s.teleport_epochs} epochs (its minibatch)"
  out.update(
    symmetry="PositiveRescaling (both hidden layers)",
    **common.describe_teleport(
      teleport_config(method), schedule=schedule, stability=STABILITY[method]
    ),
  )
  return out


def make_epoch_fn(opt, batch_size: int, steps_per_epoch: int):
  """``epoch(params, state, x, y, key) -> (params, state, minibatch_losses)``."""

  def step(carry, batch):
    params, state = carry
    x, y = batch
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, value_fn=loss_fn, x=x, y=y)
    return (optax.apply_updates(params, updates), state), loss

  def epoch(params, state, x, y, key):
    perm = jax.random.permutation(key, x.shape[0])[: steps_per_epoch * batch_size]
    xb = x[perm].reshape(steps_per_epoch, batch_size, x.shape[1])
    yb = y[perm].reshape(steps_per_epoch, batch_size)
    (params, state), losses = jax.lax.scan(step, (params, state), (xb, yb))
    return params, state, losses

  return jax.jit(epoch)


# ------------------------------------------------------------------ training
def run_method(method: str, ds: data_lib.Dataset, s: Settings, progress=None) -> dict:
  """Trains ``method`` once per seed; returns per-seed curves and teleport records."""
  progress = progress or common.NullProgress()
  n = len(ds.y_train)
  batch_size = min(s.batch_size, n)
  steps = n // batch_size
  widths = (ds.num_features, s.hidden, s.hidden, ds.num_classes)
  opt = make_optimizer(method, s, steps)
  x_tr, y_tr = jnp.asarray(ds.x_train, jnp.float32), jnp.asarray(ds.y_train, jnp.int32)
  x_va, y_va = jnp.asarray(ds.x_val, jnp.float32), jnp.asarray(ds.y_val, jnp.int32)

  params0 = init_params(jax.random.key(0), widths)
  state0 = opt.init(params0)
  t0 = time.perf_counter()
  epoch_fn = (
    make_epoch_fn(opt, batch_size, steps)
    .lower(params0, state0, x_tr, y_tr, jax.random.key(0))
    .compile(compiler_options=COMPILER_OPTIONS)
  )
  compile_s = time.perf_counter() - t0

  out = {k: [] for k in ("train_loss", "val_loss", "train_acc", "val_acc", "times")}
  out.update(drifts=[], statuses=[], grad_ratio=[], num_teleports=[], num_rejected=[])
  for seed in s.seeds:
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = init_params(k_init, widths)
    state = opt.init(params)
    curves = {k: [] for k in ("train_loss", "val_loss", "train_acc", "val_acc")}

    def record(p, curves=curves):
      (tl, ta), (vl, va) = evaluate(p, x_tr, y_tr), evaluate(p, x_va, y_va)
      curves["train_loss"].append(float(tl))
      curves["train_acc"].append(float(ta))
      curves["val_loss"].append(float(vl))
      curves["val_acc"].append(float(va))

    record(params)
    elapsed, times, attempts = 0.0, [0.0], 0
    drifts, statuses, ratios = [], [], []
    for epoch in range(s.epochs):
      t = time.perf_counter()
      params, state, _ = epoch_fn(params, state, x_tr, y_tr, jax.random.fold_in(k_data, epoch))
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - t
      times.append(elapsed)
      record(params)
      if isinstance(state, tj.TeleportState):
        now = int(state.num_teleports) + int(state.num_rejected)
        if now > attempts:  # at most one teleport per epoch: state.info is this epoch's
          attempts = now
          info = state.info
          status = tj.TeleportStatus(int(info.status))
          statuses.append(status.name)
          if status == tj.TeleportStatus.SUCCESSFUL:  # the drift of a point it moved to
            drifts.append(float(info.rel_loss_drift))
          ratios.append(
            float(info.grad_norm_sq_after) / max(float(info.grad_norm_sq_before), 1e-30)
          )
    for k, v in curves.items():
      out[k].append(v)
    out["times"].append(times)
    out["drifts"].append(drifts)
    out["statuses"].append(statuses)
    out["grad_ratio"].append(ratios)
    teleporting = isinstance(state, tj.TeleportState)
    out["num_teleports"].append(int(state.num_teleports) if teleporting else 0)
    out["num_rejected"].append(int(state.num_rejected) if teleporting else 0)
    progress.update(1)
  for k in ("train_loss", "val_loss", "train_acc", "val_acc", "times"):
    out[k] = np.asarray(out[k], np.float64)
  out["compile_s"] = compile_s
  out["steps_per_epoch"] = steps
  out["batch_size"] = batch_size
  return out


# ------------------------------------------------------------------- summary
def run(config: common.RunConfig, progress=None, settings: Settings | None = None) -> dict:
  """Runs every method, writes ``classification_loss.png``, returns the summary section.

  Args:
    config: the ``reproduce`` configuration (quick/full, output and data directories).
    progress: a tqdm-like sink, updated once per (method, seed).
    settings: overrides :func:`default_settings` (tests use tiny sizes).
  """
  s = settings or default_settings(config, _dataset_name(config))
  ds = data_lib.load_classification_data(
    config.data_dir,
    max_train=s.max_train,
    max_val=s.max_val,
    seed=0,
    source=config.data_source,
  )
  results = {m: run_method(m, ds, s, progress) for m in METHODS}
  runs = {}
  for m, r in results.items():
    tl_mean, tl_std = common.mean_std(r["train_loss"])
    vl_mean, vl_std = common.mean_std(r["val_loss"])
    nonfinite = int(
      np.sum(~(np.all(np.isfinite(r["train_loss"]), 1) & np.all(np.isfinite(r["val_loss"]), 1)))
    )
    entry = dict(
      train_loss=common.finite_list(tl_mean),
      val_loss=common.finite_list(vl_mean),
      train_loss_std=common.finite_list(tl_std),
      val_loss_std=common.finite_list(vl_std),
      train_accuracy=common.finite_list(np.mean(r["train_acc"], 0)),
      val_accuracy=common.finite_list(np.mean(r["val_acc"], 0)),
      wall_time_s=float(np.mean(r["times"][:, -1])),
      compile_time_s=float(r["compile_s"]),
      n_seeds=len(s.seeds),
      epochs=s.epochs,
      nonfinite_runs=nonfinite,
      per_seed=_per_seed(r),
    )
    if m != "sgd":
      all_drifts = np.asarray([d for seed in r["drifts"] for d in seed], np.float64)
      finite = all_drifts[np.isfinite(all_drifts)]
      entry.update(
        # over the teleports that moved (status SUCCESSFUL)
        max_rel_loss_drift=float(finite.max()) if finite.size else None,
        rel_loss_drift_per_teleport=[common.finite_list(seed) for seed in r["drifts"]],
        teleport_status=r["statuses"],
        grad_norm_sq_ratio_per_teleport=[common.finite_list(seed) for seed in r["grad_ratio"]],
        num_teleports=r["num_teleports"],
        num_rejected=r["num_rejected"],
        teleport_steps=[e * r["steps_per_epoch"] for e in range(min(s.teleport_epochs, s.epochs))],
      )
    runs[m] = entry
  _plot(results, ds, s, config)
  table = _table(runs)
  first = next(iter(results.values()))
  drift_ok = all(
    (runs[m].get("max_rel_loss_drift") or 0.0) <= common.RTOL_FLOAT32 for m in METHODS if m != "sgd"
  )
  summary = dict(
    dataset=ds.name,
    dataset_note=ds.note,
    protocol=dict(
      dataset=ds.name,
      widths=[ds.num_features, s.hidden, s.hidden, ds.num_classes],
      activation="leaky_relu(0.1)",
      loss="softmax cross-entropy (mean over the batch)",
      dtype="float32",
      n_train=len(ds.y_train),
      n_val=len(ds.y_val),
      batch_size=first["batch_size"],
      steps_per_epoch=first["steps_per_epoch"],
      learning_rate=s.learning_rate,
      epochs=s.epochs,
      seeds=list(s.seeds),
      teleport_epochs=list(range(min(s.teleport_epochs, s.epochs))),
      methods={m: describe_method(m, s) for m in METHODS},
    ),
    runs=runs,
    table=table,
    targets=dict(
      every_teleport_within_rtol=bool(drift_ok),
      no_nonfinite_run=all(r["nonfinite_runs"] == 0 for r in runs.values()),
    ),
    notes=[ds.note, *_notes(runs)],
  )
  return summary


def _per_seed(r) -> dict:
  """Per-seed end points: final losses and accuracy, the best validation loss and its epoch."""
  val = np.where(np.isfinite(r["val_loss"]), r["val_loss"], np.inf)
  best_epoch = np.argmin(val, axis=1)
  return dict(
    final_train_loss=common.finite_list(r["train_loss"][:, -1]),
    final_val_loss=common.finite_list(r["val_loss"][:, -1]),
    final_val_accuracy=common.finite_list(r["val_acc"][:, -1]),
    best_val_loss=common.finite_list(np.min(val, axis=1)),
    best_val_epoch=[int(e) for e in best_epoch],
  )


def _best(entry) -> tuple[float, int]:
  v = np.asarray([np.nan if x is None else x for x in entry["val_loss"]], np.float64)
  if not np.any(np.isfinite(v)):
    return float("nan"), -1
  i = int(np.nanargmin(v))
  return float(v[i]), i


def _last(values) -> float:
  v = values[-1]
  return float("nan") if v is None else float(v)


def _table(runs) -> list[dict]:
  rows = []
  for m, r in runs.items():
    best, best_epoch = _best(r)
    rows.append(
      {
        "method": m,
        "train_loss": _last(r["train_loss"]),
        "val_loss": _last(r["val_loss"]),
        "best_val_loss": best,
        "best_val_epoch": best_epoch,
        "val_acc": _last(r["val_accuracy"]),
        "wall_s": r["wall_time_s"],
        "max_rel_drift": r.get("max_rel_loss_drift"),
        "nonfinite": r["nonfinite_runs"],
      }
    )
  return rows


def _notes(runs) -> list[str]:
  notes = []
  for m, r in runs.items():
    best, e = _best(r)
    final = _last(r["val_loss"])
    last_epoch = len(r["val_loss"]) - 1
    if r["nonfinite_runs"]:
      notes.append(f"{m}: {r['nonfinite_runs']} of {r['n_seeds']} runs reached a non-finite loss.")
    elif e < last_epoch:
      notes.append(
        f"{m}: validation loss lowest after epoch {e} ({best:.4g}), then rises to "
        f"{final:.4g} (+{100 * (final - best) / best:.1f}%) after epoch {last_epoch} while "
        f"the training loss falls to {_last(r['train_loss']):.4g}."
      )
    else:
      notes.append(f"{m}: validation loss still falling at the last epoch ({final:.4g}).")
    if m == "sgd":
      continue
    statuses = [x for seed in r["teleport_status"] for x in seed]
    gains = [g for seed in r["grad_norm_sq_ratio_per_teleport"] for g in seed if g is not None]
    drift = r["max_rel_loss_drift"]
    notes.append(
      f"{m}: {sum(x == 'SUCCESSFUL' for x in statuses)} of {len(statuses)} teleports "
      f"accepted, max relative loss change "
      + ("-" if drift is None else f"{drift:.1e}")
      + ", squared gradient norm multiplied by "
      + (f"{min(gains):.3g} to {max(gains):.3g}" if gains else "-")
      + "."
    )
  if "sgd" in runs:
    best_sgd, e_sgd = _best(runs["sgd"])
    for m in runs:
      best_tel, e_tel = _best(runs[m])
      if m == "sgd" or e_sgd < 0 or e_tel < 0 or runs[m]["nonfinite_runs"]:
        continue
      last = len(runs[m]["val_loss"]) - 1
      spread = max(runs[m]["val_loss_std"][e_tel] or 0.0, runs["sgd"]["val_loss_std"][e_sgd] or 0.0)
      diff = best_tel - best_sgd
      if e_tel == e_sgd == last:
        verdict = "not visible, both validation losses still fall at the last epoch"
      else:
        when = "earlier" if e_tel < e_sgd else ("later" if e_tel > e_sgd else "at the same epoch")
        verdict = (
          f"the validation loss bottoms out {when} (epoch {e_tel} vs {e_sgd} for sgd"
          + (", whose validation loss still falls at the last epoch" if e_sgd == last else "")
          + f"); minimum {best_tel:.4g} vs {best_sgd:.4g} ({diff:+.2g}), seed spread "
          f"+-{spread:.2g}"
          + (": within the spread over seeds, weak evidence" if abs(diff) <= spread else "")
        )
      notes.append(f"Early overfitting with {m}: {verdict}.")
  return notes


@plotting.styled
def _plot(results, ds, s, config) -> None:
  n = len(s.seeds)
  teleport_epochs = list(range(min(s.teleport_epochs, s.epochs)))  # at the start of these
  fig, (ax, ax_acc) = plotting.panels(
    2,
    xlabel="epoch",
    ylabel=["cross-entropy", "validation accuracy"],
    titles=[
      f"{ds.name}: loss (geometric mean over {n} seeds,\nband x/÷ geometric std)",
      f"validation accuracy\n(mean, band: min-max over {n} seeds)",
    ],
    panel_size=(5.6, 3.8),
  )
  colors = plotting.colors(list(results))
  for m, r in results.items():
    color = colors[m]
    epochs = np.arange(r["train_loss"].shape[1])
    for key, ls in (("train_loss", "-"), ("val_loss", "--")):
      center, lo, hi = common.log_band(r[key])
      ax.plot(epochs, center, color=color, ls=ls, label=m if key == "train_loss" else None)
      ax.fill_between(epochs, lo, hi, color=color, alpha=0.15, lw=0)
      if m != "sgd":  # the teleports at the start of an epoch: right after its point
        at = [e for e in teleport_epochs if e < len(center)]
        plotting.mark_teleports(ax, epochs[at], center[at], color=color)
    acc = r["val_acc"]
    ax_acc.plot(epochs, acc.mean(axis=0), color=color, label=m)
    ax_acc.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=color, alpha=0.15, lw=0)
  ax.set_yscale("log")
  # from the accuracy after the first epoch: the initial 10 % would flatten the curves
  late = np.concatenate([r["val_acc"][:, 1:].ravel() for r in results.values()])
  if late.size and np.any(np.isfinite(late)):
    ax_acc.set_ylim(max(0.0, float(np.nanmin(late)) - 0.02), 1.0)
  plotting.legend(
    fig, extra=[plotting.proxy("train (solid)"), plotting.proxy("validation (dashed)", ls="--")]
  )
  plotting.savefig(fig, config.out_dir / "classification_loss.png")
