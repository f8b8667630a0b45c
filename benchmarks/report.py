"""docs/performance.md, rendered from the benchmarks' JSON files.

Usage::

  python -m benchmarks.report                  # print the page
  python -m benchmarks.report --write          # write docs/performance.md and README.md's summary
  python -m benchmarks.report --check          # exit 1 if either is not current

Every figure on the page is read from ``benchmarks/results/*.json`` (written by
the commands the page names); the prose around the tables is fixed text here.
The "In short" paragraph is also written between ``<!-- performance:summary -->``
and ``<!-- /performance:summary -->`` in README.md. Edit this file, not the
page, and run ``--write`` after a benchmark has rewritten its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
SUMMARY_OPEN, SUMMARY_CLOSE = "<!-- performance:summary -->", "<!-- /performance:summary -->"

WORKLOAD_NAMES = {
  "mlp_digits": "the digits MLP",
  "cnn_digits": "the digits CNN",
  "cnn_bn_digits": "the digits CNN with BatchNorm",
  "char_transformer_relu": "the ReLU/RMSNorm character transformer",
  "char_transformer": "the GELU/LayerNorm character transformer",
}
# the order the page discusses them in
WORKLOAD_ORDER = tuple(WORKLOAD_NAMES)
LEARNED_WORKLOAD_METHODS = ("learned_lr", "learned_lr_tele", "learned_tele_adamw")
PER_SEED_METHODS = ("adamw", "norm_balance", "tp_onestep", "tp_lookahead", "tp_lookahead_nostab")


# ------------------------------------------------------------------ helpers
def load(name: str, results: Path = RESULTS) -> dict:
  return json.loads((results / f"{name}.json").read_text())


def g(x, fmt: str = "{:.3g}") -> str:
  """A number, or an en dash for a missing one."""
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _median_reached(xs):
  """Median of the reached values; ``None`` if fewer than half of the runs reached."""
  got = [x for x in xs if x is not None]
  if len(got) * 2 < len(xs) or not got:
    return None
  m = statistics.median(sorted(got) + [math.inf] * (len(xs) - len(got)))
  return None if math.isinf(m) else m


def _median(xs):
  got = [x for x in xs if x is not None]
  return statistics.median(got) if got else None


def _target(t: dict) -> str:
  """``≤ 1.05× — met`` from a suite's target record."""
  sign = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}.get(t["comparison"], t["comparison"])
  unit = {"x": "×", " s": " s"}.get(t["unit"], t["unit"])
  verdict = {"PASS": "met", "MISS": "missed"}.get(t["status"], "not measured")
  return f"{sign} {t['threshold']:g}{unit} — {verdict}"


def _ratio(x) -> str:
  """A ratio: two decimals below 10, then fewer."""
  if x is None:
    return "–"
  return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def _cell(x) -> str:
  return str(x).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
  return "\n".join(lines)


def _workloads(data: dict) -> dict:
  records = data["workloads"]
  order = [w for w in WORKLOAD_ORDER if w in records] + [
    w for w in records if w not in WORKLOAD_NAMES
  ]
  return {w: records[w] for w in order}


def _name(workload: str) -> str:
  return WORKLOAD_NAMES.get(workload, workload)


def _rel(a: float, b: float) -> float:
  return (a - b) / b


# ------------------------------------------------------------------ summary
def _best_teleport(rec: dict):
  """(method, ratio) of the teleport with the lowest time ratio, or (method, None)."""
  teleports = {m: r for m, r in rec["methods"].items() if r["kind"] == "teleport"}
  timed = {m: r["time_ratio"] for m, r in teleports.items() if r["time_ratio"] is not None}
  if timed:
    m = min(timed, key=timed.get)
    return m, timed[m]
  most = max(teleports, key=lambda m: sum(t is not None for t in teleports[m]["time_to_target_s"]))
  return most, None


def _reached(r: dict) -> tuple[int, int]:
  return sum(t is not None for t in r["time_to_target_s"]), len(r["time_to_target_s"])


def _lookahead_costs(records: dict) -> list[float]:
  return [
    r["teleport_cost_grad_steps"]
    for rec in records.values()
    for m, r in rec["methods"].items()
    if m.startswith("tp_lookahead") and r["teleport_cost_grad_steps"] is not None
  ]


def summary(results: Path = RESULTS) -> str:
  """The "In short" paragraph (also README.md's summary block)."""
  records = _workloads(load("workloads", results))
  parts = []
  for w, rec in records.items():
    m, ratio = _best_teleport(rec)
    r = rec["methods"][m]
    k, n = _reached(r)
    if ratio is None:
      parts.append(
        f"undefined on {_name(w)} (no teleport reaches the target in more than {k} of {n} seeds)"
      )
      continue
    text = f"{ratio:.2f}× on {_name(w)} (`{m}`"
    final = _median(r["final_val_loss"])
    if ratio < 1:
      base = _median_reached(rec["methods"][rec["baseline"]]["time_to_target_s"])
      text += f", in {k} of {n} seeds"
      if final > rec["target_val_loss"]:
        text += (
          f"; it passes the target on the way and ends above it, {final:.3g} against "
          f"{rec['target_val_loss']:.3g}"
        )
      resolved = r.get("resolved_time")
      text += (
        f"; faster on every seed beyond the evaluation grid, on runs of {base:.2f} s"
        if resolved == "faster"
        else f"; not resolved: the per-seed ratios straddle the evaluation grid, on runs of "
        f"{base:.2f} s"
      )
    parts.append(text + ")")
  look = [
    _rel(_median(rec["methods"]["tp_lookahead"]["final_val_loss"]), rec["target_val_loss"])
    for rec in records.values()
    if "tp_lookahead" in rec["methods"]
  ]
  costs = _lookahead_costs(records)
  sets = [w for w, rec in records.items() if rec["baseline"] == "norm_balance"]
  ttt = load("time_to_target", results)
  reg = [row for row in ttt["rows"] if row["problem"] == "regression"]
  gd_step_ms = _median([row["time_gd_ms"] / row["steps_gd"] for row in reg])
  tp_ms = _median([row["teleport_overhead_ms"] for row in reg])
  ratio = _median([row["ratio"] for row in reg])
  return (
    _headline(records) + " Against "
    "baselines tuned with the same budget, the best teleport's median time to the "
    "best baseline's validation loss is " + "; ".join(parts) + ". "
    "The optimizer look-ahead (`tp_lookahead`) ends close to the best baseline "
    f"(its median final validation loss is within {100 * max(look):.1f} % of the "
    "target everywhere), but its trajectory is not faster per step, so the cost of "
    f"each teleport ({min(costs):.0f}–{max(costs):.0f} AdamW steps) is the "
    'difference. Norm balancing after every step (`tj.balanced(adamw, sym, "norm")`, '
    f"a data-free closed form) sets the target on {len(sets)} of {len(records)} "
    "workloads and is the method to beat. On the seed's 4-sample regression a GD "
    f"step costs {1000 * gd_step_ms:.0f} µs inside a compiled loop and a teleport "
    f"{tp_ms:.1f} ms, about {tp_ms / gd_step_ms:,.0f} GD steps: teleporting GD needs "
    f"{_median([row['steps_teleport'] for row in reg]):.0f} steps instead of "
    f"{_median([row['steps_gd'] for row in reg]):.0f} to plain GD's 300-epoch loss "
    f"and still takes {ratio:.1f}× its time. A teleport pays on the clock only where a "
    "gradient step is expensive relative to the teleport. The look-ahead figures above "
    "are those of the search the default replaced. " + _default_cost_sentence(results)
  )


