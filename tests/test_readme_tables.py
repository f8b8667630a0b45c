"""The result tables of docs/results.md: rendering, --write, --check, on a synthetic summary."""

import copy
import json
import math
import pathlib

import pytest

from teleport_jax.experiments import readme_tables as rt

SEEDS = 3


def _regression() -> dict:
  def run(final, mid, teleport=None, published=False):
    entry = dict(
      n_seeds=SEEDS,
      nonfinite_runs=0,
      loss_at_epoch_per_seed={"50": mid, "299": final},
    )
    if teleport:
      entry.update(
        step_sharpness_after_teleports=[[0.3], [0.35], [0.4]],
        rel_loss_drift_per_teleport=[[d] for d in teleport],
        teleport_status=[["SUCCESSFUL"]] * SEEDS,
      )
    return entry

  methods = {
    "gd": dict(optimizer="sgd(lr=0.0001)"),
    "gd_teleport": dict(optimizer="sgd(lr=0.0001)", symmetry="DataDependentGL", rtol=1e-5),
    "gd_teleport_published": dict(optimizer="sgd(lr=0.0001)", symmetry="PublishedDataDependentGL"),
  }
  return dict(
    protocol=dict(table_epochs=[50, 299], methods=methods),
    runs=dict(
      gd=run([2.0, 2.1, 2.3], [25.0, 26.0, 24.0]),
      gd_teleport=run([1.3, 1.4, 1.5], [1.4, 1.5, 1.6], teleport=[1e-6, 2e-6, 3e-7]),
      gd_teleport_published=run(
        [1.6, 1.7, 1.8], [7.0, 6.0, 8.0], teleport=[0.2, 0.5, 0.9], published=True
      ),
    ),
    targets=dict(
      gd_teleport_le_fifth_of_gd=True,
      every_teleport_within_rtol=True,
      no_nonfinite_run=True,
      first_teleport_moved=True,
    ),
  )


def _classification() -> dict:
  def run(train, val, teleports=False):
    entry = dict(
      n_seeds=SEEDS,
      nonfinite_runs=0,
      per_seed=dict(
        final_train_loss=train,
        final_val_loss=val,
        best_val_loss=[v - 0.002 for v in val],
        best_val_epoch=[40, 60, 90],
        final_val_accuracy=[0.96, 0.965, 0.97],
      ),
    )
    if teleports:
      entry.update(
        teleport_status=[["SUCCESSFUL", "NO_IMPROVEMENT"]] * SEEDS,
        rel_loss_drift_per_teleport=[[1e-7]] * SEEDS,
      )
    return entry

  return dict(
    dataset="sklearn_digits",
    protocol=dict(epochs=100),
    runs=dict(
      sgd=run([0.0035, 0.0034, 0.0036], [0.11, 0.112, 0.108]),
      sgd_teleport=run([0.0030, 0.0031, 0.0029], [0.11, 0.111, 0.109], teleports=True),
    ),
  )


def _functions() -> dict:
  def entry(iters, teleports=0, sharp=None, nonfinite=0):
    return dict(
      iters_to_tol=iters,
      num_teleports_total=teleports,
      first_teleport_sharpness=sharp or [],
      nonfinite_runs=nonfinite,
    )

  return dict(
    runs=dict(
      booth=dict(gd=entry([360, 463]), teleport=entry([52, 48], 2, [0.18, 0.18])),
      rosenbrock=dict(gd=entry([15068, 15681]), teleport=entry([None, 15820], 2, [6.3, 2.7], 1)),
    )
  )


def _newton() -> dict:
  rows = [
    dict(
      n=n,
      cos_eig_before=0.9 - 0.1 * s,
      cos_eig_after=1 - 1e-16 * (s + 1),
      cos_newton_after=1 - 1e-15,
      gd_step=0.1 * (s + 1),
      teleport_gd_step=1e-15 * (s + 1),
      rel_loss_drift=2e-14,
    )
    for n in (2, 5)
    for s in range(SEEDS)
  ]
  return dict(
    protocol=dict(kappa=100.0, dims=[2, 5], teleport=dict(num_steps=300)), per_problem=rows
  )


