"""Bad input raises a clear error naming the argument, before any computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_mlp
from test_solver import loss
from test_solver import published_problem

import teleport_jax as tj

SYM = tj.DataDependentGL(activation=tj.activations.leaky_relu(0.1))


def test_wrong_pytree_layout():
  _, data = published_problem(0)
  with pytest.raises(ValueError, match="params"):
    tj.teleport(loss, {"a": jnp.ones(3)}, data, symmetry=SYM)
  with pytest.raises(ValueError, match="params"):
    tj.symmetries.infer_layout([jnp.ones((3, 3))])  # one layer: no hidden layer


def test_mismatched_shapes():
  params, data = published_problem(0)
  bad = [params[0], jnp.ones((7, 5)), params[2]]  # layer 1 expects 6 inputs
  with pytest.raises(ValueError, match="params: layer 0 has 6 outputs"):
    tj.teleport(loss, bad, data, symmetry=SYM)
  with pytest.raises(ValueError, match="data: inputs have 3 features"):
    tj.teleport(loss, params, (jnp.ones((3, 4)), data[1]), symmetry=SYM)
  g = SYM.identity(params)
  with pytest.raises(ValueError, match=r"g\[0\] has shape"):
    tj.group_action(params, (g[1], g[0]), symmetry=SYM, data=data)
  with pytest.raises(ValueError, match="bias of layer 0"):
    tj.symmetries.infer_layout([(jnp.ones((4, 3)), jnp.ones(5)), (jnp.ones((2, 4)), jnp.ones(2))])


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_non_invertible_activation_with_data_dependent_action(act):
  with pytest.raises(ValueError, match="activation .* is not invertible"):
    tj.DataDependentGL(activation=act)


def test_non_homogeneous_activation_with_rescaling():
  with pytest.raises(ValueError, match="activation .* is not positively homogeneous"):
    tj.PositiveRescaling(activation="asinh")


def test_unknown_activation_and_objective_names():
  with pytest.raises(ValueError, match="Unknown activation 'swish'"):
    tj.DataDependentGL(activation="swish")
  with pytest.raises(TypeError, match="activation must be"):
    tj.DataDependentGL(activation=3)
  params, data = published_problem(0)
  with pytest.raises(ValueError, match="Unknown objective 'fastest'"):
    tj.teleport(loss, params, data, symmetry=SYM, objective="fastest")
  with pytest.raises(ValueError, match="negative_slope"):
    tj.activations.leaky_relu(0.0)


def test_non_finite_params_or_data_give_the_same_rejection_eagerly_and_under_jit():
  params, data = published_problem(0)
  bad = [params[0].at[1, 2].set(jnp.inf)] + params[1:]
  bad_data = (data[0].at[0, 0].set(jnp.nan), data[1])
  run = lambda p, d: tj.teleport(loss, p, d, symmetry=SYM, num_steps=2)  # noqa: E731
  for p, d in ((bad, data), (params, bad_data)):
    eager_p, eager_i = run(p, d)
    jit_p, jit_i = jax.jit(run)(p, d)
    for i in (eager_i, jit_i):
      assert int(i.status) == tj.TeleportStatus.NONFINITE_INPUT and not bool(i.accepted)
    for a, b, c in zip(eager_p, jit_p, p):
      np.testing.assert_array_equal(a, c)
      np.testing.assert_array_equal(b, c)
  with pytest.raises(tj.TeleportError, match="NONFINITE_INPUT"):
    tj.teleport(loss, bad, data, symmetry=SYM, num_steps=2, throw=True)


def test_missing_data_for_data_dependent_action():
  params, _ = published_problem(0)
  with pytest.raises(ValueError, match="data is required"):
    tj.teleport(lambda p: 0.0, params, symmetry=SYM)
  with pytest.raises(ValueError, match="data is a mapping with keys"):
    tj.teleport(lambda p, d: 0.0, params, {"foo": jnp.ones((5, 4))}, symmetry=SYM)


def test_bad_solver_arguments():
  params, data = published_problem(0)
  with pytest.raises(ValueError, match="num_steps"):
    tj.teleport(loss, params, data, symmetry=SYM, num_steps=-1)
  with pytest.raises(ValueError, match="step_size"):
    tj.teleport(loss, params, data, symmetry=SYM, step_size=0.0)
  with pytest.raises(TypeError, match="symmetry must be"):
    tj.teleport(loss, params, data, symmetry="gl")
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    tj.teleport(None, params, data, symmetry=SYM)


@pytest.mark.parametrize("schedule", [0, -3, "often", [1, -2], 2.5, None, [True]])
def test_schedule_not_understood(schedule):
  with pytest.raises(ValueError, match="schedule"):
    tj.with_teleport(optax.sgd(0.1), SYM, schedule=schedule)


def test_bad_transform_arguments():
  with pytest.raises(ValueError, match="state_policy"):
    tj.with_teleport(optax.sgd(0.1), SYM, schedule=1, state_policy="transport-ish")
  with pytest.raises(TypeError, match="optimizer must be"):
    tj.with_teleport("sgd", SYM, schedule=1)
  params, data = published_problem(0)
  opt = tj.with_teleport(optax.sgd(0.1), SYM, schedule=1)
  state = opt.init(params)
  with pytest.raises(ValueError, match="value_fn must be passed"):
    opt.update(params, state, params)
  with pytest.raises(ValueError, match="needs the batch"):
    opt.update(params, state, params, value_fn=lambda p: 0.0)
  with pytest.raises(ValueError, match="params must be passed"):
    opt.update(params, state, value_fn=lambda p: 0.0)


def test_layout_and_variant_arguments():
  with pytest.raises(ValueError, match="kernel_format"):
    tj.symmetries.MLPLayout(((0,), (1,)), (None, None), "rows")
  with pytest.raises(ValueError, match="variant"):
    tj.DataDependentGL(variant="approximately")
  with pytest.raises(TypeError, match="layout must be"):
    tj.PositiveRescaling(layout="mlp").algebra_zeros([jnp.ones((2, 2))] * 2)
  with pytest.raises(ValueError, match="k must be an int"):
    tj.every(0)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  with pytest.raises(ValueError, match="data: the network inputs must be a 2-D array"):
    SYM.validate(published_problem(0)[0], x)


# ------------------------------------------------------- configuration errors
def test_teleport_error_is_one_class_and_a_value_error():
  from teleport_jax._src.solver import solver

  assert tj.TeleportError is solver.TeleportError
  assert issubclass(tj.TeleportError, ValueError)


@pytest.mark.parametrize("throw", [None, True], ids=["default", "throw"])
def test_a_group_that_is_not_a_symmetry_raises_teleport_error_eagerly(throw):
  # GL between the layers of a LeakyReLU network is not a symmetry of its loss
  # (on the published problem every pre-activation is positive: a random one)
  params = random_mlp(jax.random.key(2), (5, 6, 7, 8), jnp.float32)
  data = (
    jax.random.normal(jax.random.key(3), (5, 4)),
    jax.random.normal(jax.random.key(4), (8, 4)),
  )
  with pytest.raises(tj.TeleportError, match="NOT_A_SYMMETRY: .*not a symmetry of this loss"):
    tj.teleport(loss, params, data, symmetry=tj.LinearGL(), num_steps=2, throw=throw)
  with pytest.raises(ValueError, match="not a symmetry of this loss"):
    tj.teleport(loss, params, data, symmetry=tj.LinearGL(), num_steps=2, throw=throw)


def test_with_teleport_next_to_other_chain_links_raises_teleport_error():
  params, data = published_problem(0)
  vf = lambda p, x, y: loss(p, (x, y))  # noqa: E731
  opt = optax.chain(optax.clip_by_global_norm(1.0), tj.with_teleport(optax.sgd(0.1), SYM, 5))
  state = opt.init(params)
  grads = jax.grad(vf)(params, *data)
  with pytest.raises(tj.TeleportError, match="with_teleport is link .*optax.chain.*outermost"):
    opt.update(grads, state, params, value_fn=vf, x=data[0], y=data[1])


def test_optimizer_lookahead_without_an_optimizer_raises_teleport_error():
  params, data = published_problem(0)
  with pytest.raises(tj.TeleportError, match="optimizer_lookahead needs the optimizer"):
    tj.teleport(
      loss, params, data, symmetry=SYM, objective=tj.objectives.optimizer_lookahead(), num_steps=1
    )


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "identity", "tanh", "asinh"])
@pytest.mark.parametrize("symmetry", [tj.DataDependentGL, tj.PositiveRescaling])
def test_an_uncalled_activation_factory_says_to_call_it(name, symmetry):
  factory = getattr(tj.activations, name)
  pattern = (
    r"activation must be a teleport_jax.activations.Activation; "
    rf"tj\.activations\.{name} is a factory: pass tj\.activations\.{name}\("
  )
  with pytest.raises(TypeError, match=pattern):
    symmetry(activation=factory)


@pytest.mark.parametrize(
  "bad_loss,what",
  [
    (lambda p, d: jnp.sum((d[1] - p[2] @ p[1] @ p[0] @ d[0]) ** 2, axis=0), r"shape \(4,\)"),
    (lambda p, d: (loss(p, d), loss(p, d)), "a tuple of 2"),
    (lambda p, d: jnp.int32(3), "dtype int32"),
  ],
  ids=["vector", "tuple", "integer"],
)
def test_a_loss_that_is_not_a_scalar_float_raises_type_error_naming_loss_fn(bad_loss, what):
  params, data = published_problem(0)
  with pytest.raises(TypeError, match=f"loss_fn must return a scalar floating-point loss.*{what}"):
    tj.teleport(bad_loss, params, data, symmetry=SYM, num_steps=1)
  with pytest.raises(TypeError, match="loss_fn"):
    jax.jit(lambda p, d: tj.teleport(bad_loss, p, d, symmetry=SYM, num_steps=1))(params, data)