def _default_cost_sentence(results: Path) -> str:
  """What the default one-step teleport costs, in ``teleport_cost`` and on the workloads."""
  tc = load("teleport_cost", results)["records"]
  one = [r["cost"]["variants"]["onestep"]["teleport_in_steps"] for r in tc.values()]
  old = [r["cost"]["variants"]["lookahead"]["teleport_in_steps"] for r in tc.values()]
  text = (
    "The default teleport is now `tj.solvers.OneStep`, which costs "
    f"{min(one):.0f}–{max(one):.0f} plain optimizer steps where the look-ahead search "
    f"costs {min(old):.0f}–{max(old):.0f} on the same models "
    "(`python -m benchmarks.teleport_cost`)"
  )
  records = _workloads(load("workloads", results))
  runs = {
    w: rec["methods"]["tp_onestep"] for w, rec in records.items() if "tp_onestep" in rec["methods"]
  }
  if not runs:
    return text + "; the workloads have not been rerun with it."
  costs = [r["teleport_cost_grad_steps"] for r in runs.values() if r["teleport_cost_grad_steps"]]
  ratios = [
    f"{r['time_ratio']:.2f}× on {_name(w)}"
    if r["time_ratio"] is not None
    else f"not reached on {_name(w)}"
    for w, r in runs.items()
  ]
  resolved = [
    f"{_name(w)} ({r['resolved_final']})" for w, r in runs.items() if r.get("resolved_final")
  ]
  return (
    text
    + ". On the workloads, as a drop-in addition to tuned AdamW every 250 steps (`tp_onestep`), "
    + (
      f"a teleport cost {min(costs):.0f}–{max(costs):.0f} AdamW steps on the clock and "
      if costs
      else ""
    )
    + "its time to the target was "
    + "; ".join(ratios)
    + "; its final validation loss differs from the target baseline's beyond the noise on "
    + (", ".join(resolved) if resolved else "no workload")
    + "."
  )


def _headline(records: dict) -> str:
  """The summary's first sentence, from the resolved time ratios."""
  pays = [
    w
    for w, rec in records.items()
    for m, r in rec["methods"].items()
    if r["kind"] == "teleport" and r.get("resolved_time") == "faster"
  ]
  if not pays:
    return "**No teleport pays on the wall clock on the training workloads.**"
  names = sorted({_name(w) for w in pays})
  return f"**A teleport pays on the wall clock, resolved on every seed, on {', '.join(names)}.**"


# ------------------------------------------------------------------ targets
def targets_table(results: Path) -> str:
  lat, comp, scal, ttt = (
    load(n, results) for n in ("latency", "compile", "scaling", "time_to_target")
  )
  rows = []
  t = lat["targets"][0]
  jit_ms = lat["timings"]["teleport_jit"]["median_s"] * 1e3
  eager_s = lat["eager"]["estimate_s"]
  n = lat["problem"]["num_steps"]
  how = (
    " (eager time estimated: first call minus its compilation)"
    if lat["eager"]["method"] == "estimate"
    else ""
  )
  rows.append(
    [
      f"one jit-compiled `tj.teleport` ({n} inner steps, data-dependent GL, the published MLP) "
      f"vs the same algorithm executed eagerly{how}",
      f"{jit_ms:.2f} ms vs {eager_s:.1f} s: **{t['measured']:,.0f}×**",
      _target(t),
    ]
  )
  grad_ms = lat["timings"]["grad_step_jit"]["median_s"] * 1e3
  rows.append(
    [
      f"the same teleport vs one jitted gradient step ({grad_ms:.3f} ms)",
      f"{lat['ratios']['teleport (jit) / gradient step']:.0f}×",
      "–",
    ]
  )
  for sym, label in (("rescaling", "`PositiveRescaling`"), ("data_gl", "`DataDependentGL`")):
    t = next(t for t in scal["targets"] if label.strip("`") in t["name"])
    pts = [
      r["step_per_grad"]
      for r in scal["rows"]
      if r["symmetry"] == sym and r["width"] >= 256 and r.get("step_per_grad") is not None
    ]
    ok = sum(p <= t["threshold"] for p in pts)
    rows.append(
      [
        f"one inner step / one gradient evaluation, {label}, width ≥ 256",
        f"**{min(pts):.1f}–{max(pts):.1f}×** ({ok} of {len(pts)} grid points within the target)",
        _target(t),
      ]
    )
  c = comp["compile"][0]
  fast = next(r for r in comp["compile"] if "optimization_level" in r["step"])
  runs = {r["call"]: r["median_ms"] for r in comp["run"]}
  slow = runs[
    "train step, teleport at this step, compiled with {'xla_backend_optimization_level': 1}"
  ]
  base = runs["train step, teleport at this step"]
  rows.append(
    [
      "compile the teleporting train step (regression `gd_teleport`: 30 inner steps, "
      "5-step look-ahead)",
      f"**{c['total_s']:.1f} s** (trace and lowering {c['lower_s']:.1f} s, XLA "
      f"{c['xla_compile_s']:.1f} s); {fast['total_s']:.1f} s with "
      '`compiler_options={"xla_backend_optimization_level": 1}`, whose teleporting step '
      f"runs {100 * (slow / base - 1):.0f} % slower",
      _target(comp["targets"][0]),
    ]
  )
  value = "yes" if comp["recompiled_on_value_change"] else "none"
  steps = "yes (static)" if comp["num_steps_change"]["xla_compiles"] else "none"
  rows.append(
    [
      "recompilation when schedule values change / when `num_steps` changes",
      f"{value} / {steps}",
      "none for the schedule — " + ("missed" if comp["recompiled_on_value_change"] else "met"),
    ]
  )
  reg = [r for r in ttt["rows"] if r["problem"] == "regression"]
  rows.append(
    [
      "wall-clock to plain GD's 300-epoch loss, regression, whole loop compiled, teleport included",
      f"{_median([r['time_teleport_ms'] for r in reg]):.1f} ms vs "
      f"{_median([r['time_gd_ms'] for r in reg]):.1f} ms: **{ttt['targets'][0]['measured']:.1f}×**",
      _target(ttt["targets"][0]),
    ]
  )
  harder = ttt["regression"]["harder_targets"]
  epochs = sorted({h["target_epoch"] for h in harder})
  rows.append(
    [
      "the same, to the loss GD reaches after " + " / ".join(f"{e:,}" for e in epochs) + " epochs",
      " / ".join(
        f"{_median([h['ratio'] for h in harder if h['target_epoch'] == e]):.1f}×" for e in epochs
      ),
      "–",
    ]
  )
  for r in ttt["rows"]:
    if r["problem"].startswith("classification"):
      rows.append(
        [
          f"wall-clock to SGD's {ttt['settings']['cls_epochs']}-epoch training loss, digits "
          "classification",
          f"{r['ratio']:.1f}×",
          "–",
        ]
      )
  rows.append(
    [
      "a teleporting train step that does not teleport vs a plain step (one jitted call each)",
      f"{runs['train step, no teleport (lax.cond skips it)']:.2f} ms vs "
      f"{runs['plain GD train step']:.3f} ms",
      "–",
    ]
  )
  return _table(["what", "measured", "target"], rows)


