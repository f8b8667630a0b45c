"""Group-free teleport back-ends: null-space projection and level-set steps.

Compiling a teleport costs seconds on a CPU, so the tests share compiled
functions: the MLP tests run both back-ends once under ``jit(vmap(...))`` over
two seeds and read several properties off the same results, and the
structural checks (which layers move, exactness on the batch) jit the
back-end's projection alone. Models are built under ``jit`` too (eager flax
initialisation compiles every operation separately).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_apply
from flax import nnx

import teleport_jax as tj
from teleport_jax._src.solver import backends
from teleport_jax._src.solver.levelset import LevelSet
from teleport_jax._src.solver.nullspace import NullSpace
from teleport_jax._src.solver.nullspace import held_out_drift
from teleport_jax._src.solver.nullspace import nullspace_report

ACT = tj.activations.leaky_relu(0.1)
S = tj.TeleportStatus
F32_RTOL = tj.default_rtol(jnp.float32)


def mlp_loss(params, data):
  x, y = data
  return 0.5 * jnp.mean((y - mlp_apply(params, x, ACT, "linen")) ** 2)


@functools.cache
def mlp_problem(seed=0, n=6):
  """A linen-style float32 MLP 8-10-3 with biases and a batch of ``n`` rows (x @ W)."""
  f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
  layers = {
    f"Dense_{i}": {"kernel": f32(a, b), "bias": f32(b)}
    for i, (a, b) in enumerate([(8, 10), (10, 3)])
  }
  return fill({"params": layers}, seed), fill((f32(n, 8), f32(n, 3)), seed + 10)


def fill(tree, seed=0):
  """Random normal values (NumPy's generator) of the shapes and dtypes of ``tree``,
  scaled by ``1/sqrt(fan_in)``: no compilation, unlike ``jax.random`` and flax's
  initialisers."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = []
  for x in leaves:
    fan_in = max(int(np.prod(x.shape[:-1])), 1)
    out.append(jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), x.dtype))
  return treedef.unflatten(out)


