"""Learned teleports on the digits workloads: time to target against the tuned baselines.

The published learned-teleport problem (``reproduce --only learned``) is one
full-batch regression. This benchmark asks the practical question on the
workloads of ``benchmarks.workloads``: the digits MLP (``PositiveRescaling``)
and the digits CNN (the symmetries ``tj.find_symmetries`` finds), minibatches
of 64, validation loss against wall-clock.

For each workload, in one process:

1. **Meta-training** (timed, reported apart): an equivariant policy proposing a
   step size and a teleport is meta-trained on training runs of the workload
   (initialisations drawn from a pool never used at test, minibatches drawn
   afresh at every step, plain SGD at the policy's step size, the loss the
   minibatch's), and so is a policy proposing the step size alone;
2. **Evaluation**: the workloads' tuned baselines (AdamW, SGD with Nesterov
   momentum, AdamW with norm balancing, AdamW with per-layer step factors, at
   their stored tuned values, with their schedules) and the learned methods
   train the same seeds with the workloads' ``Trainer``: the same minibatches,
   the same compiled chunks, the same validation curve.

   * ``learned_lr``: SGD at the policy's step size, no move;
   * ``learned_lr_tele``: SGD at the policy's step size after the policy's
     teleport at every step, inside ``learned_teleport`` (the guard).

The target and the ratios are those of ``benchmarks.workloads``: the target is
the best baseline's median final validation loss; a time ratio is a method's
median time to target over the best baseline's, the policy's per-step cost
included; per-seed ratios and whether they are resolved (beyond the
evaluation grid) are printed beside it.

Results: ``benchmarks/results/learned_workloads.json``.

Usage::

  python -m benchmarks.learned_workloads [--quick] [--only NAME ...] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import teleport_jax as tj  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from teleport_jax import learned as L  # noqa: E402
from teleport_jax.experiments import common  # noqa: E402
from teleport_jax.experiments import learned as learned_lib  # noqa: E402
from teleport_jax.experiments import workloads as wl_lib  # noqa: E402

common.prefer_xla_cpu_dots()

NAMES = ("mlp_digits", "cnn_digits")
BASELINES = ("adamw", "sgd_nesterov", "norm_balance", "per_layer_lr")
LEARNED = ("learned_lr", "learned_lr_tele", "learned_tele_adamw")
POOL_SEED = 5000  # meta-training initialisations: seeds POOL_SEED + i (the test seeds are 0, 1, 2)
SETTINGS = {
  "full": dict(meta_steps=400, pool=32, tasks=8, unroll=10, horizon=200, norm_penalty=0.1),
  "quick": dict(meta_steps=100, pool=8, tasks=4, unroll=10, horizon=100, norm_penalty=0.1),
  "smoke": dict(meta_steps=2, pool=2, tasks=2, unroll=2, horizon=4, norm_penalty=0.1),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class Stepper(nnx.Module):
  """A policy and a step counter: the counter picks each step's minibatch."""

  def __init__(self, policy: nnx.Module):
    self.policy = policy

  def initial_carry(self):
    return (self.policy.initial_carry(), jnp.zeros((), jnp.int32))


def family(wl: wl_lib.Workload, pool: int) -> L.TaskFamily:
  """Training runs of ``wl``: an initialisation from the pool and a minibatch stream.

  A task's ``data`` is the raw key of its minibatch stream; its loss (for the
  divergence barrier) is that of the stream's first minibatch.
  """
  inits = [wl.init(POOL_SEED + i) for i in range(pool)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *inits)

  def sample(key):
    k1, k2 = jax.random.split(key)
    i = jax.random.randint(k1, (), 0, pool)
    return jax.tree.map(lambda a: a[i], stacked), jax.random.key_data(k2)

  def loss(params, raw):
    x, y = wl.sample(wl.train, jax.random.wrap_key_data(raw))
    return wl.loss(params, x, y)

  return L.TaskFamily(sample, loss, wl.symmetry)