def _optimizers() -> dict:
  def entry(name, variant, final):
    return dict(optimizer=name, variant=variant, final_loss=final)

  runs = {
    "adam": entry("adam", "none", [1.4, 1.5, 1.6]),
    "adam_teleport_keep": entry("adam", "keep", [1.0, 1.1, 1.2]),
    "adam_teleport_reset": entry("adam", "reset", [0.1, 3.0, 0.2]),
    "adam_teleport_transport": entry("adam", "transport", [None, 1.0, 1.0]),
  }
  return dict(
    protocol=dict(regression=dict(teleport=dict(objective="optimizer_lookahead(steps=5)"))),
    problems=dict(regression=dict(runs=runs, epochs=300, seeds=[0, 1, 2])),
  )


def _generalization() -> dict:
  sgd_end = [0.114, 0.110, 0.118]

  def run(delta, before, after, end):
    return dict(
      n_seeds=SEEDS,
      final_val_loss_per_seed=[v + delta for v in sgd_end],
      final_val_loss_diff_vs_sgd=dict(paired_t_p=0.2),
      objective="sharpness",
      objective_before=before,
      objective_after=after,
      measures_at_end=dict(sharpness=end),
    )

  runs = dict(
    sgd=dict(n_seeds=SEEDS, final_val_loss_per_seed=sgd_end),
    sharpness_up=run(-0.001, [0.0021, 0.0022, 0.0023], [0.0049, 0.005, 0.0051], [0.002] * 3),
  )
  minima = [
    dict(sharpness=0.001 * (i + 1), orbit=dict(sharpness=[0.002 * (i + 1), 0.0005 * (i + 1)]))
    for i in range(5)
  ]
  return dict(
    dataset="sklearn_digits",
    protocol=dict(settings=dict(teleport_epoch=20, epochs=40)),
    runs=runs,
    correlation_table=[
      dict(measure="sharpness", target="val_loss", n=24, pearson_r=0.9),
      dict(measure="sharpness", target="gap", n=24, pearson_r=-0.68),
    ],
    orbit_spread_table=[
      dict(measure="sharpness", across_minima_max_over_min=63.3),
      dict(measure="val_loss", across_minima_max_over_min=2.0),
    ],
    minima=minima,
  )


def _backends() -> dict:
  rec = dict(
    status="SUCCESSFUL",
    rel_loss_drift=2e-7,
    held_out_drift=0.1,
    objective_before=3.0,
    objective_after=1.5,
    cost_grad_evals=120.0,
  )
  reg = lambda tele: dict(  # noqa: E731
    loss_per_seed_at={"50": [1.0, 1.2], "100": [0.9, 1.1], "299": [0.8, 1.0]},
    teleports=[rec, rec] if tele else [],
    nonfinite_runs=0,
    n_seeds=2,
  )
  cls = lambda tele: dict(  # noqa: E731
    final_train_loss_per_seed=[0.1, 0.12],
    final_val_loss_per_seed=[0.2, 0.22],
    teleports=[rec] if tele else [],
    nonfinite_runs=0,
    n_seeds=2,
  )
  return dict(
    protocol=dict(
      regression=dict(
        optimizer="GD lr 0.0001",
        teleport_epoch=5,
        inner_steps=30,
        seeds=[0, 1],
        held_out="fresh samples",
      ),
      classification=dict(
        dataset="digits", inner_steps=10, epochs=30, seeds=[0, 1], held_out="validation set"
      ),
    ),
    runs={
      "regression/gd": reg(False),
      "regression/levelset": reg(True),
      "classification/sgd": cls(False),
      "classification/levelset": cls(True),
    },
    repeated_levelset=dict(
      cumulative_rel_drift=[0.0, 1e-7], statuses=["SUCCESSFUL"] * 2, rtol=1e-5
    ),
  )


