"""The result tables of docs/results.md, generated from ``summary.json``, and a check of a second run.

Usage::

  python -m teleport_jax.experiments.readme_tables runs/summary.json
  python -m teleport_jax.experiments.readme_tables runs/summary.json --write
  python -m teleport_jax.experiments.readme_tables runs/summary.json --write docs/results.md
  python -m teleport_jax.experiments.readme_tables --check runs2/summary.json
  python -m teleport_jax.experiments.readme_tables --check docs/results.md runs2/summary.json

The first form prints one markdown block per experiment. ``--write FILE``
replaces the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
in ``FILE`` with the block ``NAME`` (running it twice changes nothing);
without ``FILE`` it writes ``docs/results.md`` and the README's summary block
(``<!-- results:mlp_regression_summary -->``, a few rows of the
``mlp_regression`` table). ``--check [FILE] OTHER_SUMMARY`` reads the figures
``FILE`` (default ``docs/results.md``) states, with their spread, renders the
same tables from a second run's ``summary.json``, prints a comparison table
(cell, stated value and spread, second run, within?) and exits non-zero if a
figure of the second run falls outside the stated spread.

Every figure is stated with its spread over seeds (or starts, or minima), in
one of these forms, which is also how ``--check`` reads it:

* ``m ± s``: mean and standard deviation; the second run's mean must lie in
  ``[m - s, m + s]``.
* ``m [a, b]``: mean and the range ``[min, max]`` (used where the standard
  deviation exceeds half the mean, so ``m - s`` would be meaningless for a
  positive quantity, and for figures that are not reproducible to one standard
  deviation); the second run's mean must lie in ``[a, b]``.
* ``≤ b``: a bound on a rounding-level figure (relative loss drift, ``1 - cos``),
  a decade or two above the largest measured value; the second run's largest
  value must not exceed it.
* a plain number or text (counts such as ``2 of 5``, yes/no): must be equal.

Every bound is widened by half a unit in the last digit shown, so a figure
that agrees up to the printed rounding passes. Cells in parentheses or marked
``(not checked)`` in a header are derived statistics (p-values) and are
reported but not checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BLOCKS = (
  "mlp_regression",
  "classification",
  "test_functions",
  "newton",
  "optimizers",
  "generalization",
  "backends",
)
_OPEN = "<!-- results:{} -->"
_CLOSE = "<!-- /results:{} -->"
PM = "±"
LE = "≤"
NOT_CHECKED = "(not checked)"


# ----------------------------------------------------------------- figures
@dataclasses.dataclass(frozen=True)
class Figure:
  """One table cell.

  Attributes:
    text: the cell as printed.
    value: the number ``--check`` compares (mean, or the largest value of a
      bound); ``None`` for text cells, which must match exactly.
    checked: whether ``--check`` compares it.
  """

  text: str
  value: float | None = None
  checked: bool = True


def _sig(x: float, digits: int) -> str:
  """``x`` with ``digits`` significant digits, exponent without padding (``3.3e-5``)."""
  if x == 0 or not math.isfinite(x):
    return "0" if x == 0 else str(x)
  out = f"{x:#.{digits}g}"  # keeps trailing zeros: they are significant
  mant, _, exp = out.partition("e")
  mant = mant.rstrip(".")
  return f"{mant}e{int(exp)}" if exp else mant


def _decimals_for(std: float, digits: int = 2) -> int:
  """Decimal places that show ``std`` with ``digits`` significant digits."""
  return max(0, digits - 1 - math.floor(math.log10(std)))


def _fixed(x: float, decimals: int) -> str:
  return f"{x:.{decimals}f}"


def _clean(values) -> np.ndarray:
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _finite(values) -> tuple[np.ndarray, int]:
  a = _clean(values)
  return a[np.isfinite(a)], int(np.sum(~np.isfinite(a)))


def _scientific(x: float) -> bool:
  return x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5)


def fmt_number(x: float, digits: int = 3) -> str:
  """A single value with ``digits`` significant digits."""
  return _sig(float(x), digits)


def spread(values, *, style: str = "auto", digits: int = 2) -> Figure:
  """The mean of ``values`` with its spread over seeds.

  Args:
    values: one value per seed (``None``/NaN/inf: a non-finite seed).
    style: ``"pm"`` (mean ± std), ``"range"`` (mean [min, max]) or ``"auto"``
      (``"pm"`` unless the std exceeds half the mean's magnitude).
    digits: significant digits of the std (``"pm"``) or of each number (``"range"``).

  Returns:
    A :class:`Figure`. With a non-finite seed it says only how many seeds
    diverged (``k of n diverge``), compared as text.
  """
  finite, bad = _finite(values)
  n = finite.size + bad
  if bad:
    return Figure(f"{bad} of {n} diverge")
  mean, std = float(finite.mean()), float(finite.std())
  if style == "auto":
    style = "range" if std > 0.5 * abs(mean) else "pm"
  integers = bool(np.all(finite == np.round(finite)))
  if finite.size == 1:
    text = f"{mean:.0f}" if integers else fmt_number(mean, digits + 1)
  elif style == "pm":
    text = _pm(mean, std, digits)
  elif integers:
    text = f"{mean:.0f} [{finite.min():.0f}, {finite.max():.0f}]"
  else:
    lo, hi = float(finite.min()), float(finite.max())
    d = digits + 1
    text = f"{fmt_number(mean, d)} [{fmt_number(lo, d)}, {fmt_number(hi, d)}]"
  return Figure(text, mean)


def _pm(mean: float, std: float, digits: int) -> str:
  """``mean ± std`` with ``digits`` significant digits of the std, the mean to the same place."""
  if std == 0:
    return f"{fmt_number(mean, digits + 2)} {PM} 0"
  if std < 1e-4 * abs(mean):  # the spread is far below the mean's precision
    return f"{fmt_number(mean, 5)} {PM} {fmt_number(std, 1)}"
  if std >= 1e-3 and abs(mean) < 1e5:
    d = _decimals_for(std, digits)
    return f"{_fixed(mean, d)} {PM} {_fixed(std, d)}"
  # small or large numbers: one exponent for both, so the digits line up
  e = math.floor(math.log10(max(abs(mean), std)))
  m, sd = mean / 10.0**e, std / 10.0**e
  d = _decimals_for(sd, digits)
  return f"{_fixed(m, d)}e{e} {PM} {_fixed(sd, d)}e{e}"


def bound(values, *, decades: int = 1, cap: float | None = None) -> Figure:
  """``≤ 10^k``: a rounding-level figure, ``decades`` above its largest value.

  ``cap``: a bound that holds by construction (a loss check's ``rtol``); used
  instead of a larger power of ten when every value is below it.
  """
  finite, bad = _finite(values)
  if bad:
    return Figure(f"non-finite in {bad} of {finite.size + bad}")
  if finite.size == 0:
    return Figure("–")
  top = float(np.max(np.abs(finite)))
  if top == 0:
    return Figure(f"{LE} {cap:g}" if cap is not None else f"{LE} 0", 0.0)
  # at least 3x above the largest value, then ``decades - 1`` more
  k = math.ceil(math.log10(3 * top)) + decades - 1
  if cap is not None and top <= cap < 10.0**k:
    mant, _, exp = f"{cap:g}".partition("e")
    return Figure(f"{LE} {mant}e{int(exp)}" if exp else f"{LE} {mant}", top)
  return Figure(f"{LE} 1e{k}", top)


def exact(value, fmt: Callable[[float], str] | None = None) -> Figure:
  """A figure that must reproduce exactly (a count, a yes/no)."""
  if isinstance(value, bool):
    return Figure("yes" if value else "no")
  if value is None:
    return Figure("–")
  if isinstance(value, str):
    return Figure(value)
  return Figure(fmt(value) if fmt else str(value), float(value))


def of(k: int, n: int) -> Figure:
  return Figure(f"{k} of {n}")


def derived(text: str) -> Figure:
  """A derived statistic (p-value): shown, not checked."""
  return Figure(text, None, checked=False)


def by_rounding(fig) -> Figure:
  """A figure that float rounding decides: shown in parentheses, not checked.

  Whether a seed of an unstable run diverges, or where an optimizer with a
  tiny ``eps`` ends, changes with the order of a sum (another machine, another
  XLA version): such a figure is reported but is not reproducible, and
  ``--check`` does not compare it.
  """
  text = fig.text if isinstance(fig, Figure) else str(fig)
  return Figure(f"({text})", None, checked=False)


# Rows whose figures rounding decides (see :func:`by_rounding`): the
# unconstrained max-gradient-norm teleport drives GD to the edge of stability,
# where whether a seed diverges is decided by rounding; RMSProp on the digits
# ends at losses that two runs of the same program on two machines do not share.
ROUNDING_DECIDED = {
  "mlp_regression": ("gd_teleport_max_grad_norm",),
  "optimizers": ("digits / RMSProp",),
}
ROUNDING_NOTE = (
  "Figures in parentheses are decided by float rounding (whether a seed at the edge of "
  "stability diverges; where an optimizer with a tiny `eps` ends): they change between "
  "machines and are not reproducible, and `readme_tables --check` does not compare them."
)


# ------------------------------------------------------------------ tables
@dataclasses.dataclass
class Table:
  """A markdown table: a header and rows whose first ``keys`` cells name the row."""

  header: Sequence[str]
  rows: list[list]
  keys: int = 1

  def row_key(self, row) -> str:
    return " ".join(_plain(c) for c in row[: self.keys])

  def render(self) -> str:
    def cell(c) -> str:
      return _escape(c.text if isinstance(c, Figure) else str(c))

    lines = [
      "| " + " | ".join(_escape(h) for h in self.header) + " |",
      "|" + "---|" * len(self.header),
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
    return "\n".join(lines)


Part = str | Table


def render(parts: Sequence[Part]) -> str:
  return "\n\n".join(p.render() if isinstance(p, Table) else p for p in parts)


def _seeds_phrase(n: int, what: str = "seeds") -> str:
  return f"{n} {what}"


# ----------------------------------------------------------- the experiments
def _ratio(a, b) -> list[float | None]:
  """Per-seed ``a / b`` (``None`` where either is missing or not positive)."""
  out = []
  for x, y in zip(a, b):
    ok = x is not None and y is not None and np.isfinite(x) and np.isfinite(y) and x > 0
    out.append(float(y) / float(x) if ok else None)
  return out


def _nonfinite(entry) -> Figure:
  return of(entry.get("nonfinite_runs", 0), entry["n_seeds"])


def mlp_regression(section: dict) -> list[Part]:
  runs = section["runs"]
  proto = section["protocol"]
  e, last = proto["table_epochs"]
  n = runs["gd"]["n_seeds"]
  rows = []
  for m, r in runs.items():
    per = r["loss_at_epoch_per_seed"]
    sharp = r.get("step_sharpness_after_teleports")
    max_sharp = [max(s) if s else None for s in sharp] if sharp else None
    rtol = proto["methods"][m].get("rtol")
    drifts = [d for seed in r.get("rel_loss_drift_per_teleport", []) for d in seed]
    statuses = [s for seed in r.get("teleport_status", []) for s in seed]
    published = "Published" in proto["methods"][m].get("symmetry", "")
    rounding = m in ROUNDING_DECIDED["mlp_regression"]
    rows.append(
      [
        f"`{m}`",
        spread(per[str(e)]),
        spread(per[str(last)]),
        exact("–") if max_sharp is None else spread(max_sharp),
        exact("–")
        if not statuses
        else Figure(f"{sum(s == 'SUCCESSFUL' for s in statuses)} of {len(statuses)}"),
        exact("–")
        if not drifts
        else (
          spread(drifts, style="range")
          if published
          else bound(drifts, cap=rtol if isinstance(rtol, float) else None)
        ),
        _nonfinite(r),
      ]
    )
    if rounding:
      rows[-1] = [rows[-1][0], *(by_rounding(c) for c in rows[-1][1:])]
  table = Table(
    (
      "method",
      f"loss @ epoch {e}",
      f"loss @ epoch {last}",
      "lr·λ_max after a teleport (max per run)",
      "teleports that moved",
      "rel. loss change per teleport",
      "non-finite seeds",
    ),
    rows,
  )
  intro = (
    f"Mean ± std over {_seeds_phrase(n)} (mean [min, max] where the std exceeds half the "
    f"mean); `lr·λ_max`: GD's step sharpness after a teleport epoch (20 power iterations; "
    "fixed-step GD is unstable above 2); "
    f"the loss change of our teleports is bounded by `rtol` = "
    f"{proto['methods']['gd_teleport']['rtol']:g}, that of the published action (no check) is "
    "given as mean [min, max] over its teleports. " + ROUNDING_NOTE
  )
  claims = _regression_claims(section)
  return [intro, table, claims]


def _regression_claims(section: dict) -> Table:
  runs = section["runs"]
  e, last = section["protocol"]["table_epochs"]
  targets = section["targets"]

  def per(m, epoch):
    return runs[m]["loss_at_epoch_per_seed"][str(epoch)]

  rows = []
  if "gd_teleport" in runs:
    rows.append(
      [
        f"`gd_teleport` at least 5× below `gd` at epoch {e} (`gd` / `gd_teleport` per seed)",
        spread(_ratio(per("gd_teleport", e), per("gd", e))),
        exact(targets.get("gd_teleport_le_fifth_of_gd")),
      ]
    )
  if "adagrad_teleport" in runs:
    rows.append(
      [
        f"`adagrad_teleport` below `adagrad` at epoch {e} (`adagrad` / `adagrad_teleport`)",
        spread(_ratio(per("adagrad_teleport", e), per("adagrad", e))),
        exact(targets.get("adagrad_teleport_below_adagrad")),
      ]
    )
  for m in ("gd_teleport_repeated", "gd_teleport_every20"):
    if m in runs:
      a, b = _clean(per(m, last)), _clean(per("gd", last))
      every = m.endswith("every20")
      rows.append(
        [
          f"`{m}` ends below `gd` "
          + ("in every seed" if every else "on average")
          + " (seeds where it does)",
          of(int(np.sum(a < b)), a.size),
          exact(bool(np.all(a < b)) if every else bool(a.mean() < b.mean())),
        ]
      )
  ours = ("gd_teleport", "adagrad_teleport", "gd_teleport_repeated", "gd_teleport_every20")
  firsts = [
    seed[:1] == ["SUCCESSFUL"] for m in ours if m in runs for seed in runs[m]["teleport_status"]
  ]
  rows.append(
    [
      "the first teleport of every run of ours moves (runs where it does)",
      of(sum(firsts), len(firsts)),
      exact(bool(targets.get("first_teleport_moved"))),
    ]
  )
  rows.append(
    [
      "every teleport of ours stays within `rtol` and no seed goes non-finite (non-finite seeds)",
      of(sum(runs[m]["nonfinite_runs"] for m in ours if m in runs), len(firsts)),
      exact(bool(targets.get("every_teleport_within_rtol") and targets.get("no_nonfinite_run"))),
    ]
  )
  return Table(("claim", "measured", "holds"), rows)


def classification(section: dict) -> list[Part]:
  runs = section["runs"]
  n = next(iter(runs.values()))["n_seeds"]
  proto = section["protocol"]
  rows = []
  for m, r in runs.items():
    ps = r["per_seed"]
    statuses = [s for seed in r.get("teleport_status", []) for s in seed]
    drifts = [d for seed in r.get("rel_loss_drift_per_teleport", []) for d in seed]
    rows.append(
      [
        f"`{m}`",
        spread(ps["final_train_loss"]),
        spread(ps["final_val_loss"]),
        spread(ps["best_val_loss"]),
        spread(ps["best_val_epoch"], style="range"),
        spread([100 * a for a in ps["final_val_accuracy"]]),
        exact("–")
        if not statuses
        else Figure(f"{sum(s == 'SUCCESSFUL' for s in statuses)} of {len(statuses)}"),
        exact("–") if not drifts else bound(drifts),
        _nonfinite(r),
      ]
    )
  intro = (
    f"{section['dataset']}, {proto['epochs']} epochs, mean ± std over {_seeds_phrase(n)} "
    "(the best validation epoch as mean [min, max])."
  )
  return [
    intro,
    Table(
      (
        "method",
        "train loss (end)",
        "val. loss (end)",
        "best val. loss",
        "best val. epoch",
        "val. accuracy % (end)",
        "teleports that moved",
        "rel. loss change per teleport",
        "non-finite seeds",
      ),
      rows,
    ),
  ]


def test_functions(section: dict) -> list[Part]:
  rows = []
  n = 0
  for fn, methods in section["runs"].items():
    for m, r in methods.items():
      iters = r["iters_to_tol"]
      n = len(iters)
      reached = [i for i in iters if i is not None]
      sharp = [v for v in r.get("first_teleport_sharpness", []) if v is not None]
      rows.append(
        [
          f"{fn}",
          f"`{m}`",
          spread(reached, style="range") if reached else exact("never"),
          of(len(reached), len(iters)),
          exact(r["num_teleports_total"]),
          exact("–") if not sharp else spread(sharp, style="range"),
          of(r["nonfinite_runs"], len(iters)),
        ]
      )
  intro = (
    f"Float64, deterministic; GD iterations until the loss is below the tolerance, mean "
    f"[min, max] over the {n} starts that reached it; `lr·λ_max` where the first teleport "
    "landed (fixed-step GD is unstable above 2)."
  )
  return [
    intro,
    Table(
      (
        "function",
        "method",
        "iterations to tol.",
        "starts that reached tol.",
        "teleports",
        "lr·λ_max after the first teleport",
        "non-finite",
      ),
      rows,
      keys=2,
    ),
  ]


def newton(section: dict) -> list[Part]:
  per = section["per_problem"]
  dims = section["protocol"]["dims"]
  rows = []
  for d in dims:
    rs = [r for r in per if r["n"] == d]

    def col(key, rs=rs):
      return [r[key] for r in rs]

    rows.append(
      [
        str(d),
        str(len(rs)),
        spread([1 - c for c in col("cos_eig_before")], style="range"),
        bound([1 - c for c in col("cos_eig_after")], decades=2),
        bound([1 - c for c in col("cos_newton_after")], decades=2),
        spread(col("gd_step"), style="range"),
        bound(col("teleport_gd_step"), decades=2),
        bound(col("rel_loss_drift"), decades=2),
      ]
    )
  intro = (
    f"Random SPD quadratics, κ = {section['protocol']['kappa']:g}, float64, "
    f"{section['protocol']['teleport']['num_steps']} teleport steps maximising ‖∇L‖²; "
    "rounding-level figures as bounds two decades above the largest value."
  )
  return [
    intro,
    Table(
      (
        "n",
        "seeds",
        "1 − |cos(∇L, v_max)| at the start",
        "… after the teleport",
        "1 − cos(∇L, H⁻¹∇L) after",
        "L/L0 after one GD step 1/λ_max",
        "… after teleport + that step",
        "rel. loss change",
      ),
      rows,
    ),
  ]


_OPTIMIZER_NAMES = dict(
  sgd="SGD", momentum="momentum", adagrad="AdaGrad", rmsprop="RMSProp", adam="Adam"
)
_PROBLEM_NAMES = dict(regression="regression", classification="digits")


def optimizers(section: dict) -> list[Part]:
  proto = section["protocol"]
  policies = ("keep", "reset", "transport")
  header = ("problem / optimizer", *policies, "no teleport", "beyond one std from no teleport")
  rows, apart = [], []
  for problem, sec in section["problems"].items():
    runs = sec["runs"]
    for name in dict.fromkeys(r["optimizer"] for r in runs.values()):
      base = runs.get(name)
      label = f"{_PROBLEM_NAMES.get(problem, problem)} / {_OPTIMIZER_NAMES.get(name, name)}"
      cells, verdict = [], []
      present = [p for p in policies if f"{name}_teleport_{p}" in runs]
      for p in policies:
        key = f"{name}_teleport_{p}"
        if key not in runs:
          cells.append(exact("–"))
          continue
        cells.append(_final_figure(runs[key]))
        v = _beyond(runs[key]["final_loss"], base["final_loss"]) if base else ""
        if v:
          verdict.append(f"{p} {v}")
      for i, p in enumerate(present):
        for q in present[i + 1 :]:
          a = runs[f"{name}_teleport_{p}"]["final_loss"]
          b = runs[f"{name}_teleport_{q}"]["final_loss"]
          if _beyond(a, b) in ("lower", "higher"):
            apart.append(f"{label}: {p} {_beyond(a, b)} than {q}")
      row = [
        label,
        *cells,
        _final_figure(base) if base else exact("–"),
        Figure(", ".join(verdict) or "none"),
      ]
      if label in ROUNDING_DECIDED["optimizers"]:
        row = [label, *(by_rounding(c) for c in row[1:])]
        apart = [a for a in apart if not a.startswith(label + ":")]
      rows.append(row)
  sizes = "; ".join(
    f"{_PROBLEM_NAMES.get(p, p)}: {len(s['seeds'])} seeds, {s['epochs']} epochs"
    for p, s in section["problems"].items()
  )
  intro = (
    "`reproduce --only optimizers` runs SGD, momentum, AdaGrad, RMSProp and Adam with and "
    "without teleport on the regression and digits classification problems (plots "
    "`optimizers_regression.png`, `optimizers_classification.png`), each teleport with "
    f"`with_teleport`'s default objective `{proto['regression']['teleport']['objective']}`, "
    "which simulates the optimizer that runs after it from the state its policy gives the new "
    f"point. Final training loss, mean ± std over seeds ({sizes}; mean [min, max] where the "
    "std exceeds half the mean). The last column names the policies whose mean ± std "
    "interval lies entirely below (lower) or above (higher) that of the same optimizer "
    "without teleport. " + ROUNDING_NOTE
  )
  if apart:
    between = (
      "Differences between policies beyond one std (the intervals do not overlap): "
      + "; ".join(apart)
      + ". All other differences between policies are within the spread over seeds."
    )
  else:
    between = (
      "No two state policies differ by more than the spread over seeds in any row (their "
      "mean ± std intervals overlap): no policy wins everywhere, and the order of the means "
      "is not a result."
    )
  return [intro, Table(header, rows), between]


def _final_figure(entry) -> Figure:
  return spread(entry["final_loss"])


def _beyond(a, b) -> str:
  """``"lower"``/``"higher"`` if ``a``'s mean ± std lies entirely below/above ``b``'s."""
  fa, bad_a = _finite(a)
  fb, bad_b = _finite(b)
  if bad_a and not bad_b:
    return "diverges"
  if not fa.size or not fb.size or bad_b:
    return ""
  lo_a, hi_a = fa.mean() - fa.std(), fa.mean() + fa.std()
  lo_b, hi_b = fb.mean() - fb.std(), fb.mean() + fb.std()
  if hi_a < lo_b:
    return "lower"
  if lo_a > hi_b:
    return "higher"
  return ""


def generalization(section: dict) -> list[Part]:
  runs = section["runs"]
  settings = section["protocol"]["settings"]
  n = runs["sgd"]["n_seeds"]
  rows = []
  for m, r in runs.items():
    end = r["final_val_loss_per_seed"]
    if m == "sgd":
      rows.append(
        ["none", exact("–"), exact("–"), exact("–"), spread(end), exact("–"), derived("–")]
      )
      continue
    d = r["final_val_loss_diff_vs_sgd"]
    diff = _clean(end) - _clean(runs["sgd"]["final_val_loss_per_seed"])
    kind = r["objective"]
    rows.append(
      [
        m.replace("_", " "),
        spread(r["objective_before"]),
        spread(r["objective_after"]),
        spread(r["measures_at_end"][kind]),
        spread(end),
        spread(diff, style="pm"),
        derived("–" if d["paired_t_p"] is None else _sig(d["paired_t_p"], 2)),
      ]
    )
  teleport = Table(
    (
      "teleport",
      "objective before",
      "after the teleport",
      "at the end",
      "val. loss at the end",
      "Δ val. loss vs none (paired)",
      "p (paired t-test) " + NOT_CHECKED,
    ),
    rows,
  )
  intro = (
    f"{section['dataset']}, teleport after epoch {settings['teleport_epoch']} of "
    f"{settings['epochs']}, mean ± std over {_seeds_phrase(n)}."
  )
  corr = {(r["measure"], r["target"]): r for r in section["correlation_table"]}
  measures = list(dict.fromkeys(r["measure"] for r in section["correlation_table"]))
  targets = list(dict.fromkeys(r["target"] for r in section["correlation_table"]))
  n_min = len(section["minima"])
  crow = []
  for m in measures:
    cells = []
    for t in targets:
      r = corr[(m, t)]
      cells.append(_pearson(r["pearson_r"], r["n"]))
    crow.append([m.replace("_", " "), *cells])
  names = {"val_loss": "validation loss", "gap": "generalisation gap", "train_loss": "train loss"}
  correlation = Table(("measure", *(names.get(t, t) for t in targets)), crow)
  corr_intro = (
    f"Pearson r over {n_min} trained minima with its 95 % confidence interval (Fisher z):"
  )
  srows = []
  for r in section["orbit_spread_table"]:
    if r["measure"] == "val_loss":
      continue
    within = _within_orbit(section["minima"], r["measure"])
    srows.append(
      [
        r["measure"].replace("_", " "),
        within,
        exact(r["across_minima_max_over_min"], lambda v: fmt_number(v, 3)),
      ]
    )
  spread_table = Table(
    (
      "measure",
      "max/min along one orbit (median [min, max] over minima)",
      "max/min across minima",
    ),
    srows,
  )
  return [intro, teleport, corr_intro, correlation, spread_table]


def _pearson(r: float | None, n: int) -> Figure:
  if r is None or n < 4:
    return exact("–")
  z = math.atanh(max(min(r, 0.999999), -0.999999))
  half = 1.96 / math.sqrt(n - 3)
  lo, hi = math.tanh(z - half), math.tanh(z + half)
  return Figure(f"{r:+.2f} [{lo:+.2f}, {hi:+.2f}]", r)


def _within_orbit(minima, measure) -> Figure:
  ratios = []
  for m in minima:
    vals = _clean([m[measure], *m["orbit"][measure]])
    if np.all(np.isfinite(vals)) and np.min(np.abs(vals)) > 0:
      ratios.append(float(np.max(vals) / np.min(vals)))
  if not ratios:
    return exact("–")
  med = float(np.median(ratios))
  lo, hi = min(ratios), max(ratios)
  return Figure(f"{fmt_number(med, 3)} [{fmt_number(lo, 3)}, {fmt_number(hi, 3)}]", med)


def _backend_teleports(records) -> list:
  moved = [r for r in records if r["status"] == "SUCCESSFUL"]
  gains = [r["objective_before"] / r["objective_after"] for r in moved if r["objective_after"]]
  cost = [r["cost_grad_evals"] for r in records if r.get("cost_grad_evals") is not None]
  return [
    Figure(f"{len(moved)} of {len(records)}"),
    bound([r["rel_loss_drift"] for r in moved], cap=1e-5) if moved else exact("–"),
    spread([r["held_out_drift"] for r in records], style="range"),
    spread(gains, style="range") if gains else exact("–"),
    derived(f"{np.mean(cost):.0f}") if cost else exact("–"),
  ]


def backends(section: dict) -> list[Part]:
  runs = section["runs"]
  proto = section["protocol"]
  reg = {k.split("/", 1)[1]: v for k, v in runs.items() if k.startswith("regression/")}
  cls = {k.split("/", 1)[1]: v for k, v in runs.items() if k.startswith("classification/")}
  epochs = list(next(iter(reg.values()))["loss_per_seed_at"])
  none = [exact("–")] * 5
  reg_rows = []
  for m, r in reg.items():
    name = "gd" if m == "gd" else f"gd + {m}"
    losses = [spread(r["loss_per_seed_at"][e]) for e in epochs]
    teleports = _backend_teleports(r["teleports"]) if r["teleports"] else none
    reg_rows.append([f"`{name}`", *losses, *teleports, _nonfinite(r)])
  cls_rows = []
  for m, r in cls.items():
    name = "sgd" if m == "sgd" else f"sgd + {m}"
    teleports = _backend_teleports(r["teleports"]) if r["teleports"] else none
    cls_rows.append(
      [
        f"`{name}`",
        spread(r["final_train_loss_per_seed"]),
        spread(r["final_val_loss_per_seed"]),
        *teleports,
        _nonfinite(r),
      ]
    )
  rep = section["repeated_levelset"]
  tele_cols = (
    "teleports that moved",
    "rel. loss change (batch)",
    "rel. loss change (held out)",
    "objective before / after",
    "cost in gradient evaluations (not checked)",
  )
  rp, cp = proto["regression"], proto["classification"]
  return [
    f"Regression: the seed's problem, GD lr {rp['optimizer'].split()[-1]}, one teleport at "
    f"epoch {rp['teleport_epoch']} ({rp['inner_steps']} inner steps of the look-ahead "
    f"objective), mean ± std over {len(rp['seeds'])} seeds; held out: "
    f"{rp['held_out']}.",
    Table(
      ("method", *(f"loss @ epoch {e}" for e in epochs), *tele_cols, "non-finite seeds"),
      reg_rows,
    ),
    f"Classification: {cp['dataset']}, SGD, teleports on the first minibatch of each of the "
    f"first 3 epochs ({cp['inner_steps']} inner steps), {cp['epochs']} epochs, "
    f"{len(cp['seeds'])} seeds; held out: the {cp['held_out']}.",
    Table(
      ("method", "train loss (end)", "val. loss (end)", *tele_cols, "non-finite seeds"),
      cls_rows,
    ),
    Table(
      ("ten level-set calls in a row", "largest cumulative rel. loss change", "statuses"),
      [
        [
          "regression, seed 0, from epoch 5",
          bound(rep["cumulative_rel_drift"], cap=rep["rtol"]),
          exact(", ".join(sorted(set(rep["statuses"])))),
        ]
      ],
    ),
  ]


GENERATORS: dict[str, Callable[[dict], list[Part]]] = {
  "mlp_regression": mlp_regression,
  "classification": classification,
  "test_functions": test_functions,
  "newton": newton,
  "optimizers": optimizers,
  "generalization": generalization,
  "backends": backends,
}


def blocks(summary: dict) -> dict[str, list[Part]]:
  """The parts of every block whose experiment is in ``summary``."""
  out = {}
  for name in BLOCKS:
    section = summary["experiments"].get(name)
    if section is not None:
      out[name] = GENERATORS[name](section)
  return out


# The README's summary: the methods of ours from the mlp_regression table, the
# same figures in fewer columns.
SUMMARY_BLOCK = "mlp_regression_summary"
SUMMARY_METHODS = (
  "gd",
  "gd_teleport",
  "adagrad",
  "adagrad_teleport",
  "gd_teleport_repeated",
  "gd_teleport_every20",
)
_SUMMARY_COLUMNS = (0, 1, 2, 4, 6)


def mlp_regression_summary(section: dict) -> list[Part]:
  """A few rows and columns of :func:`mlp_regression`'s table, for the README."""
  table = next(p for p in mlp_regression(section) if isinstance(p, Table))
  rows = [
    [row[i] for i in _SUMMARY_COLUMNS] for row in table.rows if _plain(row[0]) in SUMMARY_METHODS
  ]
  n = section["runs"]["gd"]["n_seeds"]
  rtol = section["protocol"]["methods"]["gd_teleport"]["rtol"]
  intro = (
    "The seed's MLP regression (Zhao et al. 2022, Figure 2) on its published protocol: "
    f"training loss, mean ± std over {_seeds_phrase(n)}; every teleport keeps the loss "
    f"within `rtol` = {rtol:g}."
  )
  return [intro, Table([table.header[i] for i in _SUMMARY_COLUMNS], rows)]


def extra_blocks(summary: dict) -> dict[str, list[Part]]:
  """Blocks written where a file has them, but not checked by ``--check``."""
  section = summary["experiments"].get("mlp_regression")
  return {} if section is None else {SUMMARY_BLOCK: mlp_regression_summary(section)}


def block_text(name: str, parts: Sequence[Part], summary: dict) -> str:
  return render([*parts, source_line(summary)])


def source_line(summary: dict) -> str:
  """Where a block's figures come from: the run's mode, JAX, and the code's hashes."""
  machine = summary.get("machine", {})
  library = summary.get("library", {})
  code = ""
  if "library_sha256" in library:
    code = f", library {library['library_sha256']}, experiments {library['experiments_sha256']}"
  return (
    f"<sub>Generated by `python -m teleport_jax.experiments.readme_tables` from a "
    f"{summary.get('mode', 'full')} run of `reproduce` (JAX {machine.get('jax', '?')}, "
    f"{machine.get('backend', '?')}{code}).</sub>"
  )


def stated_code(text: str) -> dict[str, str]:
  """The code hashes a file's blocks name (empty if none)."""
  m = re.search(r"library ([0-9a-f]{16}), experiments ([0-9a-f]{16})", text)
  return {} if m is None else {"library_sha256": m.group(1), "experiments_sha256": m.group(2)}


# ------------------------------------------------------------------ file I/O
def _default(relative: str) -> Path:
  """``relative`` in the repository this module sits in, else in the current directory."""
  root = Path(__file__).resolve().parents[2]
  return root / relative if (root / relative).exists() else Path(relative)


DEFAULT_RESULTS = "docs/results.md"
DEFAULT_README = "README.md"


def _span(text: str, name: str) -> tuple[int, int]:
  open_, close = _OPEN.format(name), _CLOSE.format(name)
  a = text.find(open_)
  b = text.find(close)
  if a < 0 or b < 0 or b < a:
    raise ValueError(f"no {open_} ... {close} block.")
  return a + len(open_), b


def write(path: Path, summary: dict) -> list[str]:
  """Replaces every block of ``summary`` that ``path`` has; returns the names written."""
  text = path.read_text()
  written = []
  for name, parts in {**blocks(summary), **extra_blocks(summary)}.items():
    try:
      a, b = _span(text, name)
    except ValueError:
      continue
    text = text[:a] + "\n" + block_text(name, parts, summary) + "\n" + text[b:]
    written.append(name)
  path.write_text(text)
  return written


def read_block(text: str, name: str) -> str:
  a, b = _span(text, name)
  return text[a:b]


def parse_tables(block: str) -> list[tuple[list[str], list[list[str]]]]:
  """The markdown tables of a block: ``[(header, rows), ...]``."""
  tables = []
  lines = block.splitlines()
  i = 0
  while i < len(lines):
    if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
      header = _cells(lines[i])
      rows = []
      i += 2
      while i < len(lines) and lines[i].startswith("|"):
        rows.append(_cells(lines[i]))
        i += 1
      tables.append((header, rows))
    else:
      i += 1
  return tables


def _escape(text: str) -> str:
  """A markdown table cell: ``|`` escaped."""
  return text.replace("|", "\\|")


def _cells(line: str) -> list[str]:
  inner = line.strip()[1:-1]
  return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"


def _half_unit(s: str) -> float:
  """Half a unit in the last digit shown of the number ``s``."""
  mant, _, exp = s.lower().partition("e")
  decimals = len(mant.split(".")[1]) if "." in mant else 0
  return 0.5 * 10.0 ** (-decimals + (int(exp) if exp else 0))


def interval(text: str) -> tuple[float, float] | None:
  """The interval a cell states, or ``None`` for text that must match exactly."""
  t = text.strip()
  m = re.fullmatch(rf"({_NUM}) {PM} ({_NUM})", t)
  if m:
    c, s = m.group(1), m.group(2)
    tol = _half_unit(c) + _half_unit(s)
    return float(c) - float(s) - tol, float(c) + float(s) + tol
  m = re.fullmatch(rf"({_NUM}) \[({_NUM}), ({_NUM})\]", t)
  if m:
    a, b = m.group(2), m.group(3)
    return float(a) - _half_unit(a), float(b) + _half_unit(b)
  m = re.fullmatch(rf"{LE} ({_NUM})", t)
  if m:
    return -math.inf, float(m.group(1)) * (1 + 1e-12)
  m = re.fullmatch(_NUM, t)
  if m:
    return float(t) - _half_unit(t), float(t) + _half_unit(t)
  return None


@dataclasses.dataclass(frozen=True)
class Comparison:
  cell: str
  stated: str
  second: str
  within: bool | None  # None: not checked


def compare(text: str, summary: dict) -> list[Comparison]:
  """Every cell of a file's blocks against the second run's figures."""
  out = []
  for name, parts in blocks(summary).items():
    try:
      stated = parse_tables(read_block(text, name))
    except ValueError:
      out.append(Comparison(name, "(no block in the file)", "", False))
      continue
    tables = [p for p in parts if isinstance(p, Table)]
    if len(stated) != len(tables):
      out.append(Comparison(name, f"{len(stated)} tables", f"{len(tables)} tables", False))
      continue
    for k, (table, (header, rows)) in enumerate(zip(tables, stated)):
      second = {table.row_key(row): row for row in table.rows}
      for row in rows:
        key = " ".join(_plain(c) for c in row[: table.keys])
        label = f"{name}[{k}] {key}"
        other = second.get(key)
        if other is None:
          out.append(Comparison(label, "(row)", "(missing in the second run)", False))
          continue
        cells = zip(header[table.keys :], row[table.keys :], other[table.keys :])
        for col, stated_cell, fig in cells:
          fig = fig if isinstance(fig, Figure) else Figure(str(fig))
          out.append(_compare_cell(f"{label} / {col}", col, stated_cell, fig))
  return out


def _plain(s) -> str:
  return (s.text if isinstance(s, Figure) else str(s)).replace("`", "")


def _compare_cell(label: str, column: str, stated_cell: str, fig: Figure) -> Comparison:
  if NOT_CHECKED in column or not fig.checked:
    return Comparison(label, stated_cell, fig.text, None)
  if stated_cell.startswith("`"):
    return Comparison(label, stated_cell, fig.text, stated_cell == fig.text)
  box = interval(stated_cell)
  if box is None or fig.value is None:
    return Comparison(label, stated_cell, fig.text, stated_cell == fig.text)
  lo, hi = box
  ok = lo <= fig.value <= hi
  return Comparison(label, stated_cell, _sig(fig.value, 4), ok)


def comparison_table(rows: list[Comparison]) -> str:
  lines = [
    "| cell | stated (with spread) | second run | within? |",
    "|---|---|---|---|",
  ]
  for c in rows:
    verdict = "not checked" if c.within is None else ("yes" if c.within else "**NO**")
    lines.append(f"| {c.cell} | {c.stated} | {c.second} | {verdict} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m teleport_jax.experiments.readme_tables", description=__doc__.split("\n")[0]
  )
  parser.add_argument("summary", nargs="?", type=Path, help="summary.json of a reproduce run")
  parser.add_argument(
    "--write",
    nargs="?",
    const="",
    type=str,
    metavar="FILE",
    help=f"replace the result blocks in FILE (default: {DEFAULT_RESULTS} and the summary "
    f"block of {DEFAULT_README})",
  )
  parser.add_argument(
    "--check",
    nargs="+",
    type=Path,
    metavar="PATH",
    help="[FILE] OTHER_SUMMARY: check that a second run's figures lie within the spread "
    f"FILE states (default {DEFAULT_RESULTS})",
  )
  args = parser.parse_args(argv)
  if args.check:
    if len(args.check) > 2:
      parser.error("--check takes [FILE] OTHER_SUMMARY")
    path, other = args.check if len(args.check) == 2 else (_default(DEFAULT_RESULTS), *args.check)
    text, second = path.read_text(), json.loads(other.read_text())
    rows = compare(text, second)
    print(comparison_table(rows))
    stated, actual = stated_code(text), second.get("library", {})
    for key, value in stated.items():
      if actual.get(key) != value:
        print(
          f"\nnote: {key} of {other} is {actual.get(key)}, the figures of {path} come from "
          f"{value}: the two runs ran different code."
        )
    bad = [c for c in rows if c.within is False]
    checked = [c for c in rows if c.within is not None]
    print(
      f"\n{len(checked) - len(bad)} of {len(checked)} checked figures of {other} lie within "
      f"the spread stated in {path}" + (f"; {len(bad)} do not." if bad else ".")
    )
    return 1 if bad else 0
  if args.summary is None:
    parser.error("the summary argument is required (unless --check is given)")
  summary = json.loads(args.summary.read_text())
  if args.write is not None:
    if args.write:
      paths = [Path(args.write)]
    else:
      paths = [_default(DEFAULT_RESULTS), _default(DEFAULT_README)]
    for path in paths:
      names = write(path, summary)
      print(f"wrote blocks {', '.join(names) or '(none found)'} into {path}")
  else:
    for name, parts in blocks(summary).items():
      print(f"{_OPEN.format(name)}\n{block_text(name, parts, summary)}\n{_CLOSE.format(name)}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
