"""Teleporting without a group: Lie-algebra, null-space and level-set back-ends compared.

Three back-ends propose the teleport's inner steps behind the same driver
(guard, statuses, ``rtol``):

* ``lie``: ascent on a symmetry group's Lie algebra (here the exact
  data-dependent GL action on the regression problem, positive rescaling on
  the classification problem, as in their own experiments);
* ``nullspace``: no group; the objective's gradient projected per layer onto
  the null space of the layer's input batch (:class:`teleport_jax.solvers.NullSpace`);
* ``levelset``: no group; tangent steps on the loss level set with Newton
  corrections back onto it (:class:`teleport_jax.solvers.LevelSet`).

Every back-end optimises the same objective (the loss after 5 steps of the
training optimizer, :func:`teleport_jax.objectives.lookahead_loss`), with the same number
of inner steps, and every teleport is checked by the driver.

Problems:

* ``regression``: the published MLP regression problem
  (:func:`teleport_jax.experiments.regression.make_problem`: X 5x4, three
  LeakyReLU layers, full batch), GD with lr 1e-4, one teleport at epoch 5 (30
  inner steps), 5 seeds and 300 epochs (``--quick``: 2 seeds, 100 epochs).
  The held-out data are 200 fresh samples from the same distribution (inputs and
  targets uniform on [0, 1)).
* ``classification``: the digits MLP of
  :mod:`teleport_jax.experiments.classification` (64-64 LeakyReLU, SGD lr 0.1,
  batch 32), teleports on the first minibatch of each of the first 3 epochs
  (10 inner steps), 3 seeds and 30 epochs (``--quick``: 1 seed, 4 epochs). The
  held-out data are the validation set.

Per teleport: the relative loss change on the teleport batch (the driver's
``rel_loss_drift``) and on the held-out data (:func:`teleport_jax.solvers.held_out_drift`),
the objective before and after, and the wall-clock cost in gradient
evaluations (the compiled teleport's time over one compiled ``value_and_grad``
of the loss on the same batch). Training is GD/SGD with the teleport applied
between steps, exactly as :func:`teleport_jax.with_teleport` does it (teleport,
then the optimizer step from the teleported point on the same batch).

Also: ten level-set teleports in a row from the regression problem's epoch-5
point, each from the previous one's result, with the loss change relative to
the first point.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import teleport_jax as tj
from teleport_jax._src.solver.nullspace import held_out_drift
from teleport_jax.experiments import classification as cls_lib
from teleport_jax.experiments import common
from teleport_jax.experiments import data as data_lib
from teleport_jax.experiments import plotting
from teleport_jax.experiments import regression as reg_lib

BACKENDS = ("lie", "nullspace", "levelset")
REG_EPOCHS_REPORTED = (50, 100, 300)
REG_STEPS = 30
CLS_STEPS = 10
CLS_TELEPORT_EPOCHS = 3
LEVELSET_TARGET = 4.5  # mean loss at epoch 50 (regression)
NUM_REPEATS = 10


def _sizes(config: common.RunConfig) -> dict:
  if config.quick:
    return dict(reg_seeds=(0, 1), reg_epochs=100, cls_seeds=(0,), cls_epochs=4)
  return dict(reg_seeds=(0, 1, 2, 3, 4), reg_epochs=300, cls_seeds=(0, 1, 2), cls_epochs=30)


def num_units(config: common.RunConfig) -> int:
  """Progress units of :func:`run`: one per (problem, method, seed)."""
  s = _sizes(config)
  return (1 + len(BACKENDS)) * (len(s["reg_seeds"]) + len(s["cls_seeds"]))


def _time(fn, *args, repeats: int = 5, min_sample_s: float = 5e-3) -> float:
  """Median per-call wall-clock of a compiled function (after a warm-up call); a
  sample repeats a fast call until it lasts ``min_sample_s``."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  number = int(min(1000, max(1, min_sample_s / max(time.perf_counter() - t, 1e-7))))
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(number):
      jax.block_until_ready(fn(*args))
    out.append((time.perf_counter() - t) / number)
  return float(np.median(out))