# ------------------------------------------------------------------ workloads
def methods_table(records: dict) -> str:
  first = next(iter(records.values()))["methods"]
  return _table(
    ["method", "kind", "what"],
    [[f"`{m}`", r["kind"], r["description"]] for m, r in first.items()],
  )


def _paired(r: dict) -> str:
  """The paired final-loss differences to the target's baseline: median [min, max] per seed."""
  d = [x for x in r.get("paired_final_diff", []) if x is not None]
  if not d or not any(d):
    return "–"
  return f"{_median(d):+.3f} [{min(d):+.3f}, {max(d):+.3f}]"


def _resolved(r: dict) -> str:
  final, time = r.get("resolved_final"), r.get("resolved_time")
  return " / ".join(x or "–" for x in (final, time))


def workloads_table(records: dict) -> str:
  rows = []
  for name, rec in records.items():
    for i, (m, r) in enumerate(rec["methods"].items()):
      k, n = _reached(r)
      star = " (target)" if m == rec["baseline"] else ""
      ses = [e for e in r.get("final_val_se", []) if e is not None]
      rows.append(
        [
          f"{name} ({rec['target_val_loss']:.4g})" if i == 0 else "",
          f"`{m}`{star}",
          g(_median(r["final_val_loss"]), "{:.4g}") + (f" ± {_median(ses):.3f}" if ses else ""),
          _paired(r),
          f"{k} of {n}",
          g(_median_reached(r["time_to_target_s"]), "{:.2f} s"),
          g(r["time_ratio"], "{:.2f}"),
          _resolved(r) if m != rec["baseline"] else "",
          g(_median_reached(r["steps_to_target"]), "{:.0f}"),
          g(r["teleport_cost_grad_steps"]),
        ]
      )
  return _table(
    [
      "workload (target)",
      "method",
      "final val. loss ± SE",
      "paired Δ final, median [min, max]",
      "reached",
      "time to target",
      "ratio",
      "resolved: final / time",
      "steps to target",
      "teleport cost (AdamW steps)",
    ],
    rows,
  )


def resolution_paragraph(records: dict) -> str:
  """What the runs resolve: the noise of the final losses and of the time ratios, measured."""
  text = {w: r for w, r in records.items() if r.get("monitor_units") != r.get("full_units")}
  parts = []
  for w, rec in text.items():
    bias = [
      abs(m - f)
      for r in rec["methods"].values()
      for m, f in zip(r.get("final_monitor_loss", []), r["final_val_loss"])
      if m is not None and f is not None
    ]
    ses = [e for r in rec["methods"].values() for e in r.get("final_val_se", []) if e is not None]
    parts.append(
      f"On {_name(w)} the learning curve is read on {rec['monitor_units']} of the "
      f"{rec['full_units']} validation windows (every third), the final loss on all of them "
      f"(standard error {min(ses):.3f}–{max(ses):.3f}); at the final parameters the sample "
      f"read up to {max(bias):.3f} away from the whole split"
    )
  res = [r.get("time_resolution") for r in records.values() if r.get("time_resolution")]
  counts = {"final": 0, "time": 0, "compared": 0}
  for rec in records.values():
    for m, r in rec["methods"].items():
      if m == rec["baseline"]:
        continue
      counts["compared"] += 1
      counts["final"] += r.get("resolved_final") is not None
      counts["time"] += r.get("resolved_time") is not None
  return (
    "**What these runs resolve.** Each method is compared with the target's baseline "
    "seed by seed (the same initialisation and minibatches): *paired Δ final* is the "
    "difference of final validation losses on the whole split, and a difference is "
    "*resolved* (lower/higher) when every seed's difference has one sign and lies beyond "
    "twice its standard error over the validation examples (windows). A time ratio is "
    "resolved (faster/slower) when every seed's ratio lies beyond the evaluation grid, "
    "1 ± eval_every / steps to target"
    + (f" ({min(res):.2f}–{max(res):.2f} here). " if res else ". ")
    + (" ".join(p + "." for p in parts) + " " if parts else "")
    + f"Of {counts['compared']} comparisons, {counts['final']} final-loss differences and "
    f"{counts['time']} time ratios are resolved; the rest are within the noise of "
    f"{len(next(iter(records.values()))['methods']['adamw']['final_val_loss'])} seeds."
  )


def per_seed_table(records: dict) -> str:
  rows = []
  for name, rec in records.items():
    for i, m in enumerate(m for m in PER_SEED_METHODS if m in rec["methods"]):
      r = rec["methods"][m]
      moves = "–"
      if r["kind"] == "teleport":
        moves = " / ".join(
          f"{t}" + (f" ({j} rejected)" if j else "") for t, j in zip(r["teleports"], r["rejected"])
        )
      rows.append(
        [
          name if i == 0 else "",
          f"`{m}`",
          " / ".join(g(f, "{:.4g}") for f in r["final_val_loss"]),
          " / ".join(g(t, "{:.3g}") for t in r["train_time_s"]),
          moves,
          f"{r['compile_s']:.0f}",
        ]
      )
  return _table(
    [
      "workload",
      "method",
      "final val. loss per seed",
      "training s per seed",
      "teleports",
      "compile s",
    ],
    rows,
  )


