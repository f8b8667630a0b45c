"""Sharpness, orbit curvature and generalisation (after Zhao et al., ICLR 2024).

Two studies on the classification problem of
:mod:`teleport_jax.experiments.classification` (same data, model, loss and
evaluation; a three-layer LeakyReLU(0.1) MLP with softmax cross-entropy,
minibatch SGD with a constant learning rate).

**1. Teleport, then keep training.** For every seed, SGD runs to
``teleport_epoch``; there the parameters are teleported with the exact,
data-free :class:`teleport_jax.PositiveRescaling` (both hidden layers) to
increase or decrease the sharpness (:func:`teleport_jax.geometry.sharpness`, absolute
radius) or the orbit curvature (:func:`teleport_jax.geometry.orbit_curvature`), and
SGD continues from the teleported point with the *same* minibatch order as the
run without teleport (``sgd``). The solver takes 10 safeguarded steps of at
most 0.3 in the log-scales; with 20 steps the sharpness grew 200-fold or the
curvature fell 7-fold and SGD (lr 0.1) then diverged in some seeds. Seeds that
end non-finite are counted (``nonfinite_runs``) and left out of the means. Reported: the objective before and after the
teleport (did it move?), the validation loss/accuracy right after the teleport
and at the end, mean +- std over seeds, and the per-seed (paired) difference of
the final validation loss to ``sgd`` with a paired t-test.

A rescaling teleport does not change the network function: right after it the
training *and* validation losses are those of ``sgd`` (up to rounding). Any
generalisation effect can therefore only come from the different trajectory
that SGD takes from the new point (SGD is not invariant under rescaling: the
gradient transforms with the inverse scales).

**2. Correlation over minima.** Networks are trained from several seeds with
several learning rates and batch sizes; at the end of each run the sharpness,
the relative (rescaling-invariant) sharpness and the orbit curvature are
measured and correlated (Pearson and Spearman, with p-values) with the
validation loss, with the generalisation gap (validation minus training loss)
and with the training loss (a confounder: runs that trained less far have
both a higher validation loss and a different geometry). In addition, each minimum is moved to a few random points of its
rescaling orbit: the validation loss is unchanged there (the function is the
same), while absolute sharpness and curvature change. The ratio of their
spread within one orbit to their spread across minima says how much of the
across-minima variation a mere reparametrisation can produce, i.e. how far a
correlation can be read as "flat minima generalise better".

Measures are computed on a fixed subset of ``measure_size`` training examples
(the teleports use the same subset). Teleports run outside the jitted SGD
epochs; the four teleports share one compiled solver (the objective and its
sign are passed with the batch; ``lax.switch`` evaluates only the selected
objective), and the values before and after are re-measured with the plain
objectives.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax.experiments import classification as cls
from teleport_jax.experiments import common
from teleport_jax.experiments import data as data_lib
from teleport_jax.experiments import plotting

SYMMETRY = tj.PositiveRescaling()
# (method, objective kind, maximize)
TELEPORTS = (
  ("sharpness_up", "sharpness", True),
  ("sharpness_down", "sharpness", False),
  ("curvature_up", "curvature", True),
  ("curvature_down", "curvature", False),
)
MEASURES = ("sharpness", "relative_sharpness", "curvature")
# what the measures are correlated with; "gap" is validation minus training loss
CORRELATION_TARGETS = ("val_loss", "gap", "train_loss")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one run.

  Attributes:
    hidden: width of both hidden layers.
    epochs: SGD epochs of the teleport study.
    teleport_epoch: the teleport happens after this many epochs.
    batch_size: minibatch size of the teleport study.
    learning_rate: SGD step size of the teleport study.
    seeds: seeds of the teleport study.
    measure_size: training examples used by the teleports and the measures.
    radius: perturbation norm of :func:`teleport_jax.geometry.sharpness`.
    relative_radius: relative perturbation of the rescaling-invariant sharpness.
    num_samples: perturbation directions of the sharpness.
    num_directions: algebra directions of the orbit curvature.
    num_steps: teleport solver steps.
    max_step_size: cap on one solver step (log-scales of the hidden units).
    corr_seeds: seeds of the correlation study.
    corr_learning_rates: learning rates of the correlation study.
    corr_batch_sizes: batch sizes of the correlation study.
    corr_epochs: SGD epochs of each correlation run.
    orbit_points: random orbit points per minimum.
    orbit_scale: standard deviation of their log-scales.
    max_train: cap on the training set (``None``: all).
    max_val: cap on the validation set (``None``: all).
  """

  hidden: int = 64
  epochs: int = 40
  teleport_epoch: int = 20
  batch_size: int = 32
  learning_rate: float = 0.1
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  measure_size: int = 512
  radius: float = 1.0
  relative_radius: float = 0.05
  num_samples: int = 16
  num_directions: int = 8
  num_steps: int = 10
  max_step_size: float = 0.3
  corr_seeds: tuple[int, ...] = (10, 11, 12, 13)
  corr_learning_rates: tuple[float, ...] = (0.03, 0.1, 0.3)
  corr_batch_sizes: tuple[int, ...] = (16, 64)
  corr_epochs: int = 40
  orbit_points: int = 4
  orbit_scale: float = 0.5
  max_train: int | None = None
  max_val: int | None = None


