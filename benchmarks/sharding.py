"""Teleporting in sharded training: step time and per-device memory on 1, 2, 4, 8 devices.

The model is the zoo's decoder-only transformer (GELU, pre-LayerNorm; the full
mode has the size of the character-level workload: 4 layers, 4 heads, width
128, context 64), trained with AdamW; the symmetry is per-head ``GL(d_head)`` on
queries/keys and on values/outputs (``tj.finders.attention_qk`` and
``attention_vo``) under ``tj.with_teleport(..., tj.every(100, start=3))``
(the teleport measured is the one at step 3, after three AdamW steps). For each
device count ``n`` and each layout

* ``dp``: parameters and optimizer state replicated, the batch split over a
  ``data`` axis;
* ``fsdp``: every parameter (and its optimizer-state copies) split over an
  ``fsdp`` axis along its largest axis divisible by ``n``, the batch split over
  the same axis;

it compiles the plain AdamW step and the ``with_teleport`` step ahead of time
and reports

* step time (median, ``block_until_ready``): the plain step; the
  ``with_teleport`` step when the schedule does not teleport; when it does
  (the same executable: the schedule is read from the state inside the step);
* per-device memory from the compiled executables' ``memory_analysis()``:
  arguments and temporaries, and the parameters plus optimizer state actually
  stored per device (from the arrays' shards); the teleport's working set is
  the teleporting executable's temporaries minus the plain step's;
* collectives in the compiled programs (all-gather, all-reduce,
  reduce-scatter, all-to-all, collective-permute), plain vs teleporting: where
  the teleport's math needs a whole layer or the whole batch on a device, the
  extra all-gathers show it.

On a CPU host the ``n`` devices are emulated
(``--xla_force_host_platform_device_count=8`` is set unless ``XLA_FLAGS``
already has a device count) and share the host's cores, so times there
measure overheads, not speed-ups; memory and collectives are what the compiled
programs would use on real devices. The same command runs unchanged on a GPU or
TPU host (device counts above the available ones are skipped).

Usage::

  python -m benchmarks.sharding [--quick | --smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import teleport_jax as tj  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from teleport_jax import models  # noqa: E402

SETTINGS = {
  "smoke": dict(
    devices=(1, 8),
    repeats=2,
    model=dict(vocab=16, d_model=16, heads=4, layers=1, context=8, batch=8),
  ),
  "quick": dict(
    devices=(1, 2, 4, 8),
    repeats=3,
    model=dict(vocab=64, d_model=64, heads=4, layers=2, context=32, batch=16),
  ),
  "full": dict(
    devices=(1, 2, 4, 8),
    repeats=5,
    model=dict(vocab=96, d_model=128, heads=4, layers=4, context=64, batch=16),
  ),
}
LAYOUTS = ("dp", "fsdp")
WARMUP = 3  # plain AdamW steps (the schedule skips them) before the measured teleport
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = "fsdp") -> P:
  """Splits the largest axis of ``shape`` divisible by ``n`` over ``axis`` (else replicated).

  Trailing ``None`` entries are left out, as jit writes specs back (so that
  outputs compare equal to inputs and the step compiles once).
  """
  candidates = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
  if n == 1 or not candidates:
    return P()
  i = max(candidates, key=lambda j: shape[j])
  return P(*([None] * i), axis)


def count_collectives(compiled) -> dict[str, int]:
  """How many of each collective op the compiled program contains."""
  text = compiled.as_text()
  return {op: len(re.findall(rf"= [^=\n]*\b{op}(?:-start)?\(", text)) for op in COLLECTIVES}


def _bytes_per_device(tree) -> int:
  """Bytes of ``tree``'s arrays stored on the first device."""
  dev = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == dev:
        total += shard.data.nbytes
  return total


