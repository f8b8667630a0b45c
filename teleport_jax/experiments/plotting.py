"""One style for every figure the experiments write.

Every ``_plot*`` function of :mod:`teleport_jax.experiments` draws inside
:func:`style` (or is decorated with :func:`styled`), lays its panels out with
:func:`panels`, draws one legend per figure with :func:`legend`, marks the
teleports on its loss curves with :func:`mark_teleports` and writes the file
with :func:`savefig`. So that the figures read at 100 % zoom:

* one resolution, :data:`DPI`, and font sizes of at least 9 pt at it (about
  12 pixels; :data:`RC`);
* at most :data:`MAX_COLS` panels side by side and a figure at most
  :data:`MAX_WIDTH_PX` pixels wide (:func:`panels` shrinks the panels to fit);
* an x and a y label on every panel (:func:`panels` sets them on each one);
* one legend for the whole figure, below the panels (:func:`legend`);
* one colour per method name in every figure (:func:`color`, :data:`COLORS`).

Matplotlib is imported only when a figure is drawn (through
:func:`teleport_jax.experiments.common.plt`, which renders with the Agg canvas
without pyplot's global state), so importing the experiments does not import
it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from teleport_jax.experiments import common

DPI = 100
MAX_COLS = 3
MAX_WIDTH_PX = 1500
# the size of one panel in inches (at DPI: 460 x 340 pixels); three side by side: 1380 px
PANEL_SIZE = (4.6, 3.4)
MIN_FONT_PT = 9

# the Tableau colours, by name; the experiments' methods get them through COLORS
_C = dict(
  blue="#1f77b4",
  orange="#ff7f0e",
  green="#2ca02c",
  red="#d62728",
  purple="#9467bd",
  brown="#8c564b",
  pink="#e377c2",
  grey="#7f7f7f",
  olive="#bcbd22",
  cyan="#17becf",
)
BASELINE = "#1a1a1a"  # every run without teleport (gd, sgd, "no teleport")

# Method (or optimizer, policy, back-end) name -> colour, the same in every figure.
# No two names that share a figure share a colour. Where it helps, one idea has one
# colour: the look-ahead objective is blue, the gradient-norm objective red, repeated
# teleports green.
COLORS = {
  # no teleport
  "gd": BASELINE,
  "sgd": BASELINE,
  "none": BASELINE,
  "no teleport": BASELINE,
  "adamw": BASELINE,
  "adagrad": _C["grey"],
  # regression (mlp_*.png)
  "gd_teleport": _C["blue"],
  "adagrad_teleport": _C["orange"],
  "gd_teleport_repeated": _C["green"],
  "gd_teleport_every20": _C["purple"],
  "gd_teleport_published": _C["cyan"],
  "adagrad_teleport_published": _C["brown"],
  "gd_teleport_max_grad_norm": _C["red"],
  "gd_teleport_max_grad_norm_safe": _C["pink"],
  # classification
  "sgd_teleport": _C["red"],
  "sgd_teleport_lookahead": _C["blue"],
  # test functions
  "gd+teleport(max_grad_norm)": _C["red"],
  "gd+teleport(max_grad_norm)/k": _C["orange"],
  "gd+teleport(lookahead)": _C["blue"],
  "gd+teleport(lookahead)/k": _C["green"],
  # optimizers: the state policies
  "keep": _C["blue"],
  "reset": _C["orange"],
  "transport": _C["green"],
  # generalization
  "sharpness_up": _C["red"],
  "sharpness_down": _C["orange"],
  "curvature_up": _C["blue"],
  "curvature_down": _C["cyan"],
  # back-ends
  "lie": _C["blue"],
  "nullspace": _C["orange"],
  "levelset": _C["green"],
  # workloads
  "sgd_nesterov": _C["grey"],
  "norm_balance": _C["brown"],
  "per_layer_lr": _C["olive"],
  "tp_gradbalance": _C["red"],
  "tp_gradbalance_50": _C["orange"],
  "tp_lookahead": _C["blue"],
  "tp_lookahead_nostab": _C["cyan"],
  "adamw_with_teleport_idle": _C["purple"],
}
_PALETTE = tuple(_C.values())

TELEPORT_LABEL = "teleport"
TELEPORT_GID = "teleport"

# matplotlib settings of every figure (applied by :func:`style`)
RC: dict[str, Any] = {
  "figure.dpi": DPI,
  "savefig.dpi": DPI,
  "font.size": 10,
  "axes.titlesize": 10,
  "axes.labelsize": 10,
  "xtick.labelsize": MIN_FONT_PT,
  "ytick.labelsize": MIN_FONT_PT,
  "legend.fontsize": MIN_FONT_PT + 0.5,
  "legend.title_fontsize": 10,
  "figure.titlesize": 11,
  "lines.linewidth": 1.8,
  "lines.markersize": 6,
  "axes.linewidth": 0.8,
  "axes.grid": True,
  "grid.alpha": 0.3,
  "grid.linewidth": 0.6,
  "axes.spines.top": False,
  "axes.spines.right": False,
  "legend.frameon": False,
  "figure.constrained_layout.h_pad": 0.06,
  "figure.constrained_layout.w_pad": 0.06,
}


def color(name: str) -> str:
  """The colour of method ``name`` in every figure (:data:`COLORS`, else one from its name)."""
  if name in COLORS:
    return COLORS[name]
  return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def colors(names: Sequence[str]) -> dict[str, str]:
  """:func:`color` of each name, with names outside :data:`COLORS` moved off the others' colours."""
  out = {n: COLORS[n] for n in names if n in COLORS}
  for n in names:
    if n in out:
      continue
    c = color(n)
    if c in out.values():
      c = next((p for p in _PALETTE if p not in out.values()), c)
    out[n] = c
  return {n: out[n] for n in names}