def default_settings(config: common.RunConfig) -> Settings:
  """Full or quick sizes (MNIST is subsampled to the size of the digits)."""
  cap = dict(max_train=2000, max_val=2000) if _dataset_name(config) == "mnist" else {}
  if config.quick:
    return Settings(
      epochs=10, teleport_epoch=5, seeds=(0, 1), corr_seeds=(10, 11),
      corr_learning_rates=(0.05, 0.2), corr_batch_sizes=(32,), corr_epochs=10,
      orbit_points=2, **cap,
    )  # fmt: skip
  return Settings(**cap)


def _dataset_name(config: common.RunConfig) -> str:
  return "mnist" if data_lib.find_mnist(config.data_dir) is not None else "sklearn_digits"


def num_units(config: common.RunConfig) -> int:
  """Progress units: one per teleport-study seed and one per correlation run."""
  s = default_settings(config)
  return len(s.seeds) + len(s.corr_seeds) * len(s.corr_learning_rates) * len(s.corr_batch_sizes)


# ------------------------------------------------------------------ objectives
def _batch_loss(params, data):
  """Loss on ``data = (x, y)`` or ``(x, y, index)``."""
  return cls.loss_fn(params, data[0], data[1])


def measure_objectives(s: Settings) -> dict[str, tj.objectives.Objective]:
  """The three measures (all minimised objectives; only their values are used here)."""
  return {
    "sharpness": tj.geometry.sharpness(s.radius, s.num_samples),
    "relative_sharpness": tj.geometry.sharpness(s.relative_radius, s.num_samples, relative=True),
    "curvature": tj.geometry.orbit_curvature(SYMMETRY, s.num_directions),
  }


def teleport_objectives(s: Settings) -> dict[str, tj.objectives.Objective]:
  """The objective of each kind in :data:`TELEPORTS` (its direction is set per teleport)."""
  return {
    "sharpness": tj.geometry.sharpness(s.radius, s.num_samples),
    "curvature": tj.geometry.orbit_curvature(SYMMETRY, s.num_directions),
  }


@dataclasses.dataclass(frozen=True)
class _Switch:
  """``fn`` of an objective that maximises ``sign * objectives[index]``, with
  ``index`` and ``sign`` passed as the last two elements of the batch: one
  compiled teleport serves every (objective, direction) pair, and
  ``lax.switch`` evaluates only the selected objective."""

  objectives: tuple[tj.objectives.Objective, ...]

  def __call__(self, loss_fn, params, data):
    x, y, index, sign = data
    branches = [lambda p, o=o: o.fn(_batch_loss, p, (x, y))[0] for o in self.objectives]
    return sign * jax.lax.switch(index, branches, params), loss_fn(params, data)


def teleport_config(s: Settings, objective) -> tj.TeleportConfig:
  """The settings of every teleport of study 1 (one objective per kind and direction)."""
  return common.teleport_config(
    objective, s.num_steps, step_size=0.1, max_step_size=s.max_step_size
  )


def switch_objective(s: Settings) -> tj.objectives.Objective:
  """One objective for every (kind, direction) of :data:`TELEPORTS` (see :class:`_Switch`)."""
  objectives = teleport_objectives(s)
  return tj.objectives.Objective(_Switch(tuple(objectives.values())), True, "switch")