def _setup(m, n: int, layout: str):
  params = m.params
  tokens, targets = models.example_batch(m)
  lm_loss = models.loss_for(m)

  def loss(p, x, y):
    return lm_loss(p, (x, y))

  axis = "data" if layout == "dp" else "fsdp"
  mesh = Mesh(np.array(jax.devices()[:n]), (axis,))
  if layout == "dp":
    specs = jax.tree.map(lambda _: P(), params)
  else:
    specs = jax.tree.map(lambda a: fsdp_spec(a.shape, n), params)
  p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, p_sh)
  batch = jax.device_put((tokens, targets), NamedSharding(mesh, P(axis)))
  return loss, params, batch, p_sh, replicated


def _state(opt, params, p_sh, replicated):
  state_sh = optax.tree_map_params(
    opt,
    lambda _, s: s,
    jax.eval_shape(opt.init, params),
    p_sh,
    transform_non_params=lambda _: replicated,
  )
  return jax.jit(opt.init, out_shardings=state_sh)(params)


def measure(m, n: int, layout: str, repeats: int) -> dict:
  loss, params, (x, y), p_sh, replicated = _setup(m, n, layout)
  inner = optax.adamw(1e-3, b2=0.99, weight_decay=0.1)
  symmetry = tj.product(tj.finders.attention_qk(m.params), tj.finders.attention_vo(m.params))
  tele = tj.with_teleport(inner, symmetry, tj.every(100, start=WARMUP))

  def plain_step(p, s, x, y):
    value, g = jax.value_and_grad(loss)(p, x, y)
    u, s = inner.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  def tele_step(p, s, x, y):
    value, g = jax.value_and_grad(loss)(p, x, y)
    u, s = tele.update(g, s, p, value_fn=loss, x=x, y=y)
    return optax.apply_updates(p, u), s, value

  s_plain = _state(inner, params, p_sh, replicated)
  s_tele = _state(tele, params, p_sh, replicated)
  plain = C.compile_fn(plain_step, params, s_plain, x, y)
  telep = C.compile_fn(tele_step, params, s_tele, x, y)
  # WARMUP plain AdamW steps first (a teleport from Adam's fresh state depends on the
  # signs of near-zero gradient entries); then the state's count decides.
  for _ in range(WARMUP):
    params, s_tele, _ = telep(params, s_tele, x, y)
  s_plain = jax.block_until_ready(plain(params, s_plain, x, y))[1]
  s_skip = s_tele._replace(count=jax.device_put(jnp.asarray(WARMUP + 1, jnp.int32), replicated))
  out = telep(params, s_tele, x, y)
  jax.block_until_ready(telep(params, s_skip, x, y))
  info = out[1].info
  timings = C.time_side_by_side(
    {
      "plain": lambda: plain(params, s_plain, x, y),
      "skip": lambda: telep(params, s_skip, x, y),
      "teleport": lambda: telep(params, s_tele, x, y),
    },
    repeats=repeats,
    max_number=20,
  )
  mem_plain, mem_tele = C.memory(plain) or {}, C.memory(telep) or {}
  return {
    "devices": n,
    "layout": layout,
    "plain_step_s": timings["plain"].median,
    "skip_step_s": timings["skip"].median,
    "teleport_step_s": timings["teleport"].median,
    "compile_plain_s": plain.total_s,
    "compile_teleport_s": telep.total_s,
    "params_state_bytes_per_device": _bytes_per_device((params, s_tele)),
    "plain_params_state_bytes_per_device": _bytes_per_device((params, s_plain)),
    "argument_bytes": mem_tele.get("argument_bytes"),
    "temp_bytes_plain": mem_plain.get("temp_bytes"),
    "temp_bytes_teleport": mem_tele.get("temp_bytes"),
    "teleport_working_set_bytes": (
      None
      if mem_tele.get("temp_bytes") is None or mem_plain.get("temp_bytes") is None
      else mem_tele["temp_bytes"] - mem_plain["temp_bytes"]
    ),
    "collectives_plain": count_collectives(plain.fn),
    "collectives_teleport": count_collectives(telep.fn),
    "teleport_status": tj.status_message(info),
    "teleport_accepted": bool(info.accepted),
    "rel_loss_drift": float(info.rel_loss_drift),
    "outputs_keep_shardings": all(
      a.sharding.is_equivalent_to(b.sharding, a.ndim)
      for a, b in zip(jax.tree.leaves(out[:2]), jax.tree.leaves((params, s_tele)))
    ),
  }