def minibatch_step(wl: wl_lib.Workload, inner: Callable):
  """``meta_train``'s step: a fresh minibatch, then ``inner(policy, family)``'s step on it
  (``tj.learned.inner_step``: SGD; ``tj.learned.optimizer_step``: an optax optimizer)."""
  batch_family = L.TaskFamily(None, lambda p, batch: wl.loss(p, *batch), wl.symmetry)

  def make(module: Stepper):
    one = inner(module.policy, batch_family)

    def step(state, raw):
      params, (carry, count) = state
      batch = wl.sample(wl.train, jax.random.fold_in(jax.random.wrap_key_data(raw), count))
      (new, carry), loss = one((params, carry), batch)
      return (new, (carry, count + 1)), loss

    return step

  return make


def tuned_adamw(wl: wl_lib.Workload) -> optax.GradientTransformation:
  """The workload's tuned AdamW (its stored values and schedule)."""
  hp = wl_lib.load_tuned()["full"][wl.name]["adamw"]["hp"]
  return wl_lib.METHODS["adamw"].build(hp, wl_lib.lr_schedule(hp, wl), wl)


def lr_init(wl_name: str) -> float:
  """The step size a new policy proposes: the tuned SGD-Nesterov step (without momentum's
  1 / (1 - 0.9), which plain SGD does not have)."""
  return float(wl_lib.load_tuned()["full"][wl_name]["sgd_nesterov"]["hp"]["lr"])


def meta_train(
  wl: wl_lib.Workload, setting: dict, method: str, seed: int = 0, max_rms: float = 0.1
):
  """Meta-trains the policy of ``method`` (one of :data:`LEARNED`) on runs of ``wl``."""
  teleport = method != "learned_lr"
  on_adamw = method == "learned_tele_adamw"
  lr0 = lr_init(wl.name)
  cfg = L.PolicyConfig(
    hidden=32,
    max_rms=max_rms,  # log-scales: a tenth per step at most (default)
    move_init=0.1,
    lr_range=None if on_adamw else (lr0 / 30, lr0 * 30),
    lr_init=None if on_adamw else lr0,
    seed=seed,
  )
  module = Stepper(L.make_policy(cfg))
  meta = L.MetaConfig(
    tasks=setting["tasks"],
    unroll=setting["unroll"],
    # on AdamW, runs as long as the test's: its step-size schedule spans the run
    horizon=wl.steps if on_adamw else setting["horizon"],
    meta_steps=setting["meta_steps"],
    meta_lr=3e-3,
    meta_lr_final=3e-4,
    # a teleporting policy pays for the growth of the parameters' norm over an
    # unroll: the moves the loss does not see would otherwise run away
    norm_penalty=setting["norm_penalty"] if teleport else 0.0,
    seed=seed,
  )
  fam = family(wl, setting["pool"])
  if on_adamw:
    adamw = tuned_adamw(wl)
    step = minibatch_step(wl, lambda pol, f: L.optimizer_step(pol, f, adamw))
    carry = L.optimizer_carry(module.policy, adamw)
    res = L.meta_train(
      module, fam, meta, step=step, init_carry=lambda p: (carry(p), jnp.zeros((), jnp.int32))
    )
  else:
    step = minibatch_step(wl, lambda pol, f: L.inner_step(pol, f, base_lr=None, teleport=teleport))
    res = L.meta_train(module, fam, meta, step=step)
  return res.policy.policy, res


def learned_method(name: str, policy: nnx.Module) -> wl_lib.Method:
  if name == "learned_lr":
    return wl_lib.Method(
      name,
      "learned",
      {},
      lambda hp, lr, wl: learned_lib.learned_step_size(wl.symmetry, policy),
      "SGD at a meta-trained policy's step size",
    )
  if name == "learned_tele_adamw":
    return wl_lib.Method(
      name,
      "teleport",
      wl_lib.METHODS["adamw"].space,
      lambda hp, lr, wl: L.learned_teleport(
        wl_lib.METHODS["adamw"].build(hp, lr, wl),
        wl.symmetry,
        policy,
        schedule=tj.every(1, start=0),
      ),
      "tuned AdamW after a meta-trained policy's teleport at every step, its state "
      "transported (learned_teleport, the guard)",
    )
  return wl_lib.Method(
    name,
    "teleport",
    {},
    lambda hp, lr, wl: L.learned_teleport(optax.sgd(1.0), wl.symmetry, policy),
    "SGD at a meta-trained policy's step size after its teleport at every step "
    "(learned_teleport, the guard)",
  )