def _teleport_fn(loss, backend: str, symmetry, objective, num_steps: int):
  """A jitted ``(params, data) -> (new_params, info)`` for one back-end."""
  # one teleport per start point: no stability bound, as in the published protocol
  kwargs = dict(objective=objective, num_steps=num_steps, stability=False)
  if backend == "lie":
    kwargs.update(symmetry=symmetry, solver=tj.solvers.Lie(step_size=0.1))
  else:
    kwargs.update(solver=backend)
  return jax.jit(lambda p, d: tj.teleport(loss, p, d, **kwargs))


def _record(info, batch_drift_extra: dict) -> dict:
  return dict(
    status=tj.TeleportStatus(int(info.status)).name,
    rel_loss_drift=float(info.rel_loss_drift),
    objective_before=float(info.objective_before),
    objective_after=float(info.objective_after),
    num_accepted_steps=int(info.num_accepted_steps),
    **batch_drift_extra,
  )


# ---------------------------------------------------------------- regression
def _reg_loss(params, data):
  return reg_lib.loss_fn(params, *data)


def _held_out(seed: int, n: int = 200):
  kx, ky = jax.random.split(jax.random.key(10_000 + seed))
  x = jax.random.uniform(kx, (reg_lib.DIMS[1], n), jnp.float32)
  y = jax.random.uniform(ky, (reg_lib.DIMS[-1], n), jnp.float32)
  return x, y


def run_regression(seeds, epochs, progress=None, fns=None) -> dict:
  """GD with one teleport at epoch 5 per back-end; returns curves and teleport records."""
  progress = progress or common.NullProgress()
  lr = reg_lib.GD_LR
  gd = jax.jit(lambda p, d: optax.tree.add_scale(p, -lr, jax.grad(_reg_loss)(p, d)))
  loss_jit = jax.jit(_reg_loss)
  grad_jit = jax.jit(jax.value_and_grad(_reg_loss))
  drift_jit = jax.jit(lambda p, q, d: held_out_drift(_reg_loss, p, q, d))
  fns = fns or _regression_teleports()
  out = {}
  for method in ("gd", *BACKENDS):
    curves, records, costs = [], [], []
    for seed in seeds:
      params, x, y = reg_lib.make_problem(seed)
      data = (x, y)
      losses = []
      for epoch in range(epochs):
        if epoch == reg_lib.TELEPORT_EPOCH and method != "gd":
          new, info = fns[method](params, data)
          held = float(drift_jit(params, new, _held_out(seed)))
          cost = _time(fns[method], params, data, repeats=3) / _time(grad_jit, params, data)
          records.append(_record(info, dict(held_out_drift=held, cost_grad_evals=cost)))
          costs.append(cost)
          params = new
        losses.append(float(loss_jit(params, data)))
        params = gd(params, data)
      curves.append(losses)
      progress.update(1)
    out[method] = dict(losses=np.asarray(curves, np.float64), records=records)
  return out


def _regression_teleports() -> dict:
  objective = tj.objectives.lookahead_loss(reg_lib.GD_LR, 5)
  sym = reg_lib.symmetry("exact")
  return {b: _teleport_fn(_reg_loss, b, sym, objective, REG_STEPS) for b in BACKENDS}


def repeated_levelset(num: int = NUM_REPEATS, fn=None) -> dict:
  """Ten level-set teleports in a row from the regression problem's epoch-5 point (seed 0)."""
  lr = reg_lib.GD_LR
  params, x, y = reg_lib.make_problem(0)
  data = (x, y)
  gd = jax.jit(lambda p, d: optax.tree.add_scale(p, -lr, jax.grad(_reg_loss)(p, d)))
  for _ in range(reg_lib.TELEPORT_EPOCH):
    params = gd(params, data)
  fn = fn or _regression_teleports()["levelset"]
  l0 = float(_reg_loss(params, data))
  drifts, statuses, objectives, moved = [], [], [], []
  p = params
  for _ in range(num):
    q, info = fn(p, data)
    moved.append(float(optax.tree.norm(optax.tree.sub(q, p))))
    p = q
    drifts.append(abs(float(_reg_loss(p, data)) - l0) / l0)
    statuses.append(tj.TeleportStatus(int(info.status)).name)
    objectives.append(float(info.objective_after))
  rtol = tj.default_rtol(jnp.float32)
  return dict(
    cumulative_rel_drift=drifts,
    statuses=statuses,
    objective_after=objectives,
    step_norm=moved,
    rtol=rtol,
    all_within_rtol=bool(max(drifts) <= rtol),
  )


