"""The training workloads in reduced form: data, methods, the time-to-target metric."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import teleport_jax as tj
from teleport_jax.experiments import cli
from teleport_jax.experiments import common
from teleport_jax.experiments import workloads as W


def test_text_is_encoded_by_character_and_split_90_10():
  text = "".join(chr(97 + (i * 7) % 23) for i in range(5000))
  train, val, vocab = W.encode_text(text)
  assert vocab == len(set(text)) and len(train) == 4500 and len(val) == 500
  chars = sorted(set(text))
  assert "".join(chars[i] for i in np.concatenate([train, val])) == text
  with pytest.raises(ValueError, match="at least 1000"):
    W.encode_text("short")


def test_the_default_text_is_the_one_that_ships_with_python():
  text, source = W.load_text()
  assert source == "pydoc_data.topics" and len(text) > 400_000
  with pytest.raises(FileNotFoundError, match="does not exist"):
    W.load_text("/nonexistent/corpus.txt")


@functools.cache
def _transformer():
  return W.make_workload("char_transformer_relu", "smoke")


@pytest.mark.slow
def test_text_minibatches_are_windows_whose_targets_are_the_next_characters():
  wl = _transformer()
  x, y = jax.jit(wl.sample)(wl.train, jax.random.key(3))
  assert x.shape == y.shape == (12, 64) and x.dtype == jnp.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  tokens = np.asarray(wl.train[0])
  for row in np.asarray(x)[:3]:  # each row is a contiguous window of the training text
    starts = np.flatnonzero(tokens[: len(tokens) - 64] == row[0])
    assert any(np.array_equal(tokens[s : s + 64], row) for s in starts)


def test_unknown_workload_is_refused_by_name():
  with pytest.raises(ValueError, match="unknown workload 'resnet'"):
    W.make_workload("resnet", "smoke")


def test_trials_are_log_uniform_draws_inside_the_ranges_and_reproducible():
  wl = _transformer()
  method = W.METHODS["per_layer_lr"]
  draws = W.draw_trials(method, wl, 8)
  assert draws == W.draw_trials(method, wl, 8)
  lo, hi = wl.lr_range["adam"]
  assert all(lo <= d["lr"] <= hi and 1 / 8 <= d["r"] <= 8 and 1e-2 <= d["wd"] <= 0.3 for d in draws)
  assert len({d["lr"] for d in draws}) == 8


@pytest.mark.parametrize("name", ["mlp_digits", "char_transformer_relu"])
def test_methods_with_one_search_space_are_tried_at_the_same_values(name):
  wl = dataclasses.replace(_transformer(), name=name)
  ref = W.draw_trials(W.METHODS["adamw"], wl, 8)
  same = [m for m in W.METHODS.values() if m.space == W.METHODS["adamw"].space]
  assert len(same) >= 5  # the balancing and teleport methods share AdamW's
  for m in same:
    assert W.draw_trials(m, wl, 8) == ref
  # the per-layer method's first trial shares AdamW's values, then its extra factor
  first = W.draw_trials(W.METHODS["per_layer_lr"], wl, 8)[0]
  assert {k: first[k] for k in ref[0]} == ref[0]
  other = dataclasses.replace(wl, name="xyz_" + name)
  assert W.draw_trials(W.METHODS["adamw"], other, 8) != ref


def test_per_layer_factors_span_r_to_the_minus_and_plus_one_half():
  updates = {"params": {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}}
  out, _ = W._layer_scale({"r": jnp.float32(4.0)}).update(updates, None)
  np.testing.assert_allclose(out["params"]["a"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(out["params"]["b"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["params"]["c"], 2.0, rtol=1e-6)


def _run(val, times, every=10):
  return dict(val_loss=val, time_s=times, eval_every=every, train_loss=[])


def test_time_to_target_is_read_from_the_first_evaluation_at_or_below_the_target():
  run = _run([2.0, 1.0, 0.5, 0.4], [0.0, 1.0, 2.0, 3.0])
  assert W.to_target(run, 0.5) == (2.0, 20)
  assert W.to_target(run, 0.1) == (None, None)
  assert W._median([1.0, None, 3.0]) == 3.0  # the missing run counts as slowest
  assert W._median([1.0, None, None]) is None


def test_the_target_is_the_best_baselines_median_final_loss():
  wl = _transformer()
  runs = {
    "adamw": ("baseline", [[3, 2, 1.0], [3, 2, 1.2], [3, 2, 1.1]]),
    "sgd_nesterov": ("baseline", [[3, 2, 0.9], [3, 2, 0.8], [3, 2, math.nan]]),
    "tp": ("teleport", [[3, 0.9, 0.5], [3, 1.0, 0.6], [3, 2, 2.0]]),
  }
  out = {
    m: dict(
      kind=kind,
      description=m,
      hp={},
      compile_s=1.0,
      runs=[
        dict(_run(v, [0, 1, 2]), **({"teleports": 2} if kind == "teleport" else {})) for v in vals
      ],
    )
    for m, (kind, vals) in runs.items()
  }
  rec = W.summarise(wl, out)
  assert rec["baseline"] == "sgd_nesterov" and rec["target_val_loss"] == 0.9
  tp = rec["methods"]["tp"]
  assert tp["time_to_target_s"] == [1, 2, None] and tp["steps_to_target"] == [10, 20, None]
  assert rec["methods"]["sgd_nesterov"]["nonfinite"] and not tp["nonfinite"]
  assert tp["time_ratio"] == pytest.approx(2 / 2)
  json.dumps(rec)  # the record is plain JSON
  table = W.markdown_table({"toy": rec}).splitlines()
  assert len(table) == 2 + 3 and "`sgd_nesterov` (target)" in table[3]
  assert "| 2 of 3 | 2.00 s | 1.00 | 1.00 | 20 |" in table[4]
  assert rec["fastest_baseline"] == "sgd_nesterov"


def test_methods_are_compared_seed_by_seed_on_the_whole_split_with_standard_errors():
  wl = _transformer()
  rng = np.random.default_rng(0)
  units = [rng.gamma(4.0, 0.3, 400) for _ in range(3)]  # one per seed
  shifts = {"adamw": 0.0, "norm_balance": 0.05, "tp": -0.1, "tp_same": 0.0}

  def run(m, seed):
    u = units[seed] + shifts[m] + (rng.normal(0, 1e-3, 400) if m == "tp_same" else 0.0)
    # the learning curve's sample reads higher than the whole split, for every method
    curve = [3.0, 2.0, float(np.mean(u)) + 0.2]
    r = dict(_run(curve, [0, 1, 2 + shifts[m]]), final_val_loss_full=float(np.mean(u)))
    return dict(r, final_units=u, final_val_se=W._se(u))

  out = {
    m: dict(
      kind="baseline" if m in ("adamw", "norm_balance") else "teleport",
      description=m,
      hp={},
      compile_s=1.0,
      runs=[run(m, s) for s in range(3)],
    )
    for m in shifts
  }
  rec = W.summarise(wl, out)
  assert rec["baseline"] == "adamw"
  # the target is on the curve's measure, the final losses on the whole split
  assert rec["target_val_loss"] == pytest.approx(np.median([np.mean(u) for u in units]) + 0.2)
  adamw, tp, same = (rec["methods"][m] for m in ("adamw", "tp", "tp_same"))
  assert adamw["final_val_loss"] == pytest.approx([np.mean(u) for u in units])
  np.testing.assert_allclose(tp["paired_final_diff"], -0.1, atol=1e-12)
  assert tp["resolved_final"] == "lower" and rec["methods"]["norm_balance"]["resolved_final"] == (
    "higher"
  )
  assert same["resolved_final"] is None  # differences within their standard errors
  assert all(0 < e < 1e-3 for e in same["paired_final_diff_se"])
  # the per-unit spread gives each final loss its standard error
  assert adamw["final_val_se"][0] == pytest.approx(np.std(units[0], ddof=1) / 20)
  assert rec["monitor_units"] == rec["full_units"] == wl.val[1].shape[0]
  json.dumps(rec)


def test_a_time_ratio_is_resolved_only_beyond_the_evaluation_grid_on_every_seed():
  # the baseline needs 200 steps, evaluations are 10 apart: +-5 % is not resolved
  assert W.resolved_ratio([0.9, 0.8, 0.7], [1.0, 1.0, 1.0], 10, 200) == "faster"
  assert W.resolved_ratio([0.97, 0.8, 0.7], [1.0, 1.0, 1.0], 10, 200) is None
  assert W.resolved_ratio([1.2, None, 1.1], [1.0, 1.0, 1.0], 10, 200) == "slower"
  assert W.resolved_ratio([0.5, 0.5, 0.5], [1.0, None, 1.0], 10, 200) is None


def test_the_text_curve_is_read_on_a_systematic_sample_and_the_final_loss_on_the_split():
  wl = W.make_workload("char_transformer_relu", "quick")
  x_full, y_full = wl.val_full
  assert wl.val[0].shape[0] == -(-x_full.shape[0] // 3)
  np.testing.assert_array_equal(wl.val[0], x_full[::3])
  # consecutive windows: the split, each character predicted once
  flat = np.asarray(x_full).reshape(-1)
  np.testing.assert_array_equal(flat[1:], np.asarray(y_full).reshape(-1)[:-1])
  assert x_full.shape[0] * 64 > 0.98 * 46_000


@pytest.fixture(scope="module")
def mlp_record():
  """Every method on the digits MLP at smoke size: tuned, evaluated, summarised."""
  tuned = {}
  return W.run_workload("mlp_digits", "smoke", tuned=tuned), tuned


@pytest.mark.slow
def test_every_method_trains_and_the_teleports_stay_on_the_level_set(mlp_record):
  rec, tuned = mlp_record
  assert set(rec["methods"]) == set(W.METHODS)
  drop_in = {n for n, m in W.METHODS.items() if m.tuned_as}
  assert drop_in and set(tuned["smoke"]["mlp_digits"]) == set(W.METHODS) - drop_in
  for n in drop_in:  # run at the values of the method they are added to
    assert rec["methods"][n]["hp"] == rec["methods"][W.METHODS[n].tuned_as]["hp"]
  for name, m in rec["methods"].items():
    assert not m["nonfinite"], name
    assert all(np.isfinite(c["val_loss"]).all() for c in m["curves"])
    assert all(np.all(np.diff(c["time_s"]) > 0) for c in m["curves"])
    source = W.METHODS[name].tuned_as or name
    assert m["hp"] in [t["hp"] for t in tuned["smoke"]["mlp_digits"][source]["trials"]]
    assert m["max_rel_loss_drift"] <= tj.default_rtol(jnp.float32)
    if m["kind"] == "teleport":
      assert all(n >= 1 for n in m["teleports"]), name
  base = rec["methods"][rec["baseline"]]
  assert rec["target_val_loss"] == pytest.approx(np.median(base["final_val_loss"]))
  assert rec["loop_skip_overhead"] > 0


@pytest.mark.slow
def test_calling_the_step_or_skipping_the_conditional_does_not_change_the_training():
  """The CNNs' per-step calls and the split programs train as one compiled scan does."""
  wl = W.make_workload("cnn_digits", "smoke")
  assert wl.loop == "steps"
  method = W.METHODS["tp_gradbalance_50"]  # teleports at step 10 of 30
  hp = {"lr": 3e-3, "wd": 0.03}
  runs = {
    "steps, split": W.Trainer(wl, method).run(hp, 0),
    "scan, conditional": W.Trainer(
      dataclasses.replace(wl, loop="scan"), method, split_chunks=False
    ).run(hp, 0),
  }
  ref = runs["scan, conditional"]
  assert ref["teleports"] == 1
  for name, r in runs.items():
    assert r["teleports"] == ref["teleports"], name
    np.testing.assert_allclose(r["val_loss"], ref["val_loss"], rtol=1e-4, err_msg=name)
    assert len(r["time_s"]) == len(ref["time_s"]) == 1 + wl.steps // wl.eval_every