def workloads_findings(records: dict) -> str:
  same, costs_on, costs_off = [], [], []
  for w, rec in records.items():
    a, b = rec["methods"].get("tp_lookahead"), rec["methods"].get("tp_lookahead_nostab")
    if a and b and a["hp"] == b["hp"]:
      same.append((w, a["final_val_loss"] == b["final_val_loss"]))
      costs_on.append(a["teleport_cost_grad_steps"])
      costs_off.append(b["teleport_cost_grad_steps"])
  unchanged = sum(s for _, s in same)
  grad_above = sum(
    _median(rec["methods"]["tp_gradbalance"]["final_val_loss"])
    > _median(rec["methods"]["norm_balance"]["final_val_loss"])
    for rec in records.values()
  )
  sets = [w for w, rec in records.items() if rec["baseline"] == "norm_balance"]
  others = []
  for w, rec in records.items():
    if w not in sets:
      d = _rel(_median(rec["methods"]["norm_balance"]["final_val_loss"]), rec["target_val_loss"])
      others.append(
        f"{100 * abs(d):.1f} % {'above' if d > 0 else 'below'} the target on {_name(w)}"
      )
  drift = max(
    r["max_rel_loss_drift"]
    for rec in records.values()
    for r in rec["methods"].values()
    if r["max_rel_loss_drift"] is not None
  )
  nonfinite = sum(r["nonfinite"] for rec in records.values() for r in rec["methods"].values())
  searched = [
    (sum(r["teleports"]), sum(r["rejected"]))
    for rec in records.values()
    for m, r in rec["methods"].items()
    if m != "tp_gradbalance" and r["kind"] == "teleport"
  ]
  lines = [
    "* **The stability bound is pure cost here.** Where `tp_lookahead` and "
    "`tp_lookahead_nostab` were tuned to the same draw "
    f"({len(same)} of {len(records)} workloads), the bound changed no final loss on "
    f"{unchanged} of them (the same moves, the same losses to all digits), and a "
    f"look-ahead teleport cost {min(costs_on):.0f}–{max(costs_on):.0f} AdamW steps "
    f"with it against {min(costs_off):.0f}–{max(costs_off):.0f} without.",
    f"* **Norm balancing is the baseline to beat.** It sets the target on {len(sets)} of "
    f"{len(records)} workloads; elsewhere its median final loss is "
    + " and ".join(others)
    + ". Gradient balancing at every step (`tp_gradbalance`, "
    "the same closed form pointed at the gradient, bounded by default) ends above norm "
    f"balancing on {grad_above} of {len(records)}.",
    "* **Trust held.** The largest relative loss change of an accepted teleport or "
    f"balancing was {drift:.2g} (float32); {nonfinite} runs went non-finite; "
    f"{sum(j for _, j in searched)} of {sum(t for t, _ in searched)} searched or "
    "checked teleports were rejected, and the parameters kept.",
  ]
  return "\n".join(lines)


_COST_NAMES = {
  "regression": "the seed's regression (GD)",
  "mlp_digits": "the digits MLP (AdamW)",
  "cnn_digits": "the digits CNN (AdamW)",
  "char_transformer": "the GELU/LayerNorm character transformer (AdamW)",
}


def teleport_cost_section(results: Path) -> str:
  tc = load("teleport_cost", results)
  rows = []
  kept = []
  for name, rec in tc["records"].items():
    snaps = rec["benefit"]["snapshots"]
    for v in ("onestep", "lookahead"):
      c = rec["cost"]["variants"][v]
      s = rec["summary"][v]
      gains = [r[v]["held_out_gain_50"] for r in snaps]
      helped = sum(x > 0 for x in gains)
      rows.append(
        [
          _COST_NAMES.get(name, name) if v == "onestep" else "",
          "`onestep` (default)" if v == "onestep" else "`lookahead` (before)",
          f"{c['teleport_in_steps']:.0f}",
          f"{c['compile_ratio']:.1f}",
          f"{c['skipped_ratio']:.2f}",
          g(s["median_lookahead5_gain"]),
          f"{g(statistics.median(gains))} [{g(min(gains))}, {g(max(gains))}]",
          f"{helped}/{len(gains)}",
        ]
      )
    k = rec["summary"]["onestep"].get("gain_kept")
    if k is not None:
      kept.append((name, k))
  table = _table(
    [
      "workload",
      "teleport",
      "one teleport (plain steps)",
      "compile (× plain)",
      "skipped step (× plain)",
      "5-step look-ahead gain (median)",
      "held-out loss gain 50 steps later: median [min, max]",
      "helped",
    ],
    rows,
  )
  kept_s = ", ".join(f"{_COST_NAMES.get(n, n)} {100 * k:.0f} %" for n, k in kept)
  return (
    "`python -m benchmarks.teleport_cost` compiles the README's train step (the schedule "
    "inside, `stability=True` as a repeating schedule's default) for the default teleport "
    "(`onestep`: `tj.solvers.OneStep` on the one-step look-ahead, 2 rounds of 2 trials, its "
    "stability bound by differences of gradients) and for the previous default (`lookahead`: "
    "`tj.solvers.Lie`, 10 steps on the 5-step optimizer look-ahead, the bound by "
    "forward-over-reverse products), and times it side by side with the plain step (median of "
    "interleaved rounds, each call blocked on) at a step that teleports (after the one-time "
    "verification) and at one the schedule skips. From "
    f"{', '.join(str(len(r['benefit']['snapshots'])) for r in tc['records'].values())} "
    "points of a plain training run (per workload) it applies each teleport and reports the "
    "gain in the previous default's objective (the loss on the teleport batch after the "
    "teleport step and 4 more optimizer steps, against 5 plain steps) and in the held-out "
    "loss after 50 steps on the same minibatches (the validation split; the training loss for "
    "the seed's 4-sample regression; positive: the teleport helped; the spread over the points "
    "is the noise of the median):\n\n"
    + table
    + "\n\nThe default keeps this share of the previous default's median look-ahead gain: "
    + kept_s
    + ". The look-ahead gain is a short-horizon yardstick: "
    + _helped_sentence(tc["records"])
  )


def _helped_sentence(records: dict) -> str:
  """Where neither teleport leaves the held-out loss 50 steps later lower at most points."""
  worse = []
  for name, rec in records.items():
    snaps = rec["benefit"]["snapshots"]
    if all(
      2 * sum(r[v]["held_out_gain_50"] > 0 for r in snaps) < len(snaps)
      for v in ("onestep", "lookahead")
    ):
      worse.append(_COST_NAMES.get(name, name))
  if not worse:
    return "both teleports leave the held-out loss 50 steps later lower at most points."
  return (
    "on " + " and ".join(worse) + ", neither teleport leaves the held-out loss 50 steps "
    "later lower at most points, whatever its look-ahead gain."
  )