@contextlib.contextmanager
def style() -> Iterator[None]:
  """Draws with :data:`RC` (matplotlib's settings are restored afterwards)."""
  import matplotlib

  with matplotlib.rc_context(RC):
    yield


def styled(fn: Callable) -> Callable:
  """Runs a plotting function inside :func:`style` (imports matplotlib only when called)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with style():
      return fn(*args, **kwargs)

  return wrapper


def grid_shape(n: int, ncols: int | None = None) -> tuple[int, int]:
  """``(rows, cols)`` of ``n`` panels, at most :data:`MAX_COLS` columns."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}.")
  cols = min(n, MAX_COLS) if ncols is None else max(1, min(ncols, MAX_COLS, n))
  return math.ceil(n / cols), cols


def panels(
  n: int = 1,
  *,
  xlabel: str | Sequence[str],
  ylabel: str | Sequence[str],
  titles: Sequence[str] | None = None,
  ncols: int | None = None,
  panel_size: tuple[float, float] = PANEL_SIZE,
  suptitle: str | None = None,
  **subplot_kw,
):
  """A figure of ``n`` panels in a grid, an x and a y label on each.

  Args:
    n: number of panels.
    xlabel, ylabel: the label of every panel, or one per panel.
    titles: one title per panel (optional).
    ncols: columns (default ``min(n, MAX_COLS)``; never more than :data:`MAX_COLS`).
    panel_size: ``(width, height)`` of one panel in inches; panels are narrowed
      so that the figure is at most :data:`MAX_WIDTH_PX` pixels wide at :data:`DPI`.
    suptitle: the figure's title (optional).
    **subplot_kw: ``sharex``, ``sharey``, ... for ``Figure.subplots``.

  Returns:
    ``(fig, axes)``: a constrained-layout :class:`matplotlib.figure.Figure` and
    the list of its ``n`` axes, row by row (unused grid cells are removed).
  """
  rows, cols = grid_shape(n, ncols)
  width = min(panel_size[0] * cols, MAX_WIDTH_PX / DPI)
  height = panel_size[1] * rows + (0.35 if suptitle else 0.0)
  fig, grid = common.plt().subplots(
    rows, cols, figsize=(width, height), dpi=DPI, layout="constrained", squeeze=False,
    **subplot_kw,
  )  # fmt: skip
  axes = list(grid.ravel())
  for ax in axes[n:]:
    fig.delaxes(ax)
  axes = axes[:n]
  xlabels = [xlabel] * n if isinstance(xlabel, str) else list(xlabel)
  ylabels = [ylabel] * n if isinstance(ylabel, str) else list(ylabel)
  if len(xlabels) != n or len(ylabels) != n:
    raise ValueError(f"Need one x and one y label per panel ({n}).")
  for i, ax in enumerate(axes):
    ax.set_xlabel(xlabels[i])
    ax.set_ylabel(ylabels[i])
    ax.tick_params(labelsize=RC["xtick.labelsize"])
    if subplot_kw.get("sharey"):
      ax.yaxis.set_tick_params(labelleft=True)  # every panel reads on its own
    if subplot_kw.get("sharex"):
      ax.xaxis.set_tick_params(labelbottom=True)
    if titles is not None:
      ax.set_title(titles[i])
  if suptitle:
    fig.suptitle(suptitle)
  return fig, axes