@pytest.mark.parametrize("mode", ["smoke", "quick"])
def test_only_real_runs_store_their_tuned_values_after_each_method(monkeypatch, mode):
  wl = _transformer()
  out = {
    "adamw": dict(
      kind="baseline", description="", hp={}, compile_s=1.0, runs=[_run([2.0, 1.0], [0.0, 1.0])]
    )
  }

  def fake_run_workload(name, mode, *, tuned, on_tuned, **kwargs):
    for method in ("adamw", "norm_balance"):
      tuned.setdefault(mode, {}).setdefault(name, {})[method] = {"hp": {"lr": 1e-3}}
      on_tuned()
    return W.summarise(wl, out, loop_skip_overhead=1.0, loop_skip_overhead_split=1.0)

  saved = []
  monkeypatch.setattr(W, "run_workload", fake_run_workload)
  monkeypatch.setattr(W, "load_tuned", dict)
  monkeypatch.setattr(W, "save_tuned", saved.append)
  W.run(common.RunConfig(mode=mode, out_dir=None), names=["char_transformer"])
  # stored after each method, so that a run stopped part-way keeps what it tuned
  assert len(saved) == (0 if mode == "smoke" else 2)


def test_reproduce_runs_the_workloads_only_when_asked(monkeypatch, tmp_path):
  seen = []

  class Fake:
    def num_units(self, config):
      return 0

    def run(self, config, progress):
      seen.append(config)
      return dict(table=[dict(a=1)])

  monkeypatch.setattr(cli.importlib, "import_module", lambda name: Fake())
  cli.main(["--out", str(tmp_path), "--no-progress"])
  assert len(seen) == len(cli.EXPERIMENTS) - len(cli.OPT_IN)
  seen.clear()
  cli.main(["--out", str(tmp_path), "--no-progress", "--only", "workloads", "--retune"])
  assert len(seen) == 1 and seen[0].retune and isinstance(seen[0], common.RunConfig)