def stack(*trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def leaves_equal(a, b) -> bool:
  return all(
    np.array_equal(np.asarray(u), np.asarray(v))
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


# the two MLP teleports every MLP test reads (compiled once each)
MLP_SETTINGS = {
  "nullspace": dict(solver="nullspace", objective="max_grad_norm", num_steps=6),
  "levelset": dict(solver="levelset", objective="max_grad_norm", num_steps=6),
}


@functools.cache
def mlp_teleport(name):
  """``jit(vmap(teleport))`` of the MLP over seeds 0 and 1."""
  kwargs = MLP_SETTINGS[name]
  return jax.jit(jax.vmap(lambda p, d: tj.teleport(mlp_loss, p, d, **kwargs)))


@functools.cache
def mlp_results(name):
  params, data = stack(mlp_problem(0), mlp_problem(1))
  new, info = mlp_teleport(name)(params, data)
  return params, data, new, info


@functools.partial(jax.jit, static_argnums=0)
def null_step(loss, params, data):
  """``params + P g`` for a random ``g``: one projected step, without the driver."""
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
  value = lambda p, g: (loss(p, data), loss(p, data))
  problem = backends.Problem(loss, data, None, value, 1.0, dtype, params, loss(params, data))
  solver = NullSpace()
  state, _ = solver.init(problem, params)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  # a fixed, irregular direction (cheaper to compile than jax.random)
  g = treedef.unflatten(
    [
      jnp.sin(jnp.arange(x.size, dtype=x.dtype) * (i + 1.3)).reshape(x.shape)
      for i, x in enumerate(leaves)
    ]
  )
  d = solver.project(problem, params, state, g)
  return jax.tree_util.tree_map(lambda a, b: a + b, params, d), d


# ------------------------------------------------------------------ registry
@pytest.mark.parametrize(
  "name, cls", [("nullspace", NullSpace), ("null_space", NullSpace), ("levelset", LevelSet)]
)
def test_names_resolve_to_group_free_backends(name, cls):
  solver = backends.as_solver(name)
  assert isinstance(solver, cls)
  assert not solver.needs_symmetry and not solver.tracks_element
  assert set(solver.stats_template(jnp.float32)) >= {"final_step_size", "grad_evals_per_step"}
  assert solver.cost_per_step() >= 1.0


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: NullSpace(tau=2.0), "tau"),
    (lambda: NullSpace(step_size=0.0), "step_size"),
    (lambda: NullSpace(orthogonalize=1), "orthogonalize"),
    (lambda: LevelSet(num_corrections=-1), "num_corrections"),
    (lambda: LevelSet(second_order="yes"), "second_order"),
  ],
)
def test_bad_hyper_parameters_name_the_field(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_symmetry_is_optional_only_for_group_free_backends():
  params, data = mlp_problem()
  with pytest.raises(TypeError, match="symmetry"):
    tj.teleport(mlp_loss, params, data, solver="lie")
  with pytest.raises(TypeError, match="symmetry"):
    tj.with_teleport(optax.sgd(0.1), None, [0])
  with pytest.raises(ValueError, match="LevelSet back-end has none"):
    tj.with_teleport(optax.sgd(0.1), None, [0], solver_backend="levelset", state_policy="transport")
  with pytest.raises(ValueError, match="NullSpace back-end has none"):
    tj.with_teleport(
      optax.sgd(0.1), None, [0], solver_backend="nullspace", state_policy="transport"
    )


# ---------------------------------------------------------------- quadratics
def test_levelset_stays_on_the_ellipsoid_and_finds_its_steepest_point():
  h = jnp.array([4.0, 1.0, 0.25])
  loss = lambda w: 0.5 * jnp.sum(h * w**2)
  w0 = jnp.array([0.3, 1.0, -2.0])
  new, info = tj.teleport(loss, w0, solver="levelset", objective="max_grad_norm", num_steps=30)
  assert int(info.status) == S.SUCCESSFUL
  l0 = float(loss(w0))
  assert abs(float(loss(new)) - l0) <= tj.default_rtol(jnp.float64) * l0
  # max |H w|^2 on {w^T H w = 2 L0} is 2 L0 lambda_max, along the top eigenvector
  best = 2 * l0 * 4.0
  assert float(info.grad_norm_sq_before) < 0.5 * best
  np.testing.assert_allclose(float(info.grad_norm_sq_after), best, rtol=1e-3)
  np.testing.assert_allclose(abs(float(new[0])), np.sqrt(2 * l0 / 4.0), rtol=1e-3)


def test_levelset_lookahead_on_the_ellipsoid_picks_the_fastest_direction():
  # GD with lr 0.2 shrinks the components along H's eigenvectors (4, 1, 0.25) by
  # 0.2, 0.8 and 0.95 per step: the best point of the level set for a 2-step
  # look-ahead lies on the top eigenvector, where the look-ahead is L0 * 0.2^4
  h = jnp.array([4.0, 1.0, 0.25])
  loss = lambda w: 0.5 * jnp.sum(h * w**2)
  w0 = jnp.array([0.3, 1.0, -2.0])
  new, info = tj.teleport(
    loss, w0, solver="levelset", objective=tj.objectives.lookahead_loss(0.2, 2), num_steps=30
  )
  assert int(info.status) == S.SUCCESSFUL
  l0 = float(loss(w0))
  assert abs(float(loss(new)) - l0) <= tj.default_rtol(jnp.float64) * l0
  np.testing.assert_allclose(float(info.objective_after), l0 * 0.2**4, rtol=0.05)


def test_nullspace_keeps_the_fit_and_moves_to_the_min_norm_solution():
  x, w0 = fill((jnp.zeros((3, 6)), jnp.zeros((6, 2))))
  data = (x, jnp.ones((3, 2)))
  loss = lambda w, d: 0.5 * jnp.sum((d[0] @ w - d[1]) ** 2)
  norm = tj.objectives.Objective(lambda loss_fn, w, d: jnp.sum(w**2), False, "norm")
  new, info = tj.teleport(loss, w0, data, solver="nullspace", objective=norm, num_steps=30)
  assert int(info.status) == S.SUCCESSFUL
  # the level set {x w = x w0} is w0 + null(x); its smallest-norm point is the
  # projection of w0 onto the row space of x
  w_star = jnp.linalg.pinv(x) @ x @ w0
  np.testing.assert_allclose(x @ new, x @ w0, atol=1e-12)
  assert float(jnp.linalg.norm(new - w_star)) < 0.01 * float(jnp.linalg.norm(w0 - w_star))


def test_nullspace_without_a_null_space_reports_nothing_to_move():
  x = fill(jnp.zeros((6, 4)))  # 6 rows >= width 4
  loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
  w = jnp.ones((4, 2))
  (rep,) = nullspace_report(loss, w, x)
  assert not rep.moves and "6 rows >= input width 4" in rep.reason
  new, info = tj.teleport(loss, w, x, solver="nullspace", objective="max_grad_norm")
  assert int(info.status) == S.NOTHING_TO_MOVE and "NullSpace" in info.message
  assert leaves_equal(new, w)


# ---------------------------------------------------------------------- MLPs
def test_nullspace_on_an_mlp_moves_only_kernels_and_is_exact_only_on_the_batch():
  params, data, new, info = mlp_results("nullspace")
  assert bool(jnp.all(info.status == S.SUCCESSFUL))
  assert float(jnp.max(info.rel_loss_drift)) <= F32_RTOL
  assert bool(jnp.all(info.grad_norm_sq_after > info.grad_norm_sq_before))
  for name, layer in params["params"].items():
    np.testing.assert_array_equal(new["params"][name]["bias"], layer["bias"])
    assert not np.array_equal(new["params"][name]["kernel"], layer["kernel"])
  stats = info.stats
  assert bool(jnp.all((0 < stats["null_fraction"]) & (stats["null_fraction"] < 1)))
  assert bool(jnp.all(stats["null_fraction"] < stats["movable_fraction"]))
  held_out = fill((jnp.zeros((50, 8), jnp.float32), jnp.zeros((50, 3), jnp.float32)), seed=7)
  drift_fn = jax.jit(jax.vmap(held_out_drift, (None, 0, 0, None)), static_argnums=0)
  drifts = drift_fn(mlp_loss, params, new, held_out)
  for s in range(2):
    drift = float(drifts[s])
    assert np.isfinite(drift) and drift > 100 * float(info.rel_loss_drift[s])


def test_levelset_on_an_mlp_keeps_the_loss_and_improves_the_objective():
  params, data, new, info = mlp_results("levelset")
  assert bool(jnp.all(info.status == S.SUCCESSFUL))
  assert bool(jnp.all(info.grad_norm_sq_after > info.grad_norm_sq_before))
  for s in range(2):
    p0, p1, d = unstack(params, s), unstack(new, s), unstack(data, s)
    l0, l1 = float(mlp_loss(p0, d)), float(mlp_loss(p1, d))
    assert abs(l1 - l0) <= F32_RTOL * l0


def test_ten_repeated_levelset_calls_stay_within_rtol_of_the_first_loss():
  params, data = stack(mlp_problem(0), mlp_problem(1))
  losses = jax.vmap(mlp_loss)
  l0 = losses(params, data)
  p, accepted = params, 0
  for _ in range(10):
    p, info = mlp_teleport("levelset")(p, data)
    accepted += int(jnp.sum(info.accepted))
    assert float(jnp.max(jnp.abs(losses(p, data) - l0) / l0)) <= F32_RTOL
  assert accepted >= 10


# ------------------------------------------- structure, without the driver
def test_nullspace_reads_dense_layers_in_any_orientation():
  n = 3
  x = fill(jnp.zeros((n, 7)), seed=3)
  # x @ W, W @ h (columns are samples), h @ W.T
  params = fill({"a": jnp.zeros((7, 6)), "b": jnp.zeros((5, 6)), "c": jnp.zeros((4, 5))})

  def fwd(p, x):
    h = jnp.tanh(x @ p["a"])
    h = jnp.tanh(p["b"] @ h.T).T
    return h @ p["c"].T

  loss = lambda p, x: jnp.sum(fwd(p, x) ** 2)
  rep = {r.path: (r.rows, r.width, r.null_dim) for r in nullspace_report(loss, params, x)}
  assert rep == {"a": (n, 7, 4), "b": (n, 6, 3), "c": (n, 5, 2)}
  new, d = null_step(loss, params, x)
  assert all(float(jnp.linalg.norm(v)) > 0.5 for v in d.values())
  np.testing.assert_allclose(fwd(new, x), fwd(params, x), atol=1e-12)


class TinyAttention(nnx.Module):
  def __init__(self, rngs):
    f64 = dict(param_dtype=jnp.float64, rngs=rngs)
    self.norm = nnx.LayerNorm(8, **f64)
    self.att = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, **f64
    )
    self.head = nnx.Linear(8, 3, **f64)

  def __call__(self, x):
    return self.head(self.att(self.norm(x)))