# ------------------------------------------------------------ classification
def run_classification(config, seeds, epochs, progress=None) -> dict:
  """SGD with teleports on the first minibatch of each of the first 3 epochs."""
  progress = progress or common.NullProgress()
  s = cls_lib.Settings(epochs=epochs, seeds=tuple(seeds))
  ds = data_lib.load_classification_data(
    config.data_dir, max_train=5000, max_val=5000, seed=0, source=config.data_source
  )
  x_tr, y_tr = jnp.asarray(ds.x_train, jnp.float32), jnp.asarray(ds.y_train, jnp.int32)
  x_va, y_va = jnp.asarray(ds.x_val, jnp.float32), jnp.asarray(ds.y_val, jnp.int32)
  bs = min(s.batch_size, len(ds.y_train))
  steps = len(ds.y_train) // bs
  widths = (ds.num_features, s.hidden, s.hidden, ds.num_classes)
  epoch_fn = cls_lib.make_epoch_fn(optax.sgd(s.learning_rate), bs, steps)

  def loss(p, d):
    return cls_lib.loss_fn(p, *d)

  objective = tj.objectives.lookahead_loss(s.learning_rate, cls_lib.LOOKAHEAD_STEPS)
  fns = {b: _teleport_fn(loss, b, tj.PositiveRescaling(), objective, CLS_STEPS) for b in BACKENDS}
  grad_jit = jax.jit(jax.value_and_grad(loss))
  drift_jit = jax.jit(lambda p, q, d: held_out_drift(loss, p, q, d))
  out = {}
  for method in ("sgd", *BACKENDS):
    rows = {k: [] for k in ("train_loss", "val_loss", "val_acc")}
    records = []
    for seed in seeds:
      k_init, k_data = jax.random.split(jax.random.key(seed))
      params = cls_lib.init_params(k_init, widths)
      state = optax.sgd(s.learning_rate).init(params)
      curve = {k: [] for k in rows}

      def record(p, curve=curve):
        (tl, _), (vl, va) = cls_lib.evaluate(p, x_tr, y_tr), cls_lib.evaluate(p, x_va, y_va)
        curve["train_loss"].append(float(tl))
        curve["val_loss"].append(float(vl))
        curve["val_acc"].append(float(va))

      record(params)
      for epoch in range(epochs):
        key = jax.random.fold_in(k_data, epoch)
        if method != "sgd" and epoch < CLS_TELEPORT_EPOCHS:
          first = jax.random.permutation(key, x_tr.shape[0])[:bs]  # the epoch's first minibatch
          batch = (x_tr[first], y_tr[first])
          new, info = fns[method](params, batch)
          extra = dict(
            held_out_drift=float(drift_jit(params, new, (x_va, y_va))),
            train_set_drift=float(drift_jit(params, new, (x_tr, y_tr))),
          )
          if epoch == 0:
            t_tel = _time(fns[method], params, batch, repeats=3)
            extra["cost_grad_evals"] = t_tel / _time(grad_jit, params, batch)
          records.append(_record(info, extra))
          params = new
        params, state, _ = epoch_fn(params, state, x_tr, y_tr, key)
        record(params)
      for k in rows:
        rows[k].append(curve[k])
      progress.update(1)
    out[method] = dict(**{k: np.asarray(v, np.float64) for k, v in rows.items()}, records=records)
  out["_dataset"] = dict(name=ds.name, note=ds.note, steps_per_epoch=steps, batch_size=bs)
  return out


# ------------------------------------------------------------------- summary
def _mean(values) -> float | None:
  v = [x for x in values if x is not None and np.isfinite(x)]
  return float(np.mean(v)) if v else None


def _max(values) -> float | None:
  v = [x for x in values if x is not None and np.isfinite(x)]
  return float(np.max(v)) if v else None


def _at(curves: np.ndarray, epoch: int) -> float:
  e = min(epoch, curves.shape[1] - 1)
  with np.errstate(invalid="ignore"):
    return float(np.mean(curves[:, e]))


def _teleport_columns(records) -> dict:
  gains = [r["objective_before"] / r["objective_after"] for r in records if r["objective_after"]]
  return {
    "accepted": f"{sum(r['status'] == 'SUCCESSFUL' for r in records)}/{len(records)}",
    "batch_drift_max": _max([r["rel_loss_drift"] for r in records]),
    "held_out_drift_mean": _mean([r["held_out_drift"] for r in records]),
    "objective_gain": _mean(gains),
    "cost_grad_evals": _mean([r.get("cost_grad_evals") for r in records]),
  }