def make_teleport(s: Settings):
  """``teleport(params, x, y, kind, maximize) -> (new_params, info)``."""
  kinds = tuple(teleport_objectives(s))
  config = teleport_config(s, switch_objective(s))

  def run(params, x, y, kind, maximize):
    return tj.teleport(
      _batch_loss,
      params,
      (x, y, jnp.asarray(kinds.index(kind), jnp.int32), jnp.asarray(1.0 if maximize else -1.0)),
      symmetry=SYMMETRY,
      config=config,
    )

  return run


def make_measure(s: Settings):
  """A jitted ``measure(params, x, y) -> {name: value}`` of :data:`MEASURES`."""
  objectives = measure_objectives(s)

  @jax.jit
  def measure(params, x, y):
    return {k: o.fn(_batch_loss, params, (x, y))[0] for k, o in objectives.items()}

  return measure


# -------------------------------------------------------------------- training
_SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)


@functools.cache
def _epoch_fn(batch_size: int, steps: int):
  """One compiled SGD epoch per batch size; the learning rate lives in the state."""
  return cls.make_epoch_fn(_SGD, batch_size, steps)


def _train(params, epoch_fn, learning_rate, x, y, key, first, last, on_epoch=None):
  """Epochs ``first .. last - 1`` of plain SGD (stateless: a fresh state is exact)."""
  state = _SGD.init(params)
  lr = state.hyperparams["learning_rate"]
  state = state._replace(
    hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(learning_rate, lr.dtype)}
  )
  for epoch in range(first, last):
    params, state, _ = epoch_fn(params, state, x, y, jax.random.fold_in(key, epoch))
    if on_epoch is not None:
      on_epoch(epoch + 1, params)
  return params


def _arrays(ds, s: Settings):
  """Training, validation and measuring ``(x, y)`` pairs, and the layer widths."""
  x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  x_va, y_va = jnp.asarray(ds.x_val), jnp.asarray(ds.y_val)
  measuring = (x_tr[: s.measure_size], y_tr[: s.measure_size])
  widths = (ds.num_features, s.hidden, s.hidden, ds.num_classes)
  return (x_tr, y_tr), (x_va, y_va), measuring, widths


def teleport_study(ds, s: Settings, progress) -> dict:
  """Study 1; returns per-method, per-seed records."""
  (x_tr, y_tr), (x_va, y_va), (x_m, y_m), widths = _arrays(ds, s)
  n = len(ds.y_train)
  batch_size = min(s.batch_size, n)
  steps = n // batch_size
  epoch_fn = _epoch_fn(batch_size, steps)
  teleport = make_teleport(s)
  measure = make_measure(s)
  methods = ("sgd",) + tuple(m for m, _, _ in TELEPORTS)
  rec = {m: {k: [] for k in ("val_loss", "val_acc", "train_loss")} for m in methods}
  for m in methods[1:]:
    rec[m].update(before={}, after={}, end={}, drift=[], accepted=[], wall_s=[])
  rec["sgd"]["end"] = {}
  for seed in s.seeds:
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = cls.init_params(k_init, widths)
    curves = {m: {k: [] for k in ("val_loss", "val_acc", "train_loss")} for m in methods}

    def record(m, p, curves=curves):
      (tl, _), (vl, va) = cls.evaluate(p, x_tr, y_tr), cls.evaluate(p, x_va, y_va)
      curves[m]["train_loss"].append(float(tl))
      curves[m]["val_loss"].append(float(vl))
      curves[m]["val_acc"].append(float(va))

    prefix = {k: [] for k in ("val_loss", "val_acc", "train_loss")}
    record("sgd", params)
    mid = _train(
      params,
      epoch_fn,
      s.learning_rate,
      x_tr,
      y_tr,
      k_data,
      0,
      s.teleport_epoch,
      lambda e, p: record("sgd", p),
    )
    for k in prefix:
      prefix[k] = list(curves["sgd"][k])
    values0 = {k: float(v) for k, v in measure(mid, x_m, y_m).items()}
    starts = {"sgd": mid}
    for m, kind, maximize in TELEPORTS:
      t = time.perf_counter()
      new, info = teleport(mid, x_m, y_m, kind, maximize)
      jax.block_until_ready(new)
      rec[m]["wall_s"].append(time.perf_counter() - t)
      rec[m]["drift"].append(float(info.rel_loss_drift))
      rec[m]["accepted"].append(bool(info.accepted))
      values1 = {k: float(v) for k, v in measure(new, x_m, y_m).items()}
      for k in MEASURES:
        rec[m]["before"].setdefault(k, []).append(values0[k])
        rec[m]["after"].setdefault(k, []).append(values1[k])
      for k in prefix:
        curves[m][k] = list(prefix[k])
      record(m, new)  # right after the teleport (same epoch index as the prefix end)
      curves[m]["val_loss"].pop(-2)
      curves[m]["val_acc"].pop(-2)
      curves[m]["train_loss"].pop(-2)
      starts[m] = new
    for m in methods:
      end = _train(
        starts[m], epoch_fn, s.learning_rate, x_tr, y_tr, k_data, s.teleport_epoch, s.epochs,
        lambda e, p, m=m: record(m, p),
      )  # fmt: skip
      for k, v in measure(end, x_m, y_m).items():
        rec[m]["end"].setdefault(k, []).append(float(v))
      for k in ("val_loss", "val_acc", "train_loss"):
        rec[m][k].append(curves[m][k])
    progress.update(1)
  for m in methods:
    for k in ("val_loss", "val_acc", "train_loss"):
      rec[m][k] = np.asarray(rec[m][k], np.float64)  # (seeds, epochs + 1)
  return rec