def test_nullspace_moves_attention_projections_of_an_nnx_model_exactly():
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TinyAttention(nnx.Rngs(0))), nnx.Param)
  state = fill(abstract)
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  loss = lambda s, x: jnp.mean(apply(s, x) ** 2)
  x = fill(jnp.zeros((2, 3, 8)), seed=2)  # 2 x 3 tokens < width 8
  rep = {r.path: r for r in nullspace_report(loss, state, x)}
  for name in ("query", "key", "value", "out"):
    assert rep[f"att/{name}/kernel"].moves and rep[f"att/{name}/kernel"].null_dim == 2
  assert rep["norm/scale"].reason == "read by mul"
  assert rep["att/query/bias"].reason == "read by add"
  new, d = null_step(loss, state, x)
  assert float(jnp.linalg.norm(d["att"]["query"]["kernel"][...])) > 0.1
  np.testing.assert_allclose(apply(new, x), apply(state, x), atol=1e-12)


def test_nullspace_blocks_leaves_it_cannot_move_exactly():
  w = jnp.ones((5, 3))
  x = jnp.ones((2, 5))
  cases = {  # a weight-decay term in the loss; a product of two weights
    "read by integer_pow": lambda p, x: jnp.sum(x @ p[0]) + 1e-3 * jnp.sum(p[0] ** 2),
    "contracted with another parameter": lambda p, x: jnp.sum(x @ (p[0] @ p[1].T)),
  }
  for reason, loss in cases.items():
    rep = nullspace_report(loss, [w, w], x)
    assert not rep[0].moves and rep[0].reason == reason


