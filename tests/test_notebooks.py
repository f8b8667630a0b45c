"""The notebooks in ``notebooks/`` run top to bottom, and their saved copies show plots.

Each notebook is executed again with nbclient (kernel ``python3``, working
directory ``notebooks/``); a failing cell fails the test with its traceback.
The saved ``.ipynb`` files are checked too: every code cell was executed, at
least one output is a PNG image (so the plots are visible in the files) and no
output is an error. ``python notebooks/make_notebooks.py`` rebuilds them.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
  "01_quickstart.ipynb",
  "02_mlp_regression.ipynb",
  "03_classification.ipynb",
  "04_test_functions_newton.ipynb",
  "05_beyond_the_seed.ipynb",
  "06_any_model.ipynb",
  "07_learned_teleports.ipynb",
}
TIMEOUT_S = 600


def _outputs(nb):
  for cell in nb.cells:
    if cell.cell_type == "code":
      yield from cell.get("outputs", [])


def _errors(nb) -> list[str]:
  return [f"{o.ename}: {o.evalue}" for o in _outputs(nb) if o.output_type == "error"]


def _num_images(nb) -> int:
  return sum(
    "image/png" in o.get("data", {})
    for o in _outputs(nb)
    if o.output_type in ("display_data", "execute_result")
  )


def test_every_notebook_is_there():
  assert EXPECTED <= {p.name for p in NOTEBOOKS}


FAST: set[str] = set()  # every notebook is executed with ``-m slow``


@pytest.mark.parametrize(
  "path",
  [p if p.name in FAST else pytest.param(p, marks=pytest.mark.slow) for p in NOTEBOOKS],
  ids=lambda p: p.name,
)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    timeout=TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  client.execute()  # raises CellExecutionError (with the traceback) on a failing cell
  assert not _errors(nb)
  assert _num_images(nb) >= 1, f"{path.name} produced no image output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_notebook_shows_plots_and_no_errors(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells, f"{path.name} has no code cells"
  unexecuted = [i for i, c in enumerate(code_cells) if c.get("execution_count") is None]
  assert not unexecuted, f"{path.name}: code cells {unexecuted} were not executed"
  assert not _errors(nb), f"{path.name} holds error outputs: {_errors(nb)}"
  assert _num_images(nb) >= 1, f"{path.name} holds no image output"