def synthetic_summary() -> dict:
  return dict(
    mode="full",
    machine=dict(jax="0.0", backend="cpu"),
    library=dict(library_sha256="0123456789abcdef", experiments_sha256="fedcba9876543210"),
    experiments=dict(
      mlp_regression=_regression(),
      classification=_classification(),
      test_functions=_functions(),
      newton=_newton(),
      optimizers=_optimizers(),
      generalization=_generalization(),
      backends=_backends(),
    ),
  )


def _results_page() -> str:
  blocks = "\n\n".join(
    f"Text before {name}.\n\n{rt._OPEN.format(name)}\nold table\n{rt._CLOSE.format(name)}\n"
    for name in rt.BLOCKS
  )
  return f"# Project\n\n{blocks}\nClosing words.\n"


@pytest.fixture
def files(tmp_path):
  readme = tmp_path / "results.md"
  readme.write_text(_results_page())
  summary = tmp_path / "summary.json"
  summary.write_text(json.dumps(synthetic_summary()))
  return readme, summary


def test_every_block_renders_markdown_tables():
  blocks = rt.blocks(synthetic_summary())
  assert list(blocks) == list(rt.BLOCKS)
  for name, parts in blocks.items():
    text = rt.render(parts)
    tables = rt.parse_tables(text)
    assert tables, name
    for header, rows in tables:
      assert rows and all(len(r) == len(header) for r in rows), name
  mlp = rt.render(blocks["mlp_regression"])
  assert "`gd_teleport`" in mlp and "1.500 ± 0.082" in mlp and "3 seeds" in mlp


def test_write_replaces_only_the_blocks_and_is_idempotent(files, capsys):
  readme, summary = files
  assert rt.main([str(summary), "--write", str(readme)]) == 0
  once = readme.read_text()
  assert "old table" not in once
  assert once.startswith("# Project\n\nText before mlp_regression.")
  assert once.rstrip().endswith("Closing words.")
  assert rt.main([str(summary), "--write", str(readme)]) == 0
  assert readme.read_text() == once
  assert "wrote blocks" in capsys.readouterr().out


def test_check_passes_on_the_same_run(files, capsys):
  readme, summary = files
  rt.main([str(summary), "--write", str(readme)])
  assert rt.main(["--check", str(readme), str(summary)]) == 0
  out = capsys.readouterr().out
  assert "| cell | stated (with spread) | second run | within? |" in out
  assert "**NO**" not in out and "not checked" in out


def test_check_passes_within_the_spread_and_fails_outside(files, tmp_path, capsys):
  readme, summary = files
  rt.main([str(summary), "--write", str(readme)])
  data = synthetic_summary()
  runs = data["experiments"]["mlp_regression"]["runs"]
  # within one std: the mean moves by a fraction of the spread
  runs["gd"]["loss_at_epoch_per_seed"]["299"] = [2.05, 2.15, 2.3]
  near = tmp_path / "near.json"
  near.write_text(json.dumps(data))
  assert rt.main(["--check", str(readme), str(near)]) == 0
  # far outside: gd's final loss doubles
  far_data = copy.deepcopy(data)
  far_data["experiments"]["mlp_regression"]["runs"]["gd"]["loss_at_epoch_per_seed"]["299"] = [
    4.0,
    4.2,
    4.6,
  ]
  far = tmp_path / "far.json"
  far.write_text(json.dumps(far_data))
  capsys.readouterr()
  assert rt.main(["--check", str(readme), str(far)]) == 1
  out = capsys.readouterr().out
  bad = [line for line in out.splitlines() if "**NO**" in line]
  assert len(bad) == 1 and "mlp_regression[0] gd / loss @ epoch 299" in bad[0]