# ----------------------------------------------------------------------- CNN
class TinyCNN(nn.Module):
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    f = dict(param_dtype=self.param_dtype)
    x = nn.relu(nn.Conv(4, (3, 3), **f)(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), padding="VALID", **f)(x))
    return nn.Dense(3, **f)(x.reshape(x.shape[0], -1))


@functools.cache
def cnn_problem():
  model = TinyCNN(param_dtype=jnp.float64)
  x = fill(jnp.zeros((2, 10, 10, 1)), seed=1)
  params = fill(jax.eval_shape(model.init, jax.random.key(0), x))

  def loss(p, d):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, d[0]), d[1]))

  return model, loss, params, (x, jnp.array([0, 2]))


def test_nullspace_report_on_a_cnn_names_what_moves_and_why():
  model, loss, params, data = cnn_problem()
  rep = {r.path: r for r in nullspace_report(loss, params, data)}
  first = rep["params/Conv_0/kernel"]  # 2 images x 100 positions >= 3 x 3 x 1
  assert not first.moves and (first.rows, first.width) == (200, 9) and "200 rows" in first.reason
  second = rep["params/Conv_1/kernel"]  # 2 x 3 x 3 positions < 3 x 3 x 4
  assert second.moves and (second.rows, second.width, second.null_dim) == (18, 36, 18)
  assert rep["params/Dense_0/kernel"].null_dim == 70
  assert rep["params/Conv_0/bias"].reason == "read by add"
  new, _ = null_step(loss, params, data)  # exact: im2col columns are in kernel order
  kernel = lambda p: p["params"]["Conv_1"]["kernel"]
  assert float(jnp.max(jnp.abs(kernel(new) - kernel(params)))) > 0.1
  np.testing.assert_allclose(model.apply(new, data[0]), model.apply(params, data[0]), atol=1e-12)