# ------------------------------------------------------------------ idle steps, loops
def idle_table(records: dict) -> str:
  rows = [
    [
      _name(w),
      f"{rec['skip_step_overhead']:.2f}",
      f"{rec['static_skip_step_overhead']:.2f}",
      f"{rec['loop_skip_overhead']:.2f}",
      f"{rec['loop_skip_overhead_split']:.2f}",
    ]
    for w, rec in records.items()
  ]
  return _table(
    [
      "workload",
      "one call: `lax.cond` skipped / plain",
      "one call: `teleport=False` / plain",
      "training: schedule in every step / plain",
      "training: chunks decided in Python / plain",
    ],
    rows,
  )


def loop_modes_section(results: Path) -> str:
  lm = load("loop_modes", results)
  rows, spreads = [], []
  for r in lm["records"]:
    for mode in ("scan", "steps"):
      a = r["rounds_ms"][mode]
      spreads.append((max(a) - min(a)) / min(a))
    rows.append(
      [
        r["description"].split(";")[0],
        f"{r['step_ms_scan']:.3g} ms",
        f"{r['step_ms_steps']:.3g} ms",
        f"{r['scan_over_steps']:.2f}",
        r["chosen"],
      ]
    )
  table = _table(
    ["workload", "in `lax.scan`", "one call per step", "scan / steps", "the workloads use"], rows
  )
  return (
    "XLA's CPU convolutions run several times slower inside a loop body. `python -m "
    "benchmarks.loop_modes --quick` trains each workload's AdamW both ways side by side, "
    "inside a `lax.scan` of one evaluation interval and as one compiled call per step "
    f"(median ms per step over {len(lm['records'][0]['rounds_ms']['scan'])} interleaved "
    "rounds after a warm-up run, `quick` workload sizes):\n\n"
    + table
    + f"\n\nThe rounds of a row differ by at most {100 * max(spreads):.0f} % "
    "(`rounds_ms` in `benchmarks/results/loop_modes.json`). The training workloads "
    'train the CNNs by calls of a compiled step (`Workload.loop="steps"`) and the '
    "others in the loop."
  )


# ------------------------------------------------------------------ scaling
def scaling_section(results: Path) -> str:
  sc = load("scaling", results)
  points: dict[tuple, dict] = {}
  for r in sc["rows"]:
    points.setdefault((r["width"], r["depth"], r["batch"]), {})[r["symmetry"]] = r

  def cell(r):
    if r is None:
      return "–"
    if r.get("step_per_grad") is not None:
      return f"{r['step_per_grad']:.1f}×"
    note = r.get("note", "")
    if "batch" in note:
      return "– (batch > width + 1: no exact action)"
    return "not run (O(width³) per step)"

  rows = [
    [
      str(w),
      str(d),
      str(b),
      cell(p.get("rescaling")),
      g((p.get("rescaling") or {}).get("flops_per_grad"), "{:.1f}×"),
      cell(p.get("data_gl")),
    ]
    for (w, d, b), p in points.items()
  ]
  table = _table(
    [
      "width",
      "depth",
      "batch",
      "`PositiveRescaling`",
      "its XLA flops / gradient's",
      "`DataDependentGL`",
    ],
    rows,
  )
  names = []
  pieces: dict[tuple, dict] = {}
  for p in sc["data_gl_pieces"]:
    if p["width"] < 256:
      continue
    if p["piece"] not in names:
      names.append(p["piece"])
    pieces.setdefault((p["width"], p["depth"], p["batch"]), {})[p["piece"]] = p["per_grad"]
  ptable = _table(
    ["width / depth / batch", *names],
    [
      [f"{w} / {d} / {b}", *(g(v.get(n), "{:.2f}") for n in names)]
      for (w, d, b), v in pieces.items()
    ],
  )
  flops = [
    r["flops_per_grad"]
    for r in sc["rows"]
    if r["symmetry"] == "rescaling" and r.get("flops_per_grad")
  ]
  return (
    f"`python -m benchmarks.run --only scaling` ({sc['wall_s'] / 60:.0f} minutes; "
    "`benchmarks/results/scaling.json`) times one inner step of the Lie back-end "
    "(objective `max_grad_norm`) against one gradient evaluation, as "
    "`(T(num_steps=N1) - T(num_steps=N0)) / (N1 - N0)` of the compiled teleport, over "
    "widths, depths and batches of an MLP with biases:\n\n"
    + table
    + "\n\nThe data-free step differentiates `‖∇L‖²` on the algebra, a second-order "
    f"computation: XLA counts {min(flops):.1f}–{max(flops):.1f}× the flops of a gradient, "
    "so about 3× is its floor. The data-dependent action's dense linear algebra is "
    "O(width³) per hidden layer (an LU and a solve for the Cayley transform, an LU "
    "solve for `A⁻¹K`, a thin QR of the layer inputs, computed for the move and again "
    "for the objective's first-order action at the new point), a gradient "
    "O(batch·width²): the ratio grows with width/batch and is lowest with the batch "
    "close to the width, the largest batch for which the action is exact. Wide layers "
    "would need low-rank group steps (`ξ = UVᵀ`, Woodbury updates instead of LU), "
    "which are not built. Its pieces, each a standalone jitted call, in gradient "
    "evaluations:\n\n" + ptable
  )


# ------------------------------------------------------------------ seed problem
def time_to_target_section(results: Path) -> str:
  ttt = load("time_to_target", results)
  rows = []
  for r in ttt["rows"]:
    rows.append(
      [
        r["problem"],
        str(r["seed"]),
        f"{r['target_loss']:.4g}",
        f"{r['steps_gd']} / {r['steps_teleport']}",
        f"{r['time_gd_ms']:.1f} / {r['time_teleport_ms']:.1f}",
        f"{r['ratio']:.2f}",
      ]
    )
  for r in ttt["regression"]["harder_targets"]:
    rows.append(
      [
        f"regression, GD's loss at epoch {r['target_epoch']:,}",
        str(r["seed"]),
        f"{r['target_loss']:.4g}",
        f"{r['steps_gd']} / {r['steps_teleport']}",
        f"{r['time_gd_ms']:.1f} / {r['time_teleport_ms']:.1f}",
        f"{r['ratio']:.2f}",
      ]
    )
  table = _table(
    [
      "problem (target)",
      "seed",
      "target loss",
      "steps: plain / teleporting",
      "ms: plain / teleporting",
      "ratio",
    ],
    rows,
  )
  reg = [r for r in ttt["rows"] if r["problem"] == "regression"]
  gd_step = _median([r["time_gd_ms"] / r["steps_gd"] for r in reg])
  tp = _median([r["teleport_overhead_ms"] for r in reg])
  budget = (
    0.5 * _median([r["time_gd_ms"] for r in reg])
    - _median([r["steps_teleport"] for r in reg]) * gd_step
  )
  return (
    "`python -m benchmarks.run --only time_to_target` runs each method's whole training "
    "loop as one compiled `lax.while_loop` until the loss reaches the target (the loss "
    "plain GD or SGD reaches after the given epochs), teleport included:\n\n"
    + table
    + f"\n\nOn the seed's problem a plain GD step costs {1000 * gd_step:.1f} µs inside "
    f"the compiled loop; the teleport (30 inner steps, each differentiating a 5-step "
    f"look-ahead through the data-dependent action) costs {tp:.1f} ms, about "
    f"{tp / gd_step:,.0f} GD steps. To reach 0.5× it would have to cost at most "
    f"{budget:.1f} ms. For harder targets one early teleport buys a large early lead, "
    "not a faster asymptote. The speed-up over epochs in the reproduction is real; on "
    "the clock it pays only where a gradient step is expensive relative to a teleport."
  )


