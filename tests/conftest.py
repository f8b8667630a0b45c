"""Shared fixtures: x64 on (float32 tests create float32 arrays explicitly)."""

import atexit
import functools
import math
import os
import shutil
import tempfile

# The suite is compile-bound (hundreds of small jitted programs, each run a few
# times): compile without XLA's expensive backend optimisations, and with the
# classic loop emitters for fusions (the MLIR fusion emitters take about twice as
# long to compile these programs). This changes no semantics; notebook kernels and
# subprocesses inherit it.
_FAST_COMPILE = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false"
)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
# The suite never fetches MNIST (test_mnist_download.py serves its own files on
# 127.0.0.1) and never reads a user's cached copy: every run sees the same data.
os.environ["TELEPORT_JAX_NO_DOWNLOAD"] = "1"
os.environ["TELEPORT_JAX_CACHE"] = tempfile.mkdtemp(prefix="teleport_jax_test_cache_")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Identical programs recur across tests (the same teleport of the same problem,
# compiled afresh by each test's own closures): a compilation cache shared by
# the session's processes (xdist workers inherit the directory from the
# controller, which loads this file first) compiles each program once. It only
# stores executables that XLA would build identically; no semantics change.
if "TELEPORT_JAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["TELEPORT_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="teleport_jax_test_xla_")
  atexit.register(shutil.rmtree, os.environ["TELEPORT_JAX_TEST_XLA_CACHE"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["TELEPORT_JAX_TEST_XLA_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

DTYPES = (jnp.float32, jnp.float64)

# tests/sharded needs 8 devices: tests/test_sharding.py runs it in its own process.
collect_ignore = [] if os.environ.get("TELEPORT_JAX_SHARDED") else ["sharded"]


def tol(dtype) -> float:
  """Relative tolerance for 'unchanged up to rounding' in ``dtype``."""
  return 2e-4 if jnp.dtype(dtype) == jnp.float32 else 1e-9


def random_mlp(key, widths, dtype, *, fmt="out_in", bias=False, scale=1.0):
  """A random MLP in one of the supported parameter layouts.

  Args:
    widths: ``(d_0, ..., d_L)``.
    fmt: ``"out_in"`` (list of ``W`` with shape (out, in)), ``"pairs"`` (list of
      ``(W, b)``), or ``"linen"`` (flax-style dict with ``kernel`` (in, out)).
  """
  # one compiled program per shape (hypothesis draws many shapes; eager random
  # draws would compile one program per leaf); the draws are those of eager mode
  return _random_mlp(key, tuple(widths), jnp.dtype(dtype), fmt, bias, scale)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _random_mlp(key, widths, dtype, fmt, bias, scale):
  keys = jax.random.split(key, 2 * len(widths))
  ws, bs = [], []
  for i in range(len(widths) - 1):
    k = (
      scale
      * jax.random.normal(keys[2 * i], (widths[i + 1], widths[i]), dtype)
      / math.sqrt(widths[i])
    )
    ws.append(k)
    bs.append(0.1 * jax.random.normal(keys[2 * i + 1], (widths[i + 1],), dtype))
  if fmt == "out_in":
    assert not bias
    return ws
  if fmt == "pairs":
    return [(w, b) for w, b in zip(ws, bs)]
  if fmt == "linen":
    layers = {}
    for i, (w, b) in enumerate(zip(ws, bs)):
      layers[f"Dense_{i}"] = {"kernel": w.T, **({"bias": b} if bias else {})}
    return {"params": layers}
  raise ValueError(fmt)


@functools.partial(jax.jit, static_argnums=(2, 3))
def mlp_apply(params, x, act, fmt):
  """Forward pass matching :func:`random_mlp`; ``x`` is (features, n) for out_in
  and pairs, (n, features) for linen. Compiled once per shape and activation."""
  if fmt == "out_in":
    h = x
    for i, w in enumerate(params):
      h = w @ h
      if i < len(params) - 1:
        h = act(h)
    return h
  if fmt == "pairs":
    h = x
    for i, (w, b) in enumerate(params):
      h = w @ h + b[:, None]
      if i < len(params) - 1:
        h = act(h)
    return h
  layers = params["params"]
  names = sorted(layers, key=lambda s: int(s.split("_")[1]))
  h = x
  for i, name in enumerate(names):
    h = h @ layers[name]["kernel"]
    if "bias" in layers[name]:
      h = h + layers[name]["bias"]
    if i < len(names) - 1:
      h = act(h)
  return h


def mse_loss(act, fmt):
  def loss(params, data):
    x, y = data
    return 0.5 * jnp.mean((y - mlp_apply(params, x, act, fmt)) ** 2)

  return loss


def rel_change(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
  return request.param


# Variants of parameterized tests, and secondary checks, that run only with
# ``-m slow``: the default run keeps one case of each behaviour (another dtype,
# back-end, policy or model of the same check is here). Listed by node id so
# that the policy reads in one place; an id that no longer names a collected
# test fails the run.
SLOW_VARIANTS = frozenset(
  {
    "test_transform.py::test_teleport_on_a_sub_batch_is_exact_on_the_whole_batch[gradbalance]",
    "test_transform.py::test_vmap_over_seeds_of_a_teleporting_train_step",
    "test_transform.py::test_state_policy_keep_or_reset[reset]",
    "test_transform.py::test_chain_with_common_optimizers_teleports_on_schedule_under_jit[adagrad]",
    "test_transform.py::test_chain_with_common_optimizers_teleports_on_schedule_under_jit[sgd]",
    "test_transform.py::test_teleport_speeds_up_early_gd_on_published_problem",
    "test_trust.py::test_exact_rescaling_passes_the_check_at_the_rounding_level[float64]",
    "test_trust.py::test_low_precision_params_teleport_in_float32_and_keep_their_dtype[data_gl-float16]",
    "test_trust.py::test_inject_hyperparams_around_with_teleport_runs_under_jit",
    "test_solver.py::test_bias_and_linen_layout_teleport",
    "test_solver.py::test_max_objective_raises_gradient_norm_and_keeps_loss[float64-data_gl]",
    "test_solver.py::test_max_objective_raises_gradient_norm_and_keeps_loss[float64-rescale]",
    "test_solver.py::test_teleport_helps_gradient_descent_on_published_problem",
    "test_solver.py::test_plain_unnormalised_steps_without_safeguard_run",
    "test_balancing.py::test_gl_balancing_by_matrix_geometric_mean_lowers_its_target[grad]",
    "test_balancing.py::test_norm_balancing_keeps_the_function_and_balances_every_hidden_neuron[7-widths1-float64]",
    "test_balancing.py::test_norm_balancing_keeps_the_function_and_balances_every_hidden_neuron[7-widths1-float32]",
    "test_discovery.py::test_vit_like_tree_is_not_read_as_one_mlp_chain",
    "test_discovery.py::test_group_laws[transformer_relu_rms-float64]",
    "test_actions.py::test_data_dependent_hidden_features_transform_by_g[float32]",
    "test_catalogue.py::test_outputs_unchanged_by_a_random_group_element[transformer_layernorm_gelu-linen-float64]",
    "test_catalogue.py::test_outputs_unchanged_by_a_random_group_element[transformer_gqa_interleaved_rotary_reglu-linen-float64]",
    "test_catalogue.py::test_rescaling_across_a_smooth_activation_is_refused_by_teleport[silu]",
    "test_catalogue.py::test_rescaling_across_a_smooth_activation_is_refused_by_teleport[tanh]",
    "test_geometry.py::test_teleport_moves_objective_on_published_regression_with_data_gl[curvature-True-float64]",
    "test_geometry.py::test_teleport_moves_objective_on_mlp_with_rescaling[curvature-False-float64]",
    "test_backends.py::test_with_teleport_runs_group_free_backends[levelset-reset]",
    "test_repeated_teleports.py::test_a_teleport_told_the_optimizer_keeps_its_step_sharpness_bounded[learning_rate]",
    "test_state_transport.py::test_transported_gradient_momentum_and_moments_match_the_new_point[data_gl-float32]",
    "test_balancing.py::test_norm_balancing_equalises_incoming_and_outgoing_norms_per_channel",
    "test_safe_teleport.py::test_constrained_lookahead_teleport_lowers_the_lookahead_loss",
    "test_catalogue.py::test_jitted_teleport_of_each_family_is_accepted[cnn]",
    # the default one-step teleport's direction by differences is checked against
    # automatic differentiation for one symmetry in the default run; a data-dependent
    # group's teleports are checked end to end there
    "test_onestep.py::test_the_objective_gradient_from_gradients_matches_automatic_differentiation[data_gl-gd]",
    # exact transport of every moment is tested per group in the default run
    "test_state_transport.py::test_transport_policy_moves_momentum_to_the_teleported_point",
    # refusing a group that is not a symmetry: test_onestep, test_errors, the warning test
    "test_trust.py::test_rescaling_that_is_not_a_symmetry_is_refused[tanh]",
    "test_errors.py::test_a_group_that_is_not_a_symmetry_raises_teleport_error_eagerly[throw]",
    # the published objective's divergence study; its bound is tested in the default run
    "test_safe_teleport.py::test_repeated_max_grad_norm_schedule_diverges_without_and_stays_finite_with_the_constraint",
    # jit and vmap of the default teleport: test_onestep; eager against jit: test_errors
    "test_solver.py::test_jit_matches_eager_and_vmap_over_seeds",
    "test_transform.py::test_adam_lookahead_teleports_when_some_coordinates_have_zero_gradient",
    # warm starts are off by default; refusals under jit: test_errors; gradient balancing's
    # exact gradient: test_state_transport's transported gradients
    "test_transform.py::test_warm_start_begins_the_next_search_at_the_previous_final_step_size[lie]",
    "test_trust.py::test_a_refused_teleport_under_jit_reports_the_status_and_keeps_the_input",
    "test_balancing.py::test_gradient_balancing_steps_from_the_balanced_point_with_its_exact_gradient",
    # float64 exactness of discovered groups: the MLP and LoRA float64 cases; these models
    # are checked in float32 in the default run
    "test_discovery.py::test_outputs_are_unchanged_under_random_elements[cnn_batchnorm-linen-float64]",
    "test_discovery.py::test_outputs_are_unchanged_under_random_elements[transformer-linen-float64]",
    # float64 of the same checks: test_actions' float64 action tests and hypothesis draws
    "test_actions.py::test_data_dependent_action_with_batch_wider_than_a_layer[float64]",
    "test_actions.py::test_flax_linen_and_nnx_params_are_understood[float64]",
    "test_onestep.py::test_a_one_step_teleport_keeps_the_loss_and_lowers_the_look_ahead[data_gl-float64]",
  }
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  seen, files = set(), set()
  for item in items:
    rel = item.nodeid.split("tests/", 1)[-1]
    files.add(rel.split("::", 1)[0])
    if rel in SLOW_VARIANTS:
      item.add_marker(pytest.mark.slow)
      seen.add(rel)
  # a stale name is an error only where whole files were collected (not for a run of
  # chosen tests: `pytest tests/test_x.py::test_y` or `-k`)
  if config.option.keyword or any("::" in str(a) for a in config.args):
    return
  missing = sorted(n for n in SLOW_VARIANTS - seen if n.split("::", 1)[0] in files)
  if missing:
    raise pytest.UsageError(f"SLOW_VARIANTS names tests that do not exist: {missing}")


def pytest_configure(config):
  # with xdist (`-n 2`), whole files go to one worker: a file's tests share the programs
  # they compile (module-level jitted functions and fixtures) instead of compiling them
  # once per worker; `--dist` given explicitly is kept
  if (
    getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "load"
  ):
    if "--dist" not in " ".join(config.invocation_params.args):
      config.option.dist = "loadfile"
