"""Shared pieces of the benchmark suites: timing, compilation, memory, tables.

Timing protocol (every suite): a function is jit-compiled ahead of time with
``jax.jit(f).lower(*args).compile()`` (trace + lowering and XLA compilation are
timed separately), the compiled callable is warmed up, and then the callables
that are compared with each other are timed *side by side*: in every round each
of them runs once (a sample is ``number`` back-to-back calls, each followed by
``jax.block_until_ready``), rounds are repeated and the median per-call time is
reported. Interleaving the callables keeps a slow phase of a shared machine from
landing on one side of a comparison only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

MODES = ("smoke", "quick", "full")


# ------------------------------------------------------------------ compiling
@dataclasses.dataclass
class Compiled:
  """An ahead-of-time compiled function and what compiling it cost.

  Attributes:
    fn: the compiled callable (``jax.stages.Compiled``).
    jitted: the ``jax.jit`` wrapper it was lowered from.
    lower_s: seconds spent tracing and lowering to StableHLO.
    compile_s: seconds spent in the XLA compiler.
  """

  fn: Any
  jitted: Any
  lower_s: float
  compile_s: float

  @property
  def total_s(self) -> float:
    return self.lower_s + self.compile_s

  def __call__(self, *args):
    return self.fn(*args)


def compile_fn(
  fn: Callable, *args, jitted: Any = None, compiler_options: dict | None = None, **jit_kwargs
) -> Compiled:
  """``jax.jit(fn).lower(*args).compile()``, timing lowering and compiling apart.

  Args:
    fn: the Python function (ignored if ``jitted`` is given).
    *args: example arguments (arrays or pytrees of arrays).
    jitted: an existing ``jax.jit`` wrapper to lower instead of ``jax.jit(fn)``.
    compiler_options: XLA options for this compilation only (``Lowered.compile``).
    **jit_kwargs: passed to ``jax.jit``.

  Returns:
    A :class:`Compiled`.
  """
  jitted = jitted if jitted is not None else jax.jit(fn, **jit_kwargs)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
  t2 = time.perf_counter()
  return Compiled(compiled, jitted, t1 - t0, t2 - t1)


def flops(compiled: Any) -> float | None:
  """XLA's flop estimate of a compiled function, or ``None`` if unavailable.

  ``cost_analysis()`` counts the body of a ``while`` loop once (not times its
  trip count) and gives LAPACK/cuSOLVER custom calls (SVD, LU) no flops, so it
  is a lower bound for code that has either.
  """
  compiled = getattr(compiled, "fn", compiled)
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def memory(compiled: Any) -> dict[str, int] | None:
  """``compiled.memory_analysis()`` as a dict of byte counts, or ``None``."""
  compiled = getattr(compiled, "fn", compiled)
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if stats is None:
    return None
  keys = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
    "peak_memory_in_bytes",
  )
  out = {}
  for k in keys:
    v = getattr(stats, k, None)
    if v is not None:
      out[k.replace("_size_in_bytes", "_bytes").replace("_in_bytes", "_bytes")] = int(v)
  return out or None


def max_rss_bytes() -> int | None:
  """The process's peak resident set size so far (host memory; coarse)."""
  try:
    import resource
  except ImportError:  # not on Unix
    return None
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def device_memory() -> dict[str, int] | None:
  """Peak/in-use bytes of the first device, where the backend reports them (GPU, TPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - CPU devices do not implement it
    return None
  if not stats:
    return None
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keys if k in stats} or None


class CompileCounter:
  """Counts XLA backend compilations (``jax.monitoring`` events) while active.

  Examples:
    >>> with CompileCounter() as cc:
    ...   pass
    >>> cc.count
    0
  """

  _EVENT = "/jax/core/compile/backend_compile_duration"
  _PREFIX = "/jax/core/compile/"
  _listeners: list[CompileCounter] = []
  _registered = False

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.all_compile_seconds = 0.0  # tracing + lowering + XLA compile

  @classmethod
  def _dispatch(cls, event: str, duration: float, **kwargs) -> None:
    del kwargs
    for c in cls._listeners:
      if event == cls._EVENT:
        c.count += 1
        c.seconds += duration
      if event.startswith(cls._PREFIX):
        c.all_compile_seconds += duration

  def __enter__(self) -> CompileCounter:
    if not CompileCounter._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileCounter._dispatch)
      CompileCounter._registered = True
    CompileCounter._listeners.append(self)
    return self

  def __exit__(self, *exc) -> None:
    CompileCounter._listeners.remove(self)


# --------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
  """Per-call wall-clock statistics of one callable (seconds)."""

  median: float
  minimum: float
  q1: float
  q3: float
  samples: int
  number: int

  def as_dict(self) -> dict[str, float | int]:
    return {
      "median_s": self.median,
      "min_s": self.minimum,
      "q1_s": self.q1,
      "q3_s": self.q3,
      "samples": self.samples,
      "calls_per_sample": self.number,
    }


def _call(fn: Callable[[], Any]) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def time_side_by_side(
  fns: Mapping[str, Callable[[], Any]],
  *,
  repeats: int = 7,
  warmup: int = 1,
  min_sample_s: float = 0.02,
  max_number: int = 1000,
) -> dict[str, Timing]:
  """Times zero-argument callables in interleaved rounds; median per call.

  Args:
    fns: name -> callable returning arrays (blocked on with ``block_until_ready``).
    repeats: rounds; each round takes one sample of every callable.
    warmup: untimed calls of each callable first (compiled code should be
      compiled already; this warms caches and allocators). One more call
      calibrates ``number`` unless ``min_sample_s`` is 0.
    min_sample_s: a sample repeats a fast callable ``number`` times so that it
      lasts at least this long (the per-call time is the sample / ``number``).
    max_number: cap on ``number``.

  Returns:
    name -> :class:`Timing`.
  """
  numbers = {}
  for name, fn in fns.items():
    for _ in range(warmup):
      _call(fn)
    t = _call(fn) if min_sample_s > 0 else 1.0  # calibration
    numbers[name] = int(min(max_number, max(1, math.ceil(min_sample_s / max(t, 1e-7)))))
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      n = numbers[name]
      total = 0.0
      for _ in range(n):
        total += _call(fn)
      samples[name].append(total / n)
  out = {}
  for name, s in samples.items():
    q = np.quantile(s, [0.25, 0.75]) if len(s) > 1 else (s[0], s[0])
    out[name] = Timing(
      statistics.median(s), min(s), float(q[0]), float(q[1]), len(s), numbers[name]
    )
  return out


# ------------------------------------------------------------ results, output
@dataclasses.dataclass
class Target:
  """A performance target and the measured figure."""

  name: str
  measured: float | None
  threshold: float
  comparison: str  # "<=", ">=", "<"
  unit: str = ""
  detail: str = ""

  @property
  def passed(self) -> bool | None:
    if self.measured is None or not math.isfinite(self.measured):
      return None
    return {
      "<=": self.measured <= self.threshold,
      "<": self.measured < self.threshold,
      ">=": self.measured >= self.threshold,
    }[self.comparison]

  def as_dict(self) -> dict[str, Any]:
    p = self.passed
    return {
      "name": self.name,
      "measured": self.measured,
      "threshold": self.threshold,
      "comparison": self.comparison,
      "unit": self.unit,
      "status": "PASS" if p else ("MISS" if p is False else "N/A"),
      "detail": self.detail,
    }


def fmt(v: Any) -> str:
  """A compact string for a table cell."""
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if not math.isfinite(v):
      return str(v)
    if v == 0:
      return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
      return f"{v:.3g}"
    if a >= 100:
      return f"{v:.0f}"
    if a >= 10:
      return f"{v:.1f}"
    return f"{v:.3g}"
  if isinstance(v, (list, tuple)):
    return ",".join(fmt(x) for x in v)
  return str(v)


def format_table(
  title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
  """A plain-text table with a title line."""
  if not rows:
    return f"{title}\n  (no rows)"
  columns = list(columns or rows[0].keys())
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
  out = [title, line, "  ".join("-" * w for w in widths)]
  out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(out)


def format_targets(targets: Sequence[Mapping[str, Any]]) -> str:
  """The targets as ``[PASS] name: measured (target <= x)`` lines."""
  lines = []
  for t in targets:
    lines.append(
      f"  [{t['status']}] {t['name']}: measured {fmt(t['measured'])}{t['unit']} "
      f"(target {t['comparison']} {fmt(t['threshold'])}{t['unit']})"
    )
    if t.get("detail"):
      lines.append(f"         {t['detail']}")
  return "\n".join(lines)


def format_result(result: Mapping[str, Any]) -> str:
  """Everything a suite prints: its tables, targets and notes."""
  parts = [f"=== {result['suite']} ({result['mode']}, {result['wall_s']:.1f} s) ==="]
  for table in result.get("tables", []):
    parts.append(format_table(table["title"], table["rows"], table.get("columns")))
  if result.get("targets"):
    parts.append("targets:")
    parts.append(format_targets(result["targets"]))
  for note in result.get("notes", []):
    parts.append(f"note: {note}")
  return "\n\n".join(parts)


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else None
  if x is None or isinstance(x, str):
    return x
  if hasattr(x, "shape"):
    return _jsonable(np.asarray(x).tolist())
  return str(x)


def write_json(path: Path, obj: Any) -> None:
  """Writes ``obj`` as JSON (NaN/inf become ``null``)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")


def machine_info() -> dict[str, Any]:
  """Platform, Python/JAX versions, backend, devices and CPU count."""
  import jaxlib

  devices = jax.devices()
  return {
    "platform": platform.platform(),
    "machine": platform.machine(),
    "processor": platform.processor() or None,
    "python": sys.version.split()[0],
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in devices],
    "device_kind": devices[0].device_kind if devices else None,
    "device_count": len(devices),
    "cpu_count": os.cpu_count(),
    "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "x64_enabled": bool(jax.config.jax_enable_x64),
    "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")},
  }