def correlation_study(ds, s: Settings, progress) -> dict:
  """Study 2; returns one record per trained minimum."""
  (x_tr, y_tr), (x_va, y_va), (x_m, y_m), widths = _arrays(ds, s)
  n = len(ds.y_train)
  measure = make_measure(s)
  act = jax.jit(lambda p, xi: SYMMETRY.act(p, SYMMETRY.exp(xi)))
  minima = []
  for batch_size in s.corr_batch_sizes:
    bs = min(batch_size, n)
    for lr in s.corr_learning_rates:
      epoch_fn = _epoch_fn(bs, n // bs)
      for seed in s.corr_seeds:
        k_init, k_data = jax.random.split(jax.random.key(seed))
        params = cls.init_params(k_init, widths)
        params = _train(params, epoch_fn, lr, x_tr, y_tr, k_data, 0, s.corr_epochs)
        (tl, ta), (vl, va) = cls.evaluate(params, x_tr, y_tr), cls.evaluate(params, x_va, y_va)
        entry = dict(
          seed=seed, learning_rate=lr, batch_size=bs, train_loss=float(tl), train_acc=float(ta),
          val_loss=float(vl), val_acc=float(va),
          **{k: float(v) for k, v in measure(params, x_m, y_m).items()},
        )  # fmt: skip
        orbit = {k: [] for k in (*MEASURES, "val_loss")}
        zeros = SYMMETRY.algebra_zeros(params)
        for j in range(s.orbit_points):
          keys = jax.random.split(jax.random.key(1000 * seed + j), len(zeros))
          xi = tuple(
            s.orbit_scale * jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, zeros)
          )
          moved = act(params, xi)
          for k, v in measure(moved, x_m, y_m).items():
            orbit[k].append(float(v))
          orbit["val_loss"].append(float(cls.evaluate(moved, x_va, y_va)[0]))
        entry["orbit"] = orbit
        minima.append(entry)
        progress.update(1)
  return dict(minima=minima)


# --------------------------------------------------------------------- summary
def _correlations(minima) -> list[dict]:
  from scipy import stats

  rows = []
  keys = (*MEASURES, "val_loss", "train_loss")
  finite = [m for m in minima if all(np.isfinite(m[k]) for k in keys)]
  for measure in MEASURES:
    for target in CORRELATION_TARGETS:
      a = np.asarray([m[measure] for m in finite], np.float64)
      if target == "gap":
        b = np.asarray([m["val_loss"] - m["train_loss"] for m in finite], np.float64)
      else:
        b = np.asarray([m[target] for m in finite], np.float64)
      row = dict(measure=measure, target=target, n=len(a))
      if len(a) >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
        pr, pp = stats.pearsonr(a, b)
        sr, sp = stats.spearmanr(a, b)
        row.update(
          pearson_r=float(pr), pearson_p=float(pp), spearman_rho=float(sr), spearman_p=float(sp)
        )
      else:
        row.update(pearson_r=None, pearson_p=None, spearman_rho=None, spearman_p=None)
      rows.append(row)
  return rows