def test_check_names_a_run_of_different_code(files, tmp_path, capsys):
  readme, summary = files
  rt.main([str(summary), "--write", str(readme)])
  data = synthetic_summary()
  data["library"]["library_sha256"] = "1111111111111111"
  other = tmp_path / "other.json"
  other.write_text(json.dumps(data))
  capsys.readouterr()
  assert rt.main(["--check", str(readme), str(other)]) == 0  # same figures
  assert "ran different code" in capsys.readouterr().out


def test_check_fails_on_a_changed_count(files, tmp_path):
  readme, summary = files
  rt.main([str(summary), "--write", str(readme)])
  data = synthetic_summary()
  data["experiments"]["test_functions"]["runs"]["rosenbrock"]["teleport"]["nonfinite_runs"] = 2
  other = tmp_path / "other.json"
  other.write_text(json.dumps(data))
  assert rt.main(["--check", str(readme), str(other)]) == 1


@pytest.mark.parametrize(
  ("values", "style", "text"),
  [
    ([1.0, 1.5, 2.0], "auto", "1.50 ± 0.41"),
    ([0.1, 3.0, 0.2], "auto", "1.10 [0.100, 3.00]"),
    ([3.1e-4, 3.3e-4, 3.5e-4], "pm", "3.30e-4 ± 0.16e-4"),
    ([4.0], "auto", "4"),
    ([1.0, None, 2.0], "auto", "1 of 3 diverge"),
  ],
)
def test_spread_formats(values, style, text):
  assert rt.spread(values, style=style).text == text


@pytest.mark.parametrize(
  ("text", "lo", "hi"),
  [
    ("1.50 ± 0.41", 1.08, 1.92),
    ("1.10 [0.100, 3.00]", 0.0995, 3.005),
    ("≤ 1e-5", -math.inf, 1e-5),
    ("421", 420.5, 421.5),
  ],
)
def test_interval_reads_the_stated_spread(text, lo, hi):
  a, b = rt.interval(text)
  assert a == pytest.approx(lo) and b == pytest.approx(hi, rel=1e-9)


def test_bound_is_a_decade_above_the_largest_value():
  assert rt.bound([1.3e-6, 2e-7]).text == "≤ 1e-5"
  assert rt.bound([2e-16], decades=2).text == "≤ 1e-14"
  assert rt.interval("3 of 5") is None


def test_write_and_check_default_to_docs_results_and_the_readme_summary(
  files, tmp_path, monkeypatch, capsys
):
  page, summary = files
  readme = tmp_path / "README.md"
  block = rt.SUMMARY_BLOCK
  readme.write_text(f"# Title\n\n{rt._OPEN.format(block)}\nold\n{rt._CLOSE.format(block)}\n")
  defaults = {rt.DEFAULT_RESULTS: page, rt.DEFAULT_README: readme}
  monkeypatch.setattr(rt, "_default", defaults.__getitem__)
  assert rt.main([str(summary), "--write"]) == 0
  assert "old table" not in page.read_text()
  text = readme.read_text()
  assert "old" not in text and "`gd_teleport`" in text and "`gd_teleport_published`" not in text
  assert f"wrote blocks {block} into {readme}" in capsys.readouterr().out
  assert rt.main(["--check", str(summary)]) == 0
  assert f"spread stated in {page}" in capsys.readouterr().out


def test_the_readme_summary_repeats_the_figures_of_docs_results():
  """README.md's summary table is a subset of docs/results.md's mlp_regression table."""
  root = pathlib.Path(__file__).resolve().parents[1]
  [(header, rows)] = rt.parse_tables(
    rt.read_block((root / "README.md").read_text(), rt.SUMMARY_BLOCK)
  )
  [(full_header, full_rows), *_] = rt.parse_tables(
    rt.read_block((root / "docs" / "results.md").read_text(), "mlp_regression")
  )
  columns = [full_header.index(h) for h in header]
  full = {row[0]: [row[i] for i in columns] for row in full_rows}
  assert [row[0] for row in rows] == [f"`{m}`" for m in rt.SUMMARY_METHODS]
  for row in rows:
    assert full[row[0]] == row, f"README.md and docs/results.md disagree on {row[0]}"