def run_workload(name: str, mode: str, setting: dict) -> dict:
  wl = wl_lib.make_workload(name, mode)
  tuned = wl_lib.load_tuned()["full"][name]  # the values tuned at full length
  meta = {}
  policies = {}
  for m in LEARNED:
    t = time.perf_counter()
    policies[m], res = meta_train(wl, setting, m)
    meta[m] = dict(
      seconds=time.perf_counter() - t,
      compile_s=res.compile_seconds,
      meta_loss_first=float(np.mean(np.asarray(res.losses)[:10])),
      meta_loss_last=float(np.mean(np.asarray(res.losses)[-10:])),
    )
    print(f"  meta-trained {m}: {meta[m]['seconds']:.0f} s", flush=True)
  seeds = range(wl_lib.SIZES[mode]["seeds"])
  out = {}
  for m in BASELINES + LEARNED:
    method = wl_lib.METHODS[m] if m in BASELINES else learned_method(m, policies[m])
    hp = tuned[m]["hp"] if m in BASELINES else tuned["adamw"]["hp"] if "adamw" in m else {}
    out[m] = wl_lib.evaluate(wl_lib.Trainer(wl, method), hp, seeds)
    print(f"  evaluated {m}", flush=True)
  rec = wl_lib.summarise(wl, out)
  for m, o in out.items():
    # per step actually run: a run stops at its first non-finite validation loss
    rec["methods"][m]["us_per_step"] = 1e6 * statistics.median(
      r["time_s"][-1] / ((len(r["time_s"]) - 1) * wl.eval_every) for r in o["runs"]
    )
  for m, r in rec["methods"].items():
    if m not in LEARNED + (rec["baseline"],):
      r.pop("curves", None)
  rec["meta_training"] = meta
  return rec


def rows(records: dict) -> list[dict]:
  out = []
  for name, rec in records.items():
    for m, r in rec["methods"].items():
      finals = [f for f in r["final_val_loss"] if f is not None]
      out.append(
        dict(
          workload=name,
          method=m + (" (target)" if m == rec["baseline"] else ""),
          time_ratio="not reached" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x",
          per_seed=" / ".join(C.fmt(x) for x in r["paired_time_ratio"]),
          resolved=r["resolved_time"],
          final_val_loss=statistics.median(finals) if finals else None,
          us_per_step=r["us_per_step"],
          meta_train_s=rec["meta_training"].get(m, {}).get("seconds"),
        )
      )
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = ap.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true")
  group.add_argument("--smoke", action="store_true")
  ap.add_argument("--only", nargs="+", choices=NAMES)
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  ap.add_argument(
    "--norm-penalty",
    type=float,
    default=None,
    help="weight of the norm-growth term in the teleporting policy's meta-loss "
    "(default 0.1; 0 reproduces the runs that diverge)",
  )
  args = ap.parse_args(argv)
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  setting = dict(SETTINGS[mode])
  if args.norm_penalty is not None:
    setting["norm_penalty"] = args.norm_penalty
  records = {}
  t0 = time.perf_counter()
  for name in args.only or NAMES:
    print(f"{name} ({mode})", flush=True)
    records[name] = run_workload(name, mode, setting)
  title = "learned teleports on the digits workloads (median of seeds)"
  result = dict(
    suite="learned_workloads",
    mode=mode,
    setting=setting,
    tables=[dict(title=title, rows=rows(records))],
    wall_s=time.perf_counter() - t0,
    machine=C.machine_info(),
    workloads=records,
  )
  print(C.format_table(title, result["tables"][0]["rows"]))
  path = args.out / "learned_workloads.json"
  C.write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