def user_loop_section(results: Path) -> str:
  ul = load("user_loop", results)
  p = ul["protocol"]
  rows = [
    [
      r["dims"],
      r["optimizer"],
      r["variant"],
      r["finite"],
      r["below_none"],
      f"{_ratio(r['final_ratio_median'])} / {_ratio(r['final_ratio_max'])}",
      g(r["max_lr_lambda_after"], "{:.2f}"),
      f"{r['accepted']} of {r['teleports']}",
    ]
    for r in ul["rows"]
    if r["variant"] != "none"
  ]
  opts = ", ".join(f"{o['name']} lr {o['lr']:g}" for o in p["optimizers"].values())
  return (
    "`python -m benchmarks.user_loop` calls `tj.teleport` between epochs of a user's own "
    f"loop ({opts}; {p['epochs']} epochs, a teleport every {p['every']}, "
    f"{len(p['seeds'])} seeds per MLP; `{p['symmetry']}`). Variants: `told` passes "
    "`learning_rate=` (GD) or `optimizer=`/`opt_state=` (AdaGrad); `untold` passes "
    "neither (no stability bound applies); `untold_bounded` adds `stability=True` to "
    "`untold`. Final loss against the same seed's run without teleport, and GD's step "
    "sharpness `lr·λ_max` after a teleport (unstable above 2):\n\n"
    + _table(
      [
        "MLP (samples-widths)",
        "optimizer",
        "variant",
        "finite",
        "below no teleport",
        "final / no teleport (median / max)",
        "max `lr·λ_max` after",
        "accepted",
      ],
      rows,
    )
  )


def action_drift_section(results: Path) -> str:
  ad = load("action_drift", results)
  rows = [
    [
      name,
      f"{v['float32']['max_rel_loss_drift']:.2g}",
      f"{v['float64']['max_rel_loss_drift']:.2g}",
      g(v["float32"]["min_singular_ratio_at_worst"], "{:.2g}"),
    ]
    for name, v in ad["by_action"].items()
  ]
  return (
    "`python -m benchmarks.action_drift` applies random group elements (scale "
    f"{ad['scale']:g}, {ad['trials']} trials) to MLPs of {len(ad['shapes'])} shapes and "
    "measures the largest relative loss change:\n\n"
    + _table(
      [
        "action",
        "float32",
        "float64",
        "smallest singular value ratio of the layer inputs (float32, worst trial)",
      ],
      rows,
    )
    + "\n\nThe exact actions drift at rounding level, the data-dependent one by about "
    "`eps × cond` of the batch's layer inputs (a square batch is the worst case); the "
    "published first-order action is not loss-invariant."
  )


def sharding_section(results: Path) -> str:
  sh = load("sharding", results)
  m = sh["model"]
  rows = []
  base_ms = {}
  for r in sh["records"]:
    base_ms.setdefault(r["layout"], r)
    c0, c1 = r["collectives_plain"], r["collectives_teleport"]
    rows.append(
      [
        r["layout"],
        str(r["devices"]),
        f"{1000 * r['plain_step_s']:.1f}",
        f"{r['skip_step_s'] / r['plain_step_s']:.2f}",
        f"{r['teleport_step_s']:.2f}",
        f"{r['params_state_bytes_per_device'] / 1024:.0f}",
        f"{r['teleport_working_set_bytes'] / 2**20:.1f}",
        f"{c0['all-gather']} / {c1['all-gather']}",
        f"{c0['collective-permute']} / {c1['collective-permute']}",
      ]
    )
  recs = sh["records"]
  drift = max(r["rel_loss_drift"] for r in recs)
  accepted = all(r["teleport_accepted"] for r in recs)
  kept = all(r["outputs_keep_shardings"] for r in recs)
  ct = [r["compile_teleport_s"] for r in recs]
  cp = [r["compile_plain_s"] for r in recs]
  return (
    f"`python -m benchmarks.sharding --{sh['mode']}` ({sh['wall_s'] / 60:.0f} minutes, "
    f"{len(sh['machine']['devices'])} emulated devices on a {sh['machine']['cpu_count']}-core "
    f"CPU; `benchmarks/results/sharding.json`): a {m['layers']}-layer transformer (width "
    f"{m['d_model']}, {m['heads']} heads, context {m['context']}; {int(m['parameters']):,} "
    "parameters), AdamW, per-head `GL` on Q/K and V/O, one teleport after three AdamW "
    "steps. Emulated devices share the host's cores: the times measure overheads, not "
    "speed-ups.\n\n"
    + _table(
      [
        "layout",
        "devices",
        "plain step ms",
        "not teleporting / plain",
        "teleporting step s",
        "params + state per device (KiB)",
        "teleport working set per device (MiB)",
        "all-gathers: plain / teleporting",
        "collective-permutes: plain / teleporting",
      ],
      rows,
    )
    + "\n\n"
    + ("Every teleport was accepted" if accepted else "Not every teleport was accepted")
    + f" (largest relative loss change {drift:.2g}) and "
    + ("every output kept its sharding" if kept else "not every output kept its sharding")
    + ". With FSDP each device stores 1/n of the parameters and optimizer state, and the "
    "teleport's working set (its temporaries beyond the plain step's, mostly the "
    "differentiated look-ahead) is split too. The teleporting step runs one set of "
    "all-gathers per model evaluation inside the teleport, as its cost in gradient "
    f"evaluations says. Compiling the teleporting step took {min(ct):.0f}–{max(ct):.0f} s, "
    f"the plain one {min(cp):.0f}–{max(cp):.0f} s."
  )