def mark_teleports(
  ax, x, y=None, *, color: str | None = None, ms: float = 8, label: str = TELEPORT_LABEL
):
  """Marks the teleports at ``x`` (epochs, steps or seconds) on a loss curve.

  With ``y`` (the curve's values at ``x``): a triangle on the curve at each
  teleport (size ``ms``), filled with the curve's ``color``; without: a dotted
  vertical line across the panel at each. Non-finite points are skipped. The
  panel gets one legend entry ``label`` (``"teleport"``), however many curves
  are marked.

  Returns:
    The artist drawn (``None`` if there was nothing to mark).
  """
  x = np.atleast_1d(np.asarray(x, np.float64))
  if y is None:
    keep = np.isfinite(x)
    if not keep.any():
      return None
    artist = None
    for v in x[keep]:
      artist = ax.axvline(v, color="0.45", lw=1.0, ls=":", zorder=1, label="_" + label)
      artist.set_gid(TELEPORT_GID)
    _legend_proxy(ax, label, dict(color="0.45", lw=1.0, ls=":"))
    return artist
  y = np.atleast_1d(np.asarray(y, np.float64))
  keep = np.isfinite(x) & np.isfinite(y)
  if not keep.any():
    return None
  (artist,) = ax.plot(
    x[keep], y[keep], ls="none", marker="v", ms=ms, mfc=color or "0.6", mec="k", mew=0.8,
    zorder=5, label="_" + label,
  )  # fmt: skip
  artist.set_gid(TELEPORT_GID)
  _legend_proxy(ax, label, dict(ls="none", marker="v", ms=8, mfc="0.85", mec="k", mew=0.8))
  return artist


def _legend_proxy(ax, label: str, kw: dict) -> None:
  """An empty line that only carries the legend entry ``label`` (once per panel)."""
  if label in ax.get_legend_handles_labels()[1]:
    return
  ax.plot([], [], label=label, **kw)


def teleport_artists(fig) -> list:
  """Every teleport mark that :func:`mark_teleports` drew on ``fig``."""
  return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == TELEPORT_GID]


def legend(fig, axes=None, *, ncol: int | None = None, title: str | None = None, extra=()):
  """One legend for the figure, below the panels (the figure grows to hold it).

  Collects the labelled artists of ``axes`` (default: every panel), one entry
  per label (the first), ``"teleport"`` last, plus ``extra`` ``(handle, label)``
  pairs.
  """
  handles, labels = [], []
  for ax in fig.axes if axes is None else axes:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in labels:
        handles.append(h)
        labels.append(lab)
  for h, lab in extra:
    if lab not in labels:
      handles.append(h)
      labels.append(lab)
  if TELEPORT_LABEL in labels:
    i = labels.index(TELEPORT_LABEL)
    handles.append(handles.pop(i))
    labels.append(labels.pop(i))
  if not labels:
    return None
  width_px = fig.get_figwidth() * DPI
  # an entry: the handle (about 45 px) and its text (about 0.6 em per character)
  entry_px = 45 + 0.6 * RC["legend.fontsize"] * DPI / 72 * max(len(s) for s in labels)
  ncol = ncol or max(1, min(len(labels), int(width_px * 0.95 // entry_px)))
  rows = math.ceil(len(labels) / ncol)
  line_in = RC["legend.fontsize"] * 1.7 / 72
  fig.set_figheight(fig.get_figheight() + rows * line_in + 0.15 + (0.25 if title else 0.0))
  return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, title=title)


def proxy(label: str, **line_kw) -> tuple[Any, str]:
  """A ``(handle, label)`` legend entry for :func:`legend`'s ``extra`` (e.g. a line style)."""
  from matplotlib.lines import Line2D

  return Line2D([], [], **{"color": "0.3", **line_kw}), label


def savefig(fig, path: str | Path) -> Path:
  """Writes ``fig`` as PNG at :data:`DPI` (the figure's own size: no cropping)."""
  path = Path(path)
  fig.savefig(path, dpi=DPI)
  return path


def pixel_size(fig) -> tuple[int, int]:
  """``(width, height)`` in pixels of ``fig`` saved with :func:`savefig`."""
  return round(fig.get_figwidth() * DPI), round(fig.get_figheight() * DPI)
