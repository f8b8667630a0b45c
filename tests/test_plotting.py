"""The shared plotting style of the experiments (no training: fast)."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from teleport_jax.experiments import plotting  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
def test_panels_label_every_axis_and_limit_columns(n):
  with plotting.style():
    fig, axes = plotting.panels(n, xlabel="epoch", ylabel="training loss")
  assert len(axes) == n and len(fig.axes) == n
  cols = {ax.get_subplotspec().colspan.start for ax in axes}
  assert len(cols) == min(n, plotting.MAX_COLS)
  for ax in axes:
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "training loss"
  assert plotting.pixel_size(fig)[0] <= plotting.MAX_WIDTH_PX


def test_panels_take_one_label_per_panel_and_never_more_than_max_cols():
  with plotting.style():
    fig, axes = plotting.panels(
      2, xlabel=["a", "b"], ylabel=["c", "d"], ncols=5, panel_size=(9.0, 3.0)
    )
  assert [ax.get_xlabel() for ax in axes] == ["a", "b"]
  assert [ax.get_ylabel() for ax in axes] == ["c", "d"]
  assert plotting.grid_shape(7, ncols=5) == (3, 3)
  # two panels of 9 inches are narrowed to the width limit
  assert plotting.pixel_size(fig)[0] <= plotting.MAX_WIDTH_PX
  with pytest.raises(ValueError):
    plotting.panels(2, xlabel=["a"], ylabel="b")


def test_teleport_markers_are_drawn_with_one_legend_entry():
  with plotting.style():
    fig, (ax, ax2) = plotting.panels(2, xlabel="epoch", ylabel="loss")
    x = np.arange(50)
    for k, name in enumerate(("gd", "gd_teleport")):
      y = np.exp(-0.1 * x) + k
      ax.plot(x, y, color=plotting.color(name), label=name)
      at = [5, 25, 45]
      plotting.mark_teleports(ax, x[at], y[at], color=plotting.color(name))
    ax2.plot(x, np.exp(-x / 10.0), label="gd")
    plotting.mark_teleports(ax2, [0, 1, 2])  # vertical lines
    leg = plotting.legend(fig)
  marks = plotting.teleport_artists(fig)
  markers = [a for a in marks if a.axes is ax]
  assert len(markers) == 2 and all(len(a.get_xdata()) == 3 for a in markers)
  assert len([a for a in marks if a.axes is ax2]) == 3
  labels = [t.get_text() for t in leg.get_texts()]
  assert labels == ["gd", "gd_teleport", "teleport"]  # one entry each, teleport last
  # nothing to mark: nothing drawn (non-finite points are skipped)
  assert plotting.mark_teleports(ax, [3.0], [np.nan]) is None


def test_saved_figure_stays_under_the_width_limit(tmp_path):
  with plotting.style():
    fig, axes = plotting.panels(5, xlabel="epoch", ylabel="loss", suptitle="five panels")
    for i, ax in enumerate(axes):
      ax.plot(np.arange(10), np.arange(10) + i, label=f"method number {i}")
    plotting.legend(fig)
    path = plotting.savefig(fig, tmp_path / "grid.png")
  from matplotlib import image

  height, width = image.imread(path).shape[:2]
  assert (width, height) == plotting.pixel_size(fig)
  assert width <= plotting.MAX_WIDTH_PX
  # two rows of panels and the legend below them: taller than one row
  assert height > 2 * plotting.PANEL_SIZE[1] * plotting.DPI


def test_style_has_readable_fonts_and_one_colour_per_method():
  sizes = [v for k, v in plotting.RC.items() if k.endswith("size") and "marker" not in k]
  assert sizes and min(sizes) >= plotting.MIN_FONT_PT >= 9
  assert plotting.color("gd") == plotting.color("sgd")  # no teleport: one colour
  assert plotting.color("not a method") == plotting.color("not a method")
  got = plotting.colors(["gd", "gd_teleport", "unknown_a", "unknown_b"])
  assert len(set(got.values())) == 4


def test_importing_the_experiments_does_not_import_matplotlib():
  code = (
    "import sys\n"
    "from teleport_jax.experiments import plotting, regression, optimizers, workloads\n"
    "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