def test_levelset_teleports_a_cnn_to_smaller_weights():
  _, loss, params, data = cnn_problem()
  norm = tj.objectives.Objective(lambda loss_fn, p, d: optax.tree.vdot(p, p), False, "weight_norm")
  new, info = tj.teleport(loss, params, data, solver="levelset", objective=norm, num_steps=4)
  assert int(info.status) == S.SUCCESSFUL and int(info.num_accepted_steps) >= 2
  assert float(optax.tree.vdot(new, new)) < float(optax.tree.vdot(params, params))
  assert abs(float(loss(new, data) - loss(params, data))) <= 1e-8 * float(loss(params, data))


# -------------------------------------------------------------------- guard
class OffTheLevelSet(LevelSet):
  """A broken back-end: every candidate is scaled off the level set."""

  def propose(self, problem, w, state, aux):
    cand, _ = super().propose(problem, w, state, aux)
    return jax.tree_util.tree_map(lambda a: 1.1 * a, cand), None


def test_guard_rejects_candidates_off_the_level_set_and_returns_the_input():
  loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0, 0.25]) * w**2)
  w0 = jnp.array([0.3, 1.0, -2.0])
  kwargs = dict(solver=OffTheLevelSet(), objective="max_grad_norm", num_steps=3)
  new, info = tj.teleport(loss, w0, **kwargs)
  assert int(info.status) == S.STEPS_LEFT_LEVEL_SET and not bool(info.accepted)
  assert int(info.num_drift_steps) == 3
  assert "changed the loss by more than rtol" in info.message
  np.testing.assert_array_equal(new, w0)
  with pytest.raises(tj.TeleportError, match="STEPS_LEFT_LEVEL_SET"):
    tj.teleport(loss, w0, throw=True, **kwargs)


# ------------------------------------------------------------- with_teleport
def value_fn(params, x, y):
  return mlp_loss(params, (x, y))


@functools.cache
def train(solver: str, policy: str):
  """Three jitted SGD-with-momentum steps teleporting at steps 0 and 2.

  The defaults apply: the objective simulates the wrapped optimizer
  (``optimizer_lookahead``) and, as the schedule repeats, every inner step is
  stability-constrained.
  """
  opt = tj.with_teleport(
    optax.sgd(0.05, momentum=0.9),
    None,
    [0, 2],
    solver_backend=solver,
    state_policy=policy,
    num_steps=3,
  )

  @jax.jit
  def run(params, x, y):
    def step(carry, _):
      p, s = carry
      g = jax.grad(value_fn)(p, x, y)
      u, s = opt.update(g, s, p, value_fn=value_fn, x=x, y=y)
      return (optax.apply_updates(p, u), s), s.info.status

    (p, s), statuses = jax.lax.scan(step, (params, opt.init(params)), None, length=3)
    return p, s, statuses

  return opt, run


@pytest.mark.parametrize("solver, policy", [("nullspace", "keep"), ("levelset", "reset")])
def test_with_teleport_runs_group_free_backends(solver, policy):
  params, (x, y) = mlp_problem()
  _, run = train(solver, policy)
  p, state, statuses = run(params, x, y)
  assert int(state.num_teleports) + int(state.num_rejected) == 2
  assert int(statuses[0]) == S.SUCCESSFUL and int(state.num_teleports) >= 1
  assert float(state.max_rel_loss_drift) <= F32_RTOL
  info = state.info
  assert not bool(jnp.isnan(info.step_sharpness_before))  # the stability bound ran
  assert set(info.stats) == set(backends.as_solver(solver).stats_template(jnp.float32))
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(p))