# ------------------------------------------------------------------ the page
def cpu_flags_section(results: Path) -> str:
  cf = load("cpu_flags", results)
  recs = cf["records"]
  base = recs["default"]["cases"]
  rows = []
  for setting, rec in recs.items():
    for name, r in rec["cases"].items():
      b = base[name]
      rows.append(
        [
          f"`{setting}`",
          _COST_NAMES.get(name, name),
          f"{r['plain_compile_s']:.2f}",
          f"{r['teleport_compile_s']:.2f} ({r['teleport_compile_s'] / r['plain_compile_s']:.1f}×)",
          f"{1e3 * r['plain_step_s']:.3f} [{1e3 * r['plain_step_iqr_s'][0]:.3f}, "
          f"{1e3 * r['plain_step_iqr_s'][1]:.3f}]",
          f"{1e3 * r['teleport_step_s']:.1f} [{1e3 * r['teleport_step_iqr_s'][0]:.1f}, "
          f"{1e3 * r['teleport_step_iqr_s'][1]:.1f}]",
          f"{r['teleport_compile_s'] / b['teleport_compile_s']:.2f}",
        ]
      )
  table = _table(
    [
      "setting",
      "workload",
      "plain step compile (s)",
      "teleporting step compile (s)",
      "plain step (ms): median [IQR]",
      "teleporting step (ms): median [IQR]",
      "teleport compile vs `default`",
    ],
    rows,
  )
  return (
    "`python -m benchmarks.cpu_flags` runs each setting in its own process (XLA reads its "
    "flags once per process) on the digits MLP and CNN, AdamW, the default teleport with "
    "`stability=True`: `default` is XLA's defaults with `OPENBLAS_NUM_THREADS=1` (what every "
    "benchmark here sets); `classic_emitters` adds `XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`, "
    "XLA's older loop emitters for fusions; `openblas_default` leaves OpenBLAS's thread count "
    "to OpenBLAS:\n\n"
    + table
    + "\n\nOn CPU, XLA's SVD, LU and eigen-decompositions (used by the data-dependent "
    "actions, closed-form balancing and `LinearGL`'s exact inverse) call SciPy's OpenBLAS, "
    "which by default starts a thread per core next to XLA's own; on a small loaded machine "
    "they compete, so set `OPENBLAS_NUM_THREADS=1` before importing JAX when a teleport uses "
    "them (the digits workloads above use neither, which is why the third setting changes "
    "little there). " + _emitters_sentence(recs)
  )


def _emitters_sentence(recs: dict) -> str:
  base, classic = recs["default"]["cases"], recs["classic_emitters"]["cases"]
  comp = [1 - classic[n]["teleport_compile_s"] / base[n]["teleport_compile_s"] for n in base]
  step = [classic[n]["plain_step_s"] / base[n]["plain_step_s"] for n in base]
  tele = [classic[n]["teleport_step_s"] / base[n]["teleport_step_s"] for n in base]
  return (
    f"With the classic emitters the teleporting step compiles {100 * min(comp):.0f}–"
    f"{100 * max(comp):.0f} % faster, the plain step runs at {min(step):.2f}–{max(step):.2f}× "
    f"and the teleporting step at {min(tele):.2f}–{max(tele):.2f}× its time with XLA's "
    "defaults (medians of interleaved rounds; the interquartile ranges above are the "
    "noise within a process, and the settings ran in separate processes one after the "
    "other). A notebook that recompiles often gains from "
    "`XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`, set before JAX is imported; a "
    "training run that is long against its compile time should keep XLA's defaults. The "
    "test suite compiles this way."
  )


def learned_workloads_section(results: Path = RESULTS) -> str | None:
  """Learned teleports on the digits workloads, from ``learned_workloads.json`` (if present)."""
  path = results / "learned_workloads.json"
  if not path.exists():
    return None
  data = json.loads(path.read_text())
  records = data["workloads"]
  rows = []
  for name, rec in records.items():
    for i, (m, r) in enumerate(rec["methods"].items()):
      k, n = _reached(r)
      star = " (target)" if m == rec["baseline"] else ""
      meta = rec["meta_training"].get(m, {}).get("seconds")
      rows.append(
        [
          f"{name} ({rec['target_val_loss']:.4g})" if i == 0 else "",
          f"`{m}`{star}",
          g(_median(r["final_val_loss"]), "{:.4g}"),
          _paired(r),
          f"{k} of {n}",
          g(r["time_ratio"], "{:.2f}"),
          " / ".join(g(x, "{:.2f}") for x in r["paired_time_ratio"]),
          _resolved(r) if m != rec["baseline"] else "",
          g(r["us_per_step"], "{:.0f}"),
          g(meta, "{:.0f}"),
        ]
      )
  table = _table(
    [
      "workload (target)",
      "method",
      "final val. loss",
      "paired Δ final, median [min, max]",
      "reached",
      "ratio",
      "per seed",
      "resolved: final / time",
      "µs per step",
      "meta-training s",
    ],
    rows,
  )
  learned = [
    m for m in LEARNED_WORKLOAD_METHODS if any(m in r["methods"] for r in records.values())
  ]
  notes, reached = [], []
  for name, rec in records.items():
    for m in learned:
      r = rec["methods"].get(m)
      if not r:
        continue
      k, n = _reached(r)
      if k:
        reached.append(f"`{m}` on {_name(name)} ({k} of {n} seeds)")
      if not r.get("curves"):
        continue
      blow = []  # the step where the validation loss first passes its starting value again
      for c in r["curves"]:
        v = c["val_loss"]
        i = next((j for j in range(1, len(v)) if v[j] is None or v[j] > v[0]), None)
        if i is not None:
          blow.append(i * rec["eval_every"])
      if blow:
        notes.append(
          f"on {_name(name)}, `{m}` diverged on {len(blow)} of "
          f"{len(r['curves'])} seeds (its validation loss back above its start at steps "
          f"{min(blow)}–{max(blow)})"
        )
  drift = max(
    (
      r["max_rel_loss_drift"]
      for rec in records.values()
      for m, r in rec["methods"].items()
      if m in learned and m != "learned_lr"
    ),
    default=0.0,
  )
  s = data["setting"]
  parts = [
    "The target is reached by " + ", ".join(reached) + "."
    if reached
    else "No learned method reaches the target.",
    ("; ".join(notes) + ".")[:1].upper() + ("; ".join(notes) + ".")[1:]
    if notes
    else "No learned run diverged.",
    "Every accepted learned teleport kept the minibatch loss within `rtol` (largest "
    f"change {drift:.1e}).",
  ]
  after = " ".join(parts)
  intro = (
    "`python -m benchmarks.learned_workloads` meta-trains, per digits workload, three "
    "equivariant policies: one that proposes SGD's step size alone (`learned_lr`), one "
    "that proposes SGD's step size and a teleport at every step (`learned_lr_tele`), and "
    "one that teleports before every step of the tuned AdamW, its state transported "
    "(`learned_tele_adamw`, meta-trained on runs of the test's length so that it sees "
    f"AdamW's whole schedule). Each gets {s['meta_steps']} meta-steps of {s['tasks']} "
    f"training runs (unrolls of {s['unroll']} steps, SGD runs of {s['horizon']} steps, "
    f"initialisations drawn from {s['pool']} never used at test, a fresh minibatch at "
    "every step); the teleporting policies' meta-loss adds "
    f"{s.get('norm_penalty', 0):g} times the log-growth of the parameters' squared norm "
    "over each unroll (`MetaConfig.norm_penalty`). It then trains the test seeds with the "
    "workloads' tuned baselines at their stored values and with the policies, in one "
    "process and the workloads' own loop, and reads the ratios as the table above does "
    "(the policy's per-step cost included; meta-training time apart)."
  )
  return intro + "\n\n" + table + "\n\n" + after