def _orbit_spread(minima) -> list[dict]:
  """Spread of each measure within orbits (median over minima) vs across minima."""
  rows = []
  for measure in MEASURES:
    within = []
    for m in minima:
      vals = np.asarray([m[measure], *m["orbit"][measure]], np.float64)
      if np.all(np.isfinite(vals)) and np.min(np.abs(vals)) > 0:
        within.append(float(np.max(vals) / np.min(vals)))
    across = np.asarray([m[measure] for m in minima], np.float64)
    across = across[np.isfinite(across)]
    above = [v > m[measure] for m in minima for v in m["orbit"][measure]]
    rows.append(
      dict(
        measure=measure,
        within_orbit_max_over_min=float(np.median(within)) if within else None,
        # fraction of random orbit points with a larger value than the SGD point itself
        orbit_points_above_sgd_point=float(np.mean(above)) if above else None,
        across_minima_max_over_min=float(across.max() / across.min())
        if across.size and across.min() > 0
        else None,
      )
    )
  drifts = [
    abs(v - m["val_loss"]) / abs(m["val_loss"]) for m in minima for v in m["orbit"]["val_loss"]
  ]
  rows.append(
    dict(
      measure="val_loss",
      within_orbit_max_over_min=1.0 + (max(drifts) if drifts else 0.0),
      across_minima_max_over_min=float(
        max(m["val_loss"] for m in minima) / min(m["val_loss"] for m in minima)
      ),
    )
  )
  return rows


def _paired(diff) -> tuple[float, float, float | None]:
  from scipy import stats

  d = np.asarray(diff, np.float64)
  if d.size < 2 or not np.all(np.isfinite(d)) or np.all(d == d[0]):
    return float(np.mean(d)), float(np.std(d)), None
  return float(np.mean(d)), float(np.std(d)), float(stats.ttest_rel(d, np.zeros_like(d)).pvalue)