def run(config: common.RunConfig, progress=None) -> dict:
  """Runs both problems and the repeated level-set calls; writes ``backends_regression.png``."""
  s = _sizes(config)
  fns = _regression_teleports()
  reg = run_regression(s["reg_seeds"], s["reg_epochs"], progress, fns)
  repeats = repeated_levelset(fn=fns["levelset"])
  cls = run_classification(config, s["cls_seeds"], s["cls_epochs"], progress)
  ds_info = cls.pop("_dataset")
  e_last = s["reg_epochs"] - 1
  table, cls_table, runs = [], [], {}
  for m, r in reg.items():
    losses = r["losses"]
    row = {"method": "gd" if m == "gd" else f"gd_{m}"}
    for e in REG_EPOCHS_REPORTED:
      if e - 1 <= e_last:
        row[f"loss@{min(e, e_last)}"] = _at(losses, e)
    row["nonfinite"] = int(np.sum(~np.all(np.isfinite(losses), axis=1)))
    if r["records"]:
      row.update(_teleport_columns(r["records"]))
    table.append(row)
    runs[f"regression/{m}"] = dict(
      loss_mean=common.finite_list(np.mean(losses, 0)),
      final_loss_per_seed=common.finite_list(losses[:, -1]),
      loss_at_50_per_seed=common.finite_list(losses[:, min(50, e_last)]),
      loss_per_seed_at={
        str(min(e, e_last)): common.finite_list(losses[:, min(e, e_last)])
        for e in REG_EPOCHS_REPORTED
      },
      nonfinite_runs=row["nonfinite"],
      n_seeds=int(losses.shape[0]),
      teleports=r["records"],
    )
  for m, r in cls.items():
    row = {"method": "sgd" if m == "sgd" else f"sgd_{m}"}
    row["train_loss"] = _at(r["train_loss"], 10**9)
    row["val_loss"] = _at(r["val_loss"], 10**9)
    row["val_acc"] = _at(r["val_acc"], 10**9)
    row["nonfinite"] = int(np.sum(~np.all(np.isfinite(r["train_loss"]), axis=1)))
    if r["records"]:
      row.update(_teleport_columns(r["records"]))
    cls_table.append(row)
    runs[f"classification/{m}"] = dict(
      train_loss=common.finite_list(np.mean(r["train_loss"], 0)),
      val_loss=common.finite_list(np.mean(r["val_loss"], 0)),
      val_acc=common.finite_list(np.mean(r["val_acc"], 0)),
      final_train_loss_per_seed=common.finite_list(r["train_loss"][:, -1]),
      final_val_loss_per_seed=common.finite_list(r["val_loss"][:, -1]),
      final_val_acc_per_seed=common.finite_list(r["val_acc"][:, -1]),
      nonfinite_runs=row["nonfinite"],
      n_seeds=int(r["train_loss"].shape[0]),
      teleports=r["records"],
    )
  _plot(reg, cls, config)
  ls50 = _at(reg["levelset"]["losses"], 50)
  rtol = tj.default_rtol(jnp.float32)
  all_records = [x for r in (*reg.values(), *cls.values()) for x in r["records"]]
  targets = {
    "epoch": min(50, e_last),
    "levelset_loss_at_50": ls50,
    "levelset_le_4_5_at_epoch_50": bool(ls50 <= LEVELSET_TARGET),
    "levelset_no_nonfinite_seed": bool(np.all(np.isfinite(reg["levelset"]["losses"]))),
    "every_teleport_within_rtol_on_its_batch": all(
      r["rel_loss_drift"] <= rtol for r in all_records if r["status"] == "SUCCESSFUL"
    ),
    "ten_levelset_calls_within_rtol": repeats["all_within_rtol"],
  }
  notes = [
    ds_info["note"],
    "held_out_drift: relative loss change of a teleport on data it did not see "
    "(regression: 200 fresh samples; classification: the validation set). The "
    "data-dependent GL action (lie, regression) and both group-free back-ends keep "
    "the loss on the teleport batch only; positive rescaling (lie, classification) "
    "keeps it everywhere.",
    "ten level-set calls in a row (regression, seed 0, epoch 5): cumulative relative "
    "loss change "
    + ", ".join(f"{d:.1e}" for d in repeats["cumulative_rel_drift"])
    + f" (rtol {rtol:g}); step norms "
    + ", ".join(f"{d:.2g}" for d in repeats["step_norm"])
    + "; look-ahead objective after each call "
    + ", ".join(f"{d:.3g}" for d in repeats["objective_after"])
    + f"; statuses {sorted(set(repeats['statuses']))}.",
  ]
  return dict(
    protocol=dict(
      regression=dict(
        problem="regression.make_problem (X 5x4, LeakyReLU(0.1), widths 5-6-7-8)",
        optimizer=f"GD lr {reg_lib.GD_LR}",
        teleport_epoch=reg_lib.TELEPORT_EPOCH,
        inner_steps=REG_STEPS,
        objective="lookahead_loss(lr=1e-4, steps=5)",
        lie_symmetry="DataDependentGL (exact)",
        seeds=list(s["reg_seeds"]),
        epochs=s["reg_epochs"],
        held_out="200 fresh uniform samples per seed",
      ),
      classification=dict(
        dataset=ds_info["name"],
        widths="features-64-64-classes, LeakyReLU(0.1)",
        optimizer="SGD lr 0.1",
        batch_size=ds_info["batch_size"],
        teleports="first minibatch of each of the first 3 epochs",
        inner_steps=CLS_STEPS,
        objective="lookahead_loss(lr=0.1, steps=5)",
        lie_symmetry="PositiveRescaling",
        seeds=list(s["cls_seeds"]),
        epochs=s["cls_epochs"],
        held_out="validation set",
      ),
      backends={"lie": "Lie(step_size=0.1)", "nullspace": "NullSpace()", "levelset": "LevelSet()"},
    ),
    runs=runs,
    repeated_levelset=repeats,
    table=table,
    classification_table=cls_table,
    repeated_levelset_table=[
      dict(call=i + 1, cumulative_rel_drift=d, step_norm=n, lookahead_after=o, status=st)
      for i, (d, n, o, st) in enumerate(
        zip(
          repeats["cumulative_rel_drift"],
          repeats["step_norm"],
          repeats["objective_after"],
          repeats["statuses"],
        )
      )
    ],
    targets=targets,
    notes=notes,
  )