def page(results: Path = RESULTS) -> str:
  wl = load("workloads", results)
  records = _workloads(wl)
  first = next(iter(records.values()))
  text = next((rec for w, rec in records.items() if w.startswith("char")), first)
  lat = load("latency", results)
  machine = lat["machine"]
  sections = [
    "# Performance",
    "<!-- Generated by `python -m benchmarks.report --write` from benchmarks/results/*.json: "
    "edit benchmarks/report.py, not this page. -->",
    "Every figure on this page is read from `benchmarks/results/*.json`, written by the "
    "command named with it on a "
    f"{machine['cpu_count']}-core CPU machine (JAX {machine['jax_version']}, "
    f"{machine['backend']} backend). Every comparison is timed side by side in one "
    "process, after warm-up, as the median of repeated runs with `block_until_ready`; "
    "compile time is reported apart ([benchmarks/README.md](../benchmarks/README.md) has "
    "the method and its caveats). `python -m benchmarks.run --quick` runs the core suites "
    "in a few minutes; every command runs unchanged on a GPU or TPU. Absolute times on a "
    "shared machine move between runs: compare figures within one table.",
    "## In short",
    summary(results),
    "## Targets",
    targets_table(results),
    "## Training workloads: time to a tuned baseline's loss",
    "`python -m benchmarks.workloads` (also `reproduce --only workloads`; protocol in "
    "`teleport_jax/experiments/workloads.py`) trains each workload with four baselines "
    "and five teleport configurations. All but one are tuned with the same budget: 8 "
    "log-uniform random draws of learning rate and weight decay (and the per-layer factor) "
    "per method, each on its own tuning seed (paired: AdamW and the methods built on it "
    "are tried at the same draws), the draw with the lowest final validation loss kept "
    "(stored in `teleport_jax/experiments/workloads_tuned.json`; `--retune` redraws). "
    "`tp_onestep`, the default teleport, is a drop-in addition to tuned AdamW and runs at "
    "its values. Then 3 evaluation seeds; the best baseline is the one with the lowest "
    "median final loss on the whole validation split, the target its median final loss "
    "on the learning curve's measure, the metric the training seconds until a run's "
    "validation loss first reaches it (compile time apart, evaluations not counted). "
    "The digits workloads train "
    f"{first['steps']:,} steps of batch 64 on the bundled 8×8 digits (evaluated every "
    f"{first['eval_every']} steps), the character transformers {text['steps']:,} steps "
    f"(evaluated every {text['eval_every']}). The workloads ask for XLA's own CPU dot "
    "kernels unless `XLA_FLAGS` says otherwise. Plots: `benchmarks/results/workloads_NAME.png`.",
    methods_table(records),
    workloads_table(records),
    "Per seed (the same seeds for every method):",
    per_seed_table(records),
    resolution_paragraph(records),
    workloads_findings(records),
    *(
      ["## Learned teleports on the digits workloads", learned]
      if (learned := learned_workloads_section(results))
      else []
    ),
    "## What a teleport costs",
    teleport_cost_section(results),
    "## CPU settings: compile time and threads",
    cpu_flags_section(results),
    "## A step that does not teleport",
    "`python -m benchmarks.workloads --overhead-only` compiles the plain train step and "
    "the same step with the optimizer wrapped in `tj.with_teleport` and times them side "
    "by side at a step the schedule skips (the skipped step returns the wrapped "
    "optimizer's update). `update(..., teleport=False)`, a Python bool, decides in "
    "Python instead: the program then holds no conditional. The last two columns time "
    "whole training runs with a `with_teleport` whose schedule never fires, in the "
    "workload's loop (`loop_skip_overhead` and `loop_skip_overhead_split` in "
    "`workloads.json`; the target is 1.05):",
    idle_table(records),
    "A `lax.cond` costs twice. Per call, XLA sizes one temporary buffer for the larger "
    "branch (the look-ahead's differentiated optimizer steps), which the CPU runtime "
    "allocates at every call; inside a compiled loop the large branch also keeps XLA's "
    "CPU runtime from running the step's kernels concurrently. With `teleport=False` "
    "what remains is passing the teleport state's small arrays in and out of every "
    "call, which shows only against a sub-millisecond step. Single measurements of this "
    "size vary by more than the 5 % the target allows. [Steps that do not "
    "teleport](usage.md#steps-that-do-not-teleport) shows how a training loop decides "
    "per chunk in Python.",
    "## A compiled loop or one call per step",
    loop_modes_section(results),
    "## Inner step against a gradient evaluation",
    scaling_section(results),
    "## Time to target on the seed's problems",
    time_to_target_section(results),
    "## Your own loop",
    user_loop_section(results),
    "## Loss drift of the group actions",
    action_drift_section(results),
    "## Multiple devices",
    sharding_section(results),
  ]
  return "\n\n".join(sections) + "\n"


def _replace_summary(text: str, block: str) -> str:
  a, b = text.find(SUMMARY_OPEN), text.find(SUMMARY_CLOSE)
  if a < 0 or b < a:
    raise ValueError(f"README.md has no {SUMMARY_OPEN} ... {SUMMARY_CLOSE} block")
  return text[: a + len(SUMMARY_OPEN)] + "\n" + block + "\n" + text[b:]


def stale(results: Path = RESULTS, page_path: Path = PAGE, readme: Path = README) -> list[str]:
  """The files that are not what the JSON files render (empty if all are current)."""
  out = []
  if not page_path.exists() or page_path.read_text() != page(results):
    out.append(str(page_path))
  text = readme.read_text()
  if _replace_summary(text, summary(results)) != text:
    out.append(str(readme))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.report", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON files' folder")
  parser.add_argument(
    "--write",
    nargs="?",
    const=PAGE,
    type=Path,
    metavar="PAGE",
    help="write the page (default docs/performance.md) and README.md's summary block",
  )
  parser.add_argument("--check", action="store_true", help="exit 1 if the files are not current")
  args = parser.parse_args(argv)
  if args.check:
    bad = stale(args.results)
    for path in bad:
      print(f"{path} is not current: run python -m benchmarks.report --write")
    return 1 if bad else 0
  if args.write:
    args.write.write_text(page(args.results))
    README.write_text(_replace_summary(README.read_text(), summary(args.results)))
    print(f"wrote {args.write} and the summary in {README.name}")
    return 0
  print(page(args.results), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