def run(config: common.RunConfig, progress=None, settings: Settings | None = None) -> dict:
  """Runs both studies, writes two plots, returns the summary section.

  Args:
    config: the ``reproduce`` configuration.
    progress: a tqdm-like sink (see :func:`num_units`).
    settings: overrides :func:`default_settings` (tests use tiny sizes).
  """
  progress = progress or common.NullProgress()
  s = settings or default_settings(config)
  ds = data_lib.load_classification_data(
    config.data_dir, max_train=s.max_train, max_val=s.max_val, seed=0
  )
  t0 = time.perf_counter()
  rec = teleport_study(ds, s, progress)
  t1 = time.perf_counter()
  corr = correlation_study(ds, s, progress)
  t2 = time.perf_counter()
  te = s.teleport_epoch
  runs, table = {}, []
  sgd_final = rec["sgd"]["val_loss"][:, -1]
  for m, r in rec.items():
    ok = np.all(np.isfinite(r["val_loss"]), 1) & np.all(np.isfinite(r["train_loss"]), 1)
    # statistics over the seeds that stayed finite; nonfinite_runs says how many did not
    vl_mean, vl_std = common.mean_std(r["val_loss"][ok])
    va_mean, va_std = common.mean_std(r["val_acc"][ok])
    entry = dict(
      nonfinite_runs=int(np.sum(~ok)),
      n_seeds=len(ok),
      val_loss=common.finite_list(vl_mean),
      val_loss_std=common.finite_list(vl_std),
      val_accuracy=common.finite_list(va_mean),
      val_accuracy_std=common.finite_list(va_std),
      train_loss=common.finite_list(np.mean(r["train_loss"][ok], 0)),
      final_val_loss_per_seed=common.finite_list(r["val_loss"][:, -1]),
      measures_at_end={k: common.finite_list(v) for k, v in r["end"].items()},
    )
    row = dict(
      method=m,
      val_loss_after_teleport=float(vl_mean[te]),
      val_loss_next_epoch=float(vl_mean[min(te + 1, s.epochs)]),
      val_loss_end=float(vl_mean[-1]),
      val_loss_end_std=float(vl_std[-1]),
      val_acc_end=float(va_mean[-1]),
      val_acc_end_std=float(va_std[-1]),
      train_loss_end=float(np.mean(r["train_loss"][ok, -1])),
      nonfinite=int(np.sum(~ok)),
    )
    if m != "sgd":
      diff = r["val_loss"][:, -1] - sgd_final
      diff_mean, diff_std, p = _paired(diff[np.isfinite(diff)])
      kind = dict((n, k) for n, k, _ in TELEPORTS)[m]
      maximize = dict((n, mx) for n, _, mx in TELEPORTS)[m]
      before, after = np.asarray(r["before"][kind]), np.asarray(r["after"][kind])
      moved = bool(np.all(after > before) if maximize else np.all(after < before))
      entry.update(
        objective=kind,
        maximize=maximize,
        objective_before=common.finite_list(before),
        objective_after=common.finite_list(after),
        measures_before={k: common.finite_list(v) for k, v in r["before"].items()},
        measures_after={k: common.finite_list(v) for k, v in r["after"].items()},
        moved_in_requested_direction=moved,
        rel_loss_drift=common.finite_list(r["drift"]),
        max_rel_loss_drift=float(np.max(r["drift"])),
        accepted=r["accepted"],
        teleport_wall_s=common.finite_list(r["wall_s"]),
        val_loss_change_at_teleport=float(
          np.max(np.abs(r["val_loss"][:, te] - rec["sgd"]["val_loss"][:, te]))
        ),
        final_val_loss_diff_vs_sgd=dict(
          mean=diff_mean, std=diff_std, paired_t_p=p, n=int(np.sum(np.isfinite(diff)))
        ),
      )
      row.update(
        objective_before=float(np.mean(before)),
        objective_after=float(np.mean(after)),
        objective_end=float(np.mean(np.asarray(r["end"][kind])[ok])),
        moved=moved,
        d_val_loss_vs_sgd=diff_mean,
        d_std=diff_std,
        paired_p=p,
        max_rel_drift=float(np.max(r["drift"])),
      )
    runs[m] = entry
    table.append(row)
  minima = corr["minima"]
  corr_rows = _correlations(minima)
  spread_rows = _orbit_spread(minima)
  _plot(rec, minima, s, config)
  summary = dict(
    dataset=ds.name,
    dataset_note=ds.note,
    protocol=dict(
      widths=[ds.num_features, s.hidden, s.hidden, ds.num_classes],
      n_train=len(ds.y_train),
      n_val=len(ds.y_val),
      symmetry="PositiveRescaling (both hidden layers)",
      settings={
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()
      },
      teleports={m: dict(objective=k, maximize=mx) for m, k, mx in TELEPORTS},
      teleport=common.describe_teleport(
        teleport_config(s, switch_objective(s)),
        schedule=f"once, after epoch {s.teleport_epoch}, on the first {s.measure_size} "
        "training examples",
        stability=None,
      )
      | dict(
        objective=f"sharpness (radius {s.radius:g}, {s.num_samples} samples) or orbit "
        f"curvature ({s.num_directions} directions), raised or lowered"
      ),
    ),
    runs=runs,
    table=table,
    correlation_table=corr_rows,
    orbit_spread_table=spread_rows,
    minima=minima,
    timing=dict(teleport_study_s=t1 - t0, correlation_study_s=t2 - t1),
    targets=dict(
      teleports_moved_their_objective=all(
        runs[m]["moved_in_requested_direction"] for m, _, _ in TELEPORTS
      ),
      every_teleport_accepted=all(all(runs[m]["accepted"]) for m, _, _ in TELEPORTS),
      every_teleport_within_rtol=all(
        runs[m]["max_rel_loss_drift"] <= common.RTOL_FLOAT32 for m, _, _ in TELEPORTS
      ),
    ),
  )
  summary["notes"] = [ds.note, *_notes(summary, s)]
  return summary


def _fmt_p(p) -> str:
  return "-" if p is None else f"{p:.2g}"


