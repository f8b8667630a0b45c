"""The model zoo: shapes, both frameworks, train/eval modes, argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import teleport_jax.models as zoo
from teleport_jax._src.core import paths
from teleport_jax._src.symmetries import groups

FRAMEWORKS = ("linen", "nnx")

BUILDERS = {
  "mlp": (zoo.mlp, (8, 4)),
  "cnn": (zoo.cnn, (8, 10)),
  "cnn_batchnorm": (functools.partial(zoo.cnn, batchnorm=True, pool="avg"), (8, 10)),
  "residual_mlp": (zoo.residual_mlp, (8, 4)),
  "transformer": (zoo.transformer, (4, 8, 32)),
  "transformer_gqa": (
    functools.partial(zoo.transformer, kv_heads=2, positions="rotary", mlp="swiglu"),
    (4, 8, 32),
  ),
  "lora_mlp": (zoo.lora_mlp, (8, 4)),
}


def leaf_shapes(params) -> dict[str, tuple[int, ...]]:
  """``{path without the linen collection and with blocks_i -> blocks/i: shape}``."""
  index = paths.LeafIndex(params)
  out = {}
  for p, x in zip(index.paths, index.leaves):
    p = p[1:] if p[0] in ("params", "batch_stats") else p
    name = "/".join(p).replace("blocks_", "blocks/")
    out[name] = tuple(x.shape)
  return out


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_model_builds_with_the_documented_output(name, framework):
  build, out_shape = BUILDERS[name]
  m = build(framework=framework)
  assert isinstance(m, zoo.Model) and m.framework == framework
  out = jax.eval_shape(m.apply, m.params, m.inputs)
  assert out.shape == out_shape and out.dtype == jnp.float32
  assert (m.apply_eval is not None) == (name == "cnn_batchnorm")
  if framework == "linen":
    assert "params" in m.params
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(m.params))


@pytest.mark.parametrize("name", ["mlp", "transformer", "lora_mlp"])
def test_linen_and_nnx_share_leaf_names_and_shapes(name):
  build, _ = BUILDERS[name]
  linen, nnx = build(framework="linen"), build(framework="nnx")
  shapes = leaf_shapes(nnx.params)
  if name == "transformer":
    assert leaf_shapes(linen.params) == shapes
  else:  # linen auto-names Dense_i / LoRADense_i, nnx lists layers/i
    assert sorted(leaf_shapes(linen.params).values()) == sorted(shapes.values())


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float64_models_hold_float64_leaves_including_batch_statistics(framework):
  m = zoo.cnn(batchnorm=True, framework=framework, dtype=jnp.float64)
  assert {x.dtype for x in jax.tree_util.tree_leaves(m.params)} == {jnp.dtype(jnp.float64)}
  assert jax.eval_shape(m.apply_eval, m.params, m.inputs).dtype == jnp.float64


def test_seeds_are_deterministic():
  a, b, c = zoo.mlp(seed=3), zoo.mlp(seed=3), zoo.mlp(seed=4)
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_apply_is_a_pure_jittable_function_of_params(framework):
  m = zoo.mlp(widths=(3, 5, 2), framework=framework)
  y = jax.jit(m.apply)(m.params, m.inputs)
  np.testing.assert_allclose(y, m(), rtol=1e-6)
  doubled = jax.tree_util.tree_map(lambda x: 2 * x, m.params)
  assert not np.allclose(m.apply(doubled, m.inputs), y)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_transformer_is_causal(framework):
  m = zoo.transformer(layers=1, positions="rotary", kv_heads=2, framework=framework)
  tokens = m.inputs.at[:, -1].set((m.inputs[:, -1] + 1) % 32)
  a, b = m.apply(m.params, m.inputs), m.apply(m.params, tokens)
  np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_batchnorm_models_run_train_and_eval_modes(framework):
  m = zoo.cnn(channels=(2,), dense=(3,), image=(4, 4, 1), batchnorm=True, framework=framework)
  train, evaluate = m.apply(m.params, m.inputs), m.apply_eval(m.params, m.inputs)
  assert train.shape == evaluate.shape == (8, 3)
  assert not np.allclose(train, evaluate)
  names = set(leaf_shapes(m.params))
  assert any(n.endswith("mean") for n in names) and any(n.endswith("var") for n in names)


def test_transformer_options_change_the_parameters():
  base = leaf_shapes(zoo.transformer(framework="nnx").params)
  assert base["blocks/0/attn/query/kernel"] == (16, 4, 4)
  assert base["blocks/0/attn/out/kernel"] == (4, 4, 16)
  assert "pos_embed/embedding" in base and "unembed/kernel" in base
  gqa = leaf_shapes(zoo.transformer(kv_heads=1, framework="nnx").params)
  assert gqa["blocks/0/attn/key/kernel"] == (16, 1, 4)
  tied = leaf_shapes(
    zoo.transformer(
      tie_embeddings=True, positions="rotary", norm="rmsnorm_gainfree", framework="nnx"
    ).params
  )
  assert "unembed/kernel" not in tied and "pos_embed/embedding" not in tied
  assert not any("norm" in n for n in tied)
  biased = leaf_shapes(zoo.transformer(attention_bias=True, mlp="reglu").params)
  assert biased["blocks/0/attn/query/bias"] == (4, 4)
  assert biased["blocks/0/mlp/gate/kernel"] == (16, 64)
  assert leaf_shapes(zoo.transformer(norm="rmsnorm").params)["final_norm/scale"] == (16,)


def test_lora_factors_are_leaves():
  shapes = leaf_shapes(zoo.lora_mlp(widths=(8, 16, 4), rank=3, framework="nnx").params)
  assert shapes["layers/0/lora_a"] == (8, 3) and shapes["layers/0/lora_b"] == (3, 16)
  assert shapes["layers/1/kernel"] == (16, 4)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rotary_embedding_commutes_with_the_rotary_group(pairing):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 5, 2, 6)))
  g = jnp.asarray(rng.standard_normal((2, 3, 2)))
  m = groups.RotaryGL(pairing).matrix(g)  # (heads, 6, 6)
  lhs = zoo.rotary(jnp.einsum("bthi,hij->bthj", x, m), pairing)
  rhs = jnp.einsum("bthi,hij->bthj", zoo.rotary(x, pairing), m)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
  np.testing.assert_allclose(
    jnp.linalg.norm(zoo.rotary(x, pairing), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-12
  )


@pytest.mark.parametrize("name", ["mlp", "transformer", "cnn_batchnorm"])
def test_loss_helpers_give_scalar_losses(name):
  m = BUILDERS[name][0]()
  batch = zoo.example_batch(m)
  assert batch[1].dtype == jnp.int32 and batch[1].shape == m.inputs.shape[: batch[1].ndim]
  out = jax.eval_shape(zoo.loss_for(m), m.params, batch)
  assert out.shape == () and out.dtype == jnp.float32


@pytest.mark.parametrize(
  "build,kwargs,match",
  [
    (zoo.mlp, dict(framework="torch"), "framework must be one of"),
    (zoo.mlp, dict(activation="softplus"), "activation must be one of"),
    (zoo.mlp, dict(widths=(4,)), "widths must be at least 2"),
    (zoo.cnn, dict(pool="min"), "pool must be one of"),
    (zoo.cnn, dict(channels=(2, 2, 2, 2)), "too small for 4 2x2 poolings"),
    (zoo.transformer, dict(d_model=10, heads=4), r"d_model \(10\) must be a multiple of heads"),
    (zoo.transformer, dict(heads=4, kv_heads=3), r"kv_heads \(3\) must divide heads"),
    (zoo.transformer, dict(d_model=12, heads=4, positions="rotary"), "even d_head"),
    (zoo.transformer, dict(mlp="geglu2"), "mlp must be one of"),
    (zoo.transformer, dict(norm="batchnorm"), "norm must be one of"),
    (zoo.lora_mlp, dict(rank=0), "rank must be a positive int"),
  ],
)
def test_bad_arguments_raise_naming_the_argument(build, kwargs, match):
  with pytest.raises(ValueError, match=match):
    build(**kwargs)