def _mib(b):
  return None if b is None else b / 2**20


def run(mode: str) -> dict:
  cfg = SETTINGS[mode]
  m = models.transformer(**cfg["model"])
  available = jax.device_count()
  counts = [n for n in cfg["devices"] if n <= available]
  skipped = [n for n in cfg["devices"] if n > available]
  records = []
  for layout in LAYOUTS:
    for n in counts:
      if cfg["model"]["batch"] % n:
        continue
      r = measure(m, n, layout, cfg["repeats"])
      records.append(r)
      print(
        f"  {layout} n={n}: plain {r['plain_step_s'] * 1e3:.2f} ms, skip "
        f"{r['skip_step_s'] * 1e3:.2f} ms, teleport {r['teleport_step_s'] * 1e3:.1f} ms",
        flush=True,
      )
  one = {r["layout"]: r for r in records if r["devices"] == 1}
  rows = []
  for r in records:
    base = one.get(r["layout"])
    ideal = None if base is None else base["params_state_bytes_per_device"] / r["devices"]
    rows.append(
      {
        "layout": r["layout"],
        "devices": r["devices"],
        "plain ms": r["plain_step_s"] * 1e3,
        "skip/plain": r["skip_step_s"] / r["plain_step_s"],
        "teleport ms": r["teleport_step_s"] * 1e3,
        "params+state MiB/dev": _mib(r["params_state_bytes_per_device"]),
        "x (1 dev / n)": None if not ideal else r["params_state_bytes_per_device"] / ideal,
        "teleport working set MiB/dev": _mib(r["teleport_working_set_bytes"]),
        "all-gathers plain/teleport": (
          f"{r['collectives_plain']['all-gather']}/{r['collectives_teleport']['all-gather']}"
        ),
        "accepted": r["teleport_accepted"],
        "keeps shardings": r["outputs_keep_shardings"],
      }
    )
  n_params = sum(a.size for a in jax.tree.leaves(m.params))
  notes = [
    f"model: transformer {dict(m.config)}; {n_params} parameters; AdamW (lr 1e-3, b2 0.99, "
    "weight decay 0.1); symmetry: per-head GL on Q/K and V/O; tj.with_teleport(..., "
    "tj.every(100, start=3)) with its defaults (Lie back-end, optimizer look-ahead objective).",
    f"backend {jax.default_backend()}, {available} devices"
    + (f"; skipped device counts {skipped} (not available)" if skipped else "")
    + (
      "; CPU devices are emulated and share the host's cores: step times measure overheads, "
      "not speed-ups"
      if jax.default_backend() == "cpu"
      else ""
    ),
    "x (1 dev / n): parameters and optimizer state stored per device over the 1-device "
    "figure divided by n (1.0 = perfectly split; dp stays at n by design). The teleport "
    "working set is its executable's temporaries minus the plain step's, per device.",
  ]
  return {
    "suite": "sharding",
    "mode": mode,
    "model": {k: str(v) for k, v in m.config.items()} | {"parameters": int(n_params)},
    "records": records,
    "tables": [
      {
        "title": "sharded training step with and without teleports, per device count",
        "rows": rows,
        "columns": list(rows[0]) if rows else [],
      }
    ],
    "notes": notes,
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.sharding", description=__doc__.split("\n\n")[0]
  )
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="a 2-layer, 64-wide transformer")
  size.add_argument("--smoke", action="store_true", help="a tiny model, 1 and 8 devices")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for sharding.json")
  args = p.parse_args(argv)
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  t = time.perf_counter()
  result = run(mode)
  result["wall_s"] = time.perf_counter() - t
  machine = C.machine_info()
  result["machine"] = {
    k: machine[k] for k in ("backend", "devices", "jax_version", "cpu_count", "load_average")
  }
  C.write_json(args.out / "sharding.json", result)
  print(C.format_result(result), flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