def _notes(summary, s: Settings) -> list[str]:
  runs = summary["runs"]
  notes = [
    f"Teleport study: {len(s.seeds)} seeds, teleport after epoch {s.teleport_epoch} of "
    f"{s.epochs} (PositiveRescaling, {s.num_steps} solver steps capped at "
    f"{s.max_step_size}); validation loss unchanged by every teleport up to "
    f"{max(runs[m]['val_loss_change_at_teleport'] for m, _, _ in TELEPORTS):.1e} "
    "(the network function is the same)."
  ]
  for m, kind, _ in TELEPORTS:
    r = runs[m]
    b, a = np.mean(r["objective_before"]), np.mean(r["objective_after"])
    d = r["final_val_loss_diff_vs_sgd"]
    sig = d["paired_t_p"] is not None and d["paired_t_p"] < 0.05
    moved = (
      "moved as requested"
      if r["moved_in_requested_direction"]
      else "NOT moved as requested in every seed"
    )
    diverged = (
      f"SGD diverged after the teleport in {r['nonfinite_runs']} of {r['n_seeds']} seeds; "
      if r["nonfinite_runs"]
      else ""
    )
    notes.append(
      f"{m}: {kind} {b:.4g} -> {a:.4g} ({moved}); {diverged}"
      f"final validation loss {d['mean']:+.2g} +- {d['std']:.2g} vs sgd (paired over "
      f"{d['n']} seeds, p={_fmt_p(d['paired_t_p'])}): "
      + ("significant at 5%." if sig else "no significant effect.")
    )
  n = len(summary["minima"])
  corr = {(r["measure"], r["target"]): r for r in summary["correlation_table"]}
  confounded = []
  for measure in MEASURES:
    rows = [corr[(measure, t)] for t in CORRELATION_TARGETS]
    if any(r["pearson_r"] is None for r in rows):
      continue
    parts = [
      f"{t}: Pearson {r['pearson_r']:+.2f} (p={_fmt_p(r['pearson_p'])}), Spearman "
      f"{r['spearman_rho']:+.2f} (p={_fmt_p(r['spearman_p'])})"
      for t, r in zip(CORRELATION_TARGETS, rows)
    ]
    notes.append(f"Across {n} minima, corr({measure}, .) with " + "; ".join(parts) + ".")
    val, train = rows[0]["spearman_rho"], rows[2]["spearman_rho"]
    if val * train > 0 and abs(train) >= abs(val) - 0.1:
      confounded.append(measure)
  if confounded:
    notes.append(
      f"{', '.join(confounded)}: the rank correlation with the training loss is as strong as "
      "with the validation loss, so across these minima the measure mostly tracks how far "
      "training got (learning rate and batch size set it), not generalisation as such."
    )
  gap = [corr[(m, "gap")]["spearman_rho"] for m in MEASURES if corr[(m, "gap")]["n"] >= 3]
  gap = [g for g in gap if g is not None]
  if gap and all(g < 0 for g in gap):
    notes.append(
      "With the generalisation gap (validation minus training loss) every measure correlates "
      "negatively: here the sharper, more curved minima overfit less, the opposite of the "
      "flat-minima hypothesis (and also explained by training progress: runs that fit the "
      "training set less have a smaller gap)."
    )
  spread = {r["measure"]: r for r in summary["orbit_spread_table"]}
  w = spread["sharpness"]["within_orbit_max_over_min"]
  c = spread["curvature"]["within_orbit_max_over_min"]
  rel = spread["relative_sharpness"]["within_orbit_max_over_min"]
  if None not in (w, c, rel, spread["sharpness"]["orbit_points_above_sgd_point"]):
    notes.append(
      f"On random points of one rescaling orbit (log-scales ~ N(0, {s.orbit_scale}^2)) the "
      f"validation loss is unchanged (rel. change <= "
      f"{spread['val_loss']['within_orbit_max_over_min'] - 1:.1e}) while the sharpness varies "
      f"by a factor {w:.3g} and the curvature by {c:.3g} (median over minima; across minima: "
      f"{spread['sharpness']['across_minima_max_over_min']:.3g} and "
      f"{spread['curvature']['across_minima_max_over_min']:.3g}); "
      f"{100 * spread['sharpness']['orbit_points_above_sgd_point']:.0f}% of the random orbit "
      "points are sharper and "
      f"{100 * (1 - spread['curvature']['orbit_points_above_sgd_point']):.0f}% less curved than "
      "the point SGD found; the relative sharpness is "
      f"invariant ({rel:.6g}). The absolute measures are thus not functions of the trained "
      "network alone: a correlation across minima can only hold because SGD does not land on "
      "arbitrary points of each orbit, and a teleport can change them without changing any "
      "prediction."
    )
  return notes


