"""Wall-clock to a target loss: plain gradient descent vs teleporting gradient descent.

Each training run is one compiled ``lax.while_loop`` that stops at the first
point whose loss is at or below the target (or at a step cap), so the measured
time is the real time to the target, teleports included. Compilation is done
ahead of time and reported separately.

* Regression (the published MLP problem,
  :mod:`teleport_jax.experiments.regression`): ``make_optimizer("gd")`` vs
  ``make_optimizer("gd_teleport")`` (one exact data-dependent teleport at step
  5, 30 inner steps of the 5-step look-ahead objective). Target: the loss plain
  GD reaches at epoch 300 (per seed). One epoch is one full-batch step.
* Classification (:mod:`teleport_jax.experiments.classification`, scikit-learn's
  8x8 digits unless ``$TELEPORT_JAX_MNIST_DIR`` points at MNIST): minibatch SGD
  vs the ``sgd_teleport`` method (and ``sgd_teleport_lookahead`` in the full
  run), whose epoch function (one ``lax.scan`` over the minibatches) is
  repeated in the while loop; the loss on the whole training set is checked
  after every epoch. Target: the training loss plain SGD reaches after a few
  epochs (a modest target).

Peak memory: XLA's ``memory_analysis()`` of each compiled loop (argument,
output and temporary buffers), the process's maximum resident set size
(``resource.getrusage``, host memory, coarse: it is the peak of the whole
process so far) and, on GPUs, the device's ``peak_bytes_in_use``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import teleport_jax as tj
from benchmarks import _common as C
from teleport_jax.experiments import classification
from teleport_jax.experiments import data as data_lib
from teleport_jax.experiments import regression

# What-if variants of gd_teleport (full run): one setting changed each.
WHAT_IF = {
  "gd_teleport[num_steps=10]": dict(num_steps=10),
  "gd_teleport[num_steps=3]": dict(num_steps=3),
  "gd_teleport[look-ahead 1 step]": dict(lookahead=1),
  "gd_teleport[look-ahead unrolled]": dict(unrolled=True),
}


def unrolled_lookahead(learning_rate: float, num_steps: int) -> tj.objectives.Objective:
  """``tj.objectives.lookahead_loss`` with its gradient steps unrolled in Python instead of a
  ``lax.fori_loop`` (a user-level :class:`teleport_jax.objectives.Objective`)."""

  def fn(loss_fn, params, data):
    f = lambda p: loss_fn(p, data)  # noqa: E731
    loss0, g = jax.value_and_grad(f)(params)
    p = optax.tree.add_scale(params, -learning_rate, g)
    for _ in range(num_steps - 1):
      p = optax.tree.add_scale(p, -learning_rate, jax.grad(f)(p))
    return f(p), loss0

  return tj.objectives.Objective(
    fn, False, f"lookahead_unrolled(lr={learning_rate:g}, steps={num_steps})"
  )


SETTINGS = {
  "smoke": dict(
    reg_seeds=(0,), reg_epoch=30, reg_methods=("gd", "gd_teleport_smoke"), repeats=2,
    cls=False, cls_epochs=1, cls_methods=("sgd", "sgd_teleport"), cls_seeds=(0,),
  ),
  "quick": dict(
    reg_seeds=(0, 1), reg_epoch=300, reg_methods=("gd", "gd_teleport"), repeats=5,
    reg_harder_epochs=(1000, 3000),
    cls=True, cls_epochs=5, cls_methods=("sgd", "sgd_teleport"), cls_seeds=(0,),
  ),
  "full": dict(
    reg_seeds=(0, 1, 2, 3, 4), reg_epoch=300, repeats=11, reg_harder_epochs=(1000, 3000, 10000),
    reg_methods=("gd", "gd_teleport", *WHAT_IF),
    cls=True, cls_epochs=10, cls_methods=("sgd", "sgd_teleport", "sgd_teleport_lookahead"),
    cls_seeds=(0, 1, 2),
  ),
}  # fmt: skip


def _regression_optimizer(method: str):
  if method == "gd_teleport_smoke":  # cheap stand-in so the smoke test compiles fast
    return tj.with_teleport(
      optax.sgd(regression.GD_LR), tj.PositiveRescaling(), [5], num_steps=2, max_step_size=0.1
    )
  if method in WHAT_IF:
    kw = WHAT_IF[method]
    return tj.with_teleport(
      optax.sgd(regression.GD_LR),
      regression.symmetry("exact"),
      [regression.TELEPORT_EPOCH],
      objective=(
        unrolled_lookahead(regression.GD_LR, 5)
        if kw.get("unrolled")
        else tj.objectives.lookahead_loss(regression.GD_LR, kw.get("lookahead", 5))
      ),
      num_steps=kw.get("num_steps", 30),
      step_size=0.1,
    )
  return regression.make_optimizer(method)


def _make_until(opt, loss_fn):
  """``until(params, state, x, y, target, max_steps) -> (steps, params, state, loss)``.

  ``steps`` is the index of the first point whose loss is ``<= target`` (the
  number of optimizer updates it took to get there), or ``max_steps`` if none.
  """

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = opt.update(g, s, p, value_fn=loss_fn, x=x, y=y)
    return optax.apply_updates(p, u), s, loss

  def until(params, state, x, y, target, max_steps):
    def cond(c):
      i, _, _, loss = c
      return (loss > target) & (i < max_steps)

    def body(c):
      i, p, s, _ = c
      p, s, loss = step(p, s, x, y)  # loss at the point before this update
      return i + 1, p, s, loss

    inf = jnp.asarray(jnp.inf, x.dtype)
    i, p, s, loss = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), params, state, inf))
    reached = loss <= target
    return jnp.where(reached, i - 1, max_steps), p, s, loss

  return until


def _regression(cfg, notes):
  rows, details, compiled, sweep = [], [], {}, []
  params0, x0, y0 = regression.make_problem(cfg["reg_seeds"][0])
  i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  for m in cfg["reg_methods"]:
    opt = _regression_optimizer(m)
    fn = _make_until(opt, regression.loss_fn)
    compiled[m] = (
      opt,
      C.compile_fn(fn, params0, opt.init(params0), x0, y0, f32(0.0), i32(1)),
    )
  gd_opt, gd_until = compiled["gd"]
  epoch = cfg["reg_epoch"]
  tele_name = cfg["reg_methods"][1]
  for seed in cfg["reg_seeds"]:
    params, x, y = regression.make_problem(seed)
    # target: the loss plain GD reaches at epoch `epoch` (run with an unreachable target)
    _, _, _, target = gd_until(params, gd_opt.init(params), x, y, f32(-1.0), i32(epoch + 1))
    target = f32(float(target))
    cap = i32(3 * epoch)
    runs = {
      m: (lambda u=u, o=o: u(params, o.init(params), x, y, target, cap))
      for m, (o, u) in compiled.items()
    }
    out = {m: jax.block_until_ready(f()) for m, f in runs.items()}
    t = C.time_side_by_side(runs, repeats=cfg["repeats"], min_sample_s=0.01)
    steps = {m: int(o[0]) for m, o in out.items()}
    tg = t["gd"].median
    per_step_gd = tg / max(steps["gd"] + 1, 1)
    for m in cfg["reg_methods"][1:]:
      tt = t[m].median
      rows.append(
        dict(
          problem="regression" if m == tele_name else f"regression, {m}", seed=seed,
          target_loss=float(target), steps_gd=steps["gd"], steps_teleport=steps[m],
          time_gd_ms=1e3 * tg, time_teleport_ms=1e3 * tt, ratio=tt / tg,
          teleport_overhead_ms=1e3 * (tt - (steps[m] + 1) * per_step_gd),
          num_teleports=int(out[m][2].num_teleports),
          reached=bool(float(out[m][3]) <= float(target) and float(out["gd"][3]) <= float(target)),
        )
      )  # fmt: skip
    details.append({"seed": seed, "timings": {m: v.as_dict() for m, v in t.items()}})
    # harder targets: the loss plain GD reaches only after more epochs
    for e in cfg.get("reg_harder_epochs", ()):
      _, _, _, tgt = gd_until(params, gd_opt.init(params), x, y, f32(-1.0), i32(e + 1))
      tgt = f32(float(tgt))
      pair = {
        m: (
          lambda u=compiled[m][1], o=compiled[m][0]: u(
            params, o.init(params), x, y, tgt, i32(3 * e)
          )
        )
        for m in ("gd", tele_name)
      }
      o2 = {m: jax.block_until_ready(f()) for m, f in pair.items()}
      t2 = C.time_side_by_side(pair, repeats=max(3, cfg["repeats"] // 2), min_sample_s=0.01)
      sweep.append(
        dict(
          seed=seed, target_epoch=e, target_loss=float(tgt), steps_gd=int(o2["gd"][0]),
          steps_teleport=int(o2[tele_name][0]), time_gd_ms=1e3 * t2["gd"].median,
          time_teleport_ms=1e3 * t2[tele_name].median,
          ratio=t2[tele_name].median / t2["gd"].median,
          reached=bool(float(o2[tele_name][3]) <= float(tgt) and float(o2["gd"][3]) <= float(tgt)),
        )
      )  # fmt: skip
  main_rows = [r for r in rows if r["problem"] == "regression"]
  for e in cfg.get("reg_harder_epochs", ()):
    rs = [r for r in sweep if r["target_epoch"] == e]
    notes.append(
      f"harder target (loss plain GD reaches at epoch {e}): median ratio "
      f"{statistics.median(r['ratio'] for r in rs):.2f}x, GD "
      f"{statistics.median(r['time_gd_ms'] for r in rs):.1f} ms vs teleporting GD "
      f"{statistics.median(r['time_teleport_ms'] for r in rs):.1f} ms "
      f"({statistics.median(r['steps_teleport'] for r in rs):.0f} steps); reached in "
      f"{sum(r['reached'] for r in rs)}/{len(rs)} seeds."
    )
  for m in cfg["reg_methods"][2:]:
    rs = [r for r in rows if r["problem"].endswith(m)]
    notes.append(
      f"what-if {m}: median ratio {statistics.median(r['ratio'] for r in rs):.2f}x, "
      f"{statistics.median(r['steps_teleport'] for r in rs):.0f} steps, teleport "
      f"{statistics.median(r['teleport_overhead_ms'] for r in rs):.2f} ms."
    )
  ratios = [r["ratio"] for r in main_rows]
  ratio = statistics.median(ratios)
  detail = ""
  if ratio > 0.5:
    gd_ms = statistics.median(r["time_gd_ms"] for r in main_rows)
    steps_gd = statistics.median(r["steps_gd"] for r in main_rows)
    steps_tel = statistics.median(r["steps_teleport"] for r in main_rows)
    tel_ms = statistics.median(r["teleport_overhead_ms"] for r in main_rows)
    budget = 0.5 * gd_ms - (steps_tel + 1) * gd_ms / (steps_gd + 1)
    detail = (
      f"MISS by {ratio / 0.5:.1f}x: teleporting GD needs {steps_tel:.0f} steps instead of "
      f"{steps_gd:.0f}, but the teleport costs {tel_ms:.2f} ms = "
      f"{tel_ms / (gd_ms / (steps_gd + 1)):.0f} plain GD steps of this tiny problem; to reach "
      f"0.5x it may cost at most {budget:.2f} ms ({tel_ms / max(budget, 1e-9):.1f}x less)"
      + (
        "; see the what-if rows for fewer inner steps and a shorter or unrolled look-ahead."
        if len(cfg["reg_methods"]) > 2
        else "."
      )
    )
  target = C.Target(
    "teleporting GD time to target / plain GD time (regression, teleport included, median over seeds)",
    ratio,
    0.5,
    "<=",
    "x",
    detail=detail,
  )
  mem = {m: C.memory(c) for m, (_, c) in compiled.items()}
  comp = {m: {"lower_s": c.lower_s, "compile_s": c.compile_s} for m, (_, c) in compiled.items()}
  med = main_rows[len(main_rows) // 2]
  notes.insert(
    0,
    f"regression: GD needs {statistics.median(r['steps_gd'] for r in main_rows):.0f} steps, teleporting "
    f"GD {statistics.median(r['steps_teleport'] for r in main_rows):.0f} (median); one plain GD step "
    f"takes {1e6 * med['time_gd_ms'] / 1e3 / max(med['steps_gd'] + 1, 1):.1f} us inside the "
    f"compiled loop, the teleport about {statistics.median(r['teleport_overhead_ms'] for r in main_rows):.2f} ms"
    + (
      " (its 30 inner steps each differentiate a 5-step look-ahead through the data-dependent "
      "action)."
      if tele_name == "gd_teleport"
      else "."
    ),
  )
  return (
    rows,
    target,
    {"memory": mem, "compile": comp, "per_seed": details, "harder_targets": sweep},
  )


def _classification(cfg, notes):
  data_dir = os.environ.get("TELEPORT_JAX_MNIST_DIR")
  ds = data_lib.load_classification_data(Path(data_dir) if data_dir else None, seed=0)
  s = classification.Settings(epochs=cfg["cls_epochs"], seeds=cfg["cls_seeds"])
  if ds.name == "mnist":
    s = classification.Settings(
      hidden=128, epochs=cfg["cls_epochs"], batch_size=64, seeds=cfg["cls_seeds"],
      max_train=10000, max_val=10000,
    )  # fmt: skip
    ds = data_lib.load_classification_data(
      Path(data_dir), max_train=s.max_train, max_val=s.max_val, seed=0
    )
  x = jnp.asarray(ds.x_train, jnp.float32)
  y = jnp.asarray(ds.y_train, jnp.int32)
  n = len(ds.y_train)
  bs = min(s.batch_size, n)
  steps = n // bs
  widths = (ds.num_features, s.hidden, s.hidden, ds.num_classes)
  i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731

  def make_until(opt):
    epoch_fn = classification.make_epoch_fn(opt, bs, steps)

    def until(params, state, x, y, key, target, max_epochs):
      def cond(c):
        e, _, _, loss = c
        return (loss > target) & (e < max_epochs)

      def body(c):
        e, p, st, _ = c
        p, st, _ = epoch_fn(p, st, x, y, jax.random.fold_in(key, e))
        return e + 1, p, st, classification.loss_fn(p, x, y)

      loss0 = classification.loss_fn(params, x, y)
      e, p, st, loss = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), params, state, loss0)
      )
      return jnp.where(loss <= target, e, max_epochs), p, st, loss

    return until

  params0 = classification.init_params(jax.random.key(0), widths)
  compiled = {}
  for m in cfg["cls_methods"]:
    opt = classification.make_optimizer(m, s, steps)
    compiled[m] = (
      opt,
      C.compile_fn(
        make_until(opt), params0, opt.init(params0), x, y, jax.random.key(0), f32(0.0), i32(1)
      ),
    )
  rows, details = [], []
  for seed in cfg["cls_seeds"]:
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = classification.init_params(k_init, widths)
    sgd_opt, sgd_until = compiled["sgd"]
    _, _, _, target = sgd_until(
      params, sgd_opt.init(params), x, y, k_data, f32(-1.0), i32(s.epochs)
    )
    target = f32(float(target))
    cap = i32(4 * s.epochs)
    runs = {
      m: (lambda u=u, o=o: u(params, o.init(params), x, y, k_data, target, cap))
      for m, (o, u) in compiled.items()
    }
    out = {m: jax.block_until_ready(f()) for m, f in runs.items()}
    t = C.time_side_by_side(runs, repeats=max(3, cfg["repeats"] // 2), min_sample_s=0.0)
    for m in cfg["cls_methods"]:
      if m == "sgd":
        continue
      rows.append(
        dict(
          problem=f"classification ({ds.name}, {m})", seed=seed, target_loss=float(target),
          steps_gd=int(out["sgd"][0]) * steps, steps_teleport=int(out[m][0]) * steps,
          time_gd_ms=1e3 * t["sgd"].median, time_teleport_ms=1e3 * t[m].median,
          ratio=t[m].median / t["sgd"].median,
          teleport_overhead_ms=None,
          num_teleports=int(out[m][2].num_teleports),
          reached=bool(float(out[m][3]) <= float(target)),
        )
      )  # fmt: skip
    details.append({"seed": seed, "timings": {m: v.as_dict() for m, v in t.items()}})
  notes.append(
    f"classification: {ds.name}, widths {list(widths)}, batch {bs}, {steps} steps per epoch, "
    f"target = training loss of plain SGD after {s.epochs} epochs; the loss is checked after "
    "every epoch, so steps are multiples of the epoch length."
  )
  mem = {m: C.memory(c) for m, (_, c) in compiled.items()}
  comp = {m: {"lower_s": c.lower_s, "compile_s": c.compile_s} for m, (_, c) in compiled.items()}
  return rows, {"memory": mem, "compile": comp, "per_seed": details, "dataset": ds.name}


def run(mode: str) -> dict:
  """Runs the suite; returns its JSON-ready result."""
  cfg = SETTINGS[mode]
  t0 = time.perf_counter()
  notes: list[str] = []
  rows, target, reg = _regression(cfg, notes)
  cls = None
  if cfg["cls"]:
    cls_rows, cls = _classification(cfg, notes)
    rows += cls_rows
  mem_rows = []
  for problem, d in (("regression", reg), ("classification", cls)):
    if d is None:
      continue
    for m, mem in d["memory"].items():
      mem = mem or {}
      mem_rows.append(
        dict(
          problem=problem, method=m,
          argument_kib=mem.get("argument_bytes", 0) / 1024 if mem else None,
          output_kib=mem.get("output_bytes", 0) / 1024 if mem else None,
          temp_kib=mem.get("temp_bytes", 0) / 1024 if mem else None,
          compile_s=d["compile"][m]["lower_s"] + d["compile"][m]["compile_s"],
        )
      )  # fmt: skip
  rss = C.max_rss_bytes()
  dev = C.device_memory()
  notes.append(
    f"host max RSS of the process so far: {rss / 2**20:.0f} MiB (coarse: whole process, all suites so far)"
    if rss
    else "host max RSS not available on this platform"
  )
  if dev:
    notes.append(f"device memory: {dev}")
  if mode == "smoke":
    notes.append("smoke mode: the teleporting optimizer is a cheap PositiveRescaling stand-in.")
  cols = [
    "problem", "seed", "target_loss", "steps_gd", "steps_teleport", "time_gd_ms",
    "time_teleport_ms", "ratio", "teleport_overhead_ms", "num_teleports", "reached",
  ]  # fmt: skip
  return {
    "suite": "time_to_target",
    "mode": mode,
    "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    "rows": rows,
    "regression": reg,
    "classification": cls,
    "memory": {"per_loop": mem_rows, "host_max_rss_bytes": rss, "device": dev},
    "tables": [
      {
        "title": "time to target: plain vs teleporting (time_* = median wall-clock of the compiled loop)",
        "rows": rows,
        "columns": cols,
      },
      {"title": "time to target: compiled loops, XLA memory analysis", "rows": mem_rows},
    ]
    + (
      [
        {
          "title": "regression, harder targets (the loss plain GD reaches at target_epoch)",
          "rows": reg["harder_targets"],
        }
      ]
      if reg["harder_targets"]
      else []
    ),
    "targets": [target.as_dict()],
    "notes": notes + [f"measured in {time.perf_counter() - t0:.0f} s"],
  }