@plotting.styled
def _plot(reg, cls, config) -> None:
  fig, (ax, ax2) = plotting.panels(
    2,
    xlabel="epoch",
    ylabel=["training loss", "cross-entropy"],
    titles=[
      "regression (published MLP),\nmean ± std over seeds",
      "digits classification,\nmean over seeds",
    ],
    panel_size=(5.6, 3.8),
  )

  def label(m):
    return "no teleport" if m in ("gd", "sgd") else f"teleport: {m} back-end"

  for m, r in reg.items():
    mean, std = common.mean_std(r["losses"])
    x = np.arange(len(mean))
    color = plotting.color(m)
    ax.plot(x, mean, color=color, label=label(m))
    ax.fill_between(x, np.maximum(mean - std, 1e-12), mean + std, color=color, alpha=0.2, lw=0)
    if m != "gd" and reg_lib.TELEPORT_EPOCH < len(mean):  # loss[e]: after the teleport
      e = reg_lib.TELEPORT_EPOCH
      plotting.mark_teleports(ax, [e], [mean[e]], color=color)
  ax.set_yscale("log")
  for m, r in cls.items():
    color = plotting.color(m)
    for key, ls in (("train_loss", "-"), ("val_loss", "--")):
      mean, _ = common.mean_std(r[key])
      x = np.arange(len(mean))
      ax2.plot(x, mean, color=color, ls=ls, label=label(m) if key == "train_loss" else None)
      if m != "sgd":  # at the start of these epochs: right after their point
        at = [e for e in range(CLS_TELEPORT_EPOCHS) if e < len(mean)]
        plotting.mark_teleports(ax2, x[at], mean[at], color=color)
  ax2.set_yscale("log")
  plotting.legend(
    fig,
    extra=[
      plotting.proxy("classification: train (solid)"),
      plotting.proxy("validation (dashed)", ls="--"),
    ],
  )
  plotting.savefig(fig, config.out_dir / "backends_regression.png")