@plotting.styled
def _plot(rec, minima, s: Settings, config) -> None:
  from matplotlib.ticker import NullFormatter

  fig, (ax, ax_diff) = plotting.panels(
    2,
    xlabel="epoch",
    ylabel=["validation loss", "validation loss minus sgd's (same seed)"],
    titles=[
      f"teleport after epoch {s.teleport_epoch}; mean over {len(s.seeds)} seeds,\n"
      "band: sgd's mean ± std",
      "paired difference to sgd,\nmean ± std over seeds",
    ],
    panel_size=(5.6, 3.8),
  )
  first = max(s.teleport_epoch - 3, 0)
  epochs = np.arange(first, s.epochs + 1)
  base = rec["sgd"]["val_loss"][:, first:]
  colors = plotting.colors(list(rec))
  for m, r in rec.items():
    ok = np.all(np.isfinite(r["val_loss"]), 1)
    if not np.any(ok):
      continue
    vl = r["val_loss"][:, first:]
    mean, std = common.mean_std(vl[ok])
    ax.plot(epochs, mean, color=colors[m], lw=1.5, label=m)
    if m == "sgd":  # one band: the others' spread is the right panel's
      ax.fill_between(epochs, mean - std, mean + std, color=colors[m], alpha=0.15, lw=0)
    d_mean, d_std = common.mean_std((vl - base)[ok])  # paired: same seed, same minibatches
    ax_diff.plot(epochs, d_mean, color=colors[m], lw=1.5, label=m)
    if m != "sgd":
      ax_diff.fill_between(epochs, d_mean - d_std, d_mean + d_std, color=colors[m], alpha=0.1)
  for a in (ax, ax_diff):  # every method but sgd teleports there
    plotting.mark_teleports(a, [s.teleport_epoch])
  plotting.legend(fig)
  plotting.savefig(fig, config.out_dir / "generalization_teleport.png")

  from matplotlib import colors as mcolors

  fig, axes = plotting.panels(
    len(MEASURES),
    xlabel=[m.replace("_", " ") for m in MEASURES],
    ylabel="validation loss",
    suptitle=f"{len(minima)} minima of SGD: measure vs validation loss; grey: the measure's "
    f"range on {s.orbit_points} random points\nof each minimum's rescaling orbit (same "
    "validation loss)",
  )
  log_lrs = [np.log10(m["learning_rate"]) for m in minima]
  norm = mcolors.Normalize(vmin=min(log_lrs) - 0.1, vmax=max(log_lrs) + 0.1)
  batch_sizes = sorted({m["batch_size"] for m in minima})
  markers = dict(zip(batch_sizes, "os^Dv<>"))
  scatter = None
  for ax, measure in zip(axes, MEASURES):
    for m in minima:
      xs = [m[measure], *m["orbit"][measure]]
      ax.plot([min(xs), max(xs)], [m["val_loss"]] * 2, color="0.75", lw=1, zorder=0)
      scatter = ax.scatter(
        [m[measure]],
        [m["val_loss"]],
        s=30,
        c=[np.log10(m["learning_rate"])],
        cmap="viridis",
        norm=norm,
        marker=markers[m["batch_size"]],
        edgecolors="k",
        linewidths=0.3,
      )
    values = [v for m in minima for v in (m[measure], *m["orbit"][measure]) if v > 0]
    if values and max(values) > 10 * min(values):  # a log axis needs a decade to show ticks
      ax.set_xscale("log")
      ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
  extra = [plotting.proxy(f"batch {b}", ls="", marker=markers[b], color="0.4") for b in batch_sizes]
  extra.append(plotting.proxy("range along the orbit", color="0.75", lw=1))
  plotting.legend(fig, extra=extra)
  if scatter is not None:
    bar = fig.colorbar(scatter, ax=axes, shrink=0.9, pad=0.01)
    bar.set_label("log10 learning rate")
  plotting.savefig(fig, config.out_dir / "generalization_correlation.png")
