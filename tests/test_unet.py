"""Tests for the DDPM U-Net (jaxdiff/models/unet.py)."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxdiff.models import UNet, count_params, timestep_embedding

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
            out_channels=3)
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.1, out_channels=3, resamp_with_conv=True)
DDPM_CIFAR10_PARAMS = 35_746_307  # the official diffusion_tf count (the paper's "35.7M")


def make_inputs(key: jax.Array, shape: tuple[int, ...], num_classes: int = 0):
  """A random image batch, timesteps in [0, 1000) and (if num_classes) labels."""
  x_key, t_key, y_key = jax.random.split(key, 3)
  x = jax.random.normal(x_key, shape)
  t = jax.random.randint(t_key, (shape[0],), 0, 1000)
  y = jax.random.randint(y_key, (shape[0],), 0, num_classes) if num_classes else None
  return x, t, y


@jax.jit
def perturb(params, key: jax.Array, scale: float = 0.1):
  """Add noise to every parameter, so the zero-initialised layers stop hiding the rest."""
  flat, unravel = ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(key, flat.shape))


class Setup(NamedTuple):
  model: UNet
  x: jax.Array
  t: jax.Array
  y: jax.Array | None
  params: dict  # as initialised
  perturbed: dict  # with noise added, so every layer matters


def setup(num_classes: int = 0) -> Setup:
  model = UNet(**TINY, num_classes=num_classes)
  x, t, y = make_inputs(jax.random.key(0), (2, 8, 8, 3), num_classes)
  params = jax.jit(model.init)(jax.random.key(1), x, t, y)["params"]
  return Setup(model, x, t, y, params, perturb(params, jax.random.key(2)))


@pytest.fixture(scope="module")
def tiny() -> Setup:
  return setup()


@pytest.mark.parametrize("overrides, shape", [
    ({}, (2, 8, 8, 3)),
    (dict(ch_mult=(1, 2, 2), attn_resolutions=(), out_channels=2), (2, 16, 16, 1)),
    (dict(attn_resolutions=(8, 4), num_heads=2, resamp_with_conv=False), (3, 8, 8, 3)),
    (dict(num_classes=10), (2, 8, 8, 3)),
    (dict(ch=32, num_res_blocks=2, remat=True), (1, 8, 16, 4)),
    (dict(dtype="bfloat16"), (2, 8, 8, 3)),
])
def test_output_shape_and_dtype(overrides, shape):
  config = {**TINY, **overrides}
  model = UNet(**config)
  x, t, y = make_inputs(jax.random.key(0), shape, config.get("num_classes", 0))
  variables = jax.eval_shape(model.init, jax.random.key(1), x, t, y)
  out = jax.eval_shape(model.apply, variables, x, t, y)
  assert out.shape == shape[:-1] + (config["out_channels"],)
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def test_fresh_network_predicts_zero(tiny):
  # conv_out is zero-initialised, as in DDPM.
  out = jax.jit(tiny.model.apply)({"params": tiny.params}, tiny.x, tiny.t)
  np.testing.assert_array_equal(out, 0.0)


def test_bfloat16_computes_in_bfloat16(tiny):
  variables = {"params": tiny.perturbed}
  out32 = jax.jit(tiny.model.apply)(variables, tiny.x, tiny.t)
  out16 = jax.jit(UNet(**TINY, dtype="bfloat16").apply)(variables, tiny.x, tiny.t)
  assert out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)
  rel_err = jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)
  assert rel_err < 0.05


def test_built_from_config_dict():
  model_config = ml_collections.ConfigDict({**TINY, "num_classes": 0, "dtype": "float32",
                                            "resamp_with_conv": True, "num_heads": 1,
                                            "remat": False})
  model = UNet(**model_config)
  x, t, _ = make_inputs(jax.random.key(0), (1, 8, 8, 3))
  variables = jax.eval_shape(model.init, jax.random.key(1), x, t)
  assert jax.eval_shape(model.apply, variables, x, t).shape == (1, 8, 8, 3)


def cifar10_param_count(**overrides) -> int:
  model = UNet(**{**CIFAR10, **overrides})
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1,), jnp.int32))
  return count_params(shapes["params"])


def test_cifar10_param_count_matches_ddpm():
  num_params = cifar10_param_count()
  assert abs(num_params - 35.7e6) <= 0.005 * 35.7e6
  assert num_params == DDPM_CIFAR10_PARAMS


def test_class_embedding_adds_one_row_per_class_plus_null():
  assert cifar10_param_count(num_classes=10) == DDPM_CIFAR10_PARAMS + (10 + 1) * 4 * 128


@pytest.mark.parametrize("dim", [32, 33, 128])
def test_timestep_embedding_matches_float64_reference(dim):
  t = np.random.default_rng(0).integers(0, 1000, size=16)
  half = dim // 2
  freqs = np.exp(-np.log(10_000.0) * np.arange(half, dtype=np.float64) / (half - 1))
  args = t.astype(np.float64)[:, None] * freqs[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args), np.zeros((len(t), dim % 2))], axis=1)
  got = timestep_embedding(jnp.asarray(t), dim)
  assert got.shape == (16, dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=3e-4)


def train_loss(model: UNet, params, x, t, dropout_key):
  out = model.apply({"params": params}, x, t, train=True, rngs={"dropout": dropout_key})
  return jnp.mean(out**2)


def test_param_gradients_are_finite_and_reach_the_input_conv(tiny):
  grad_fn = jax.jit(jax.grad(train_loss, argnums=1), static_argnums=0)
  grads = grad_fn(tiny.model, tiny.perturbed, tiny.x, tiny.t, jax.random.key(3))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["conv_in"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["temb_dense0"]["kernel"]).max()) > 0


def test_remat_keeps_params_and_gradients(tiny):
  rematted = UNet(**TINY, remat=True)
  remat_shapes = jax.eval_shape(rematted.init, jax.random.key(1), tiny.x, tiny.t)["params"]
  assert jax.tree.structure(remat_shapes) == jax.tree.structure(tiny.params)
  grad_fn = jax.jit(jax.grad(train_loss, argnums=1), static_argnums=0)
  args = (tiny.perturbed, tiny.x, tiny.t, jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grad_fn(rematted, *args), grad_fn(tiny.model, *args))


def test_dropout_only_in_training(tiny):
  @functools.partial(jax.jit, static_argnums=0)
  def run(train, key):
    return tiny.model.apply({"params": tiny.perturbed}, tiny.x, tiny.t, train=train,
                            rngs={"dropout": key})

  assert not np.allclose(run(True, jax.random.key(1)), run(True, jax.random.key(2)))
  np.testing.assert_array_equal(run(False, jax.random.key(1)), run(False, jax.random.key(2)))


def test_timestep_conditions_the_output(tiny):
  apply = jax.jit(tiny.model.apply)
  variables = {"params": tiny.perturbed}
  assert not np.allclose(apply(variables, tiny.x, tiny.t), apply(variables, tiny.x, tiny.t + 1))


def test_class_label_conditions_the_output():
  num_classes = 5
  model, x, t, y, _, params = setup(num_classes)
  apply = jax.jit(model.apply)
  variables = {"params": params}
  out_0 = apply(variables, x, t, jnp.zeros_like(y))
  assert not np.allclose(out_0, apply(variables, x, t, jnp.ones_like(y)))
  # y=None means "no label": the extra row num_classes of the embedding table.
  np.testing.assert_array_equal(apply(variables, x, t),
                                apply(variables, x, t, jnp.full_like(y, num_classes)))


def test_bad_spatial_size_is_a_clear_error():
  model = UNet(**{**TINY, "ch_mult": (1, 2, 2)})
  x, t, _ = make_inputs(jax.random.key(0), (1, 6, 6, 3))
  with pytest.raises(ValueError, match=r"6x6.*ch_mult=\(1, 2, 2\)"):
    jax.eval_shape(model.init, jax.random.key(1), x, t)


def test_labels_for_unconditional_model_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match="num_classes=0"):
    tiny.model.apply({"params": tiny.params}, tiny.x, tiny.t, jnp.zeros_like(tiny.t))


def test_wrong_rank_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match="rank 4"):
    tiny.model.apply({"params": tiny.params}, tiny.x[0], tiny.t)


def test_adam_fits_a_fixed_noise_target(tiny):
  model = UNet(**{**TINY, "dropout": 0.0})
  x, t = tiny.x, tiny.t
  target = jax.random.normal(jax.random.key(4), x.shape)
  optimizer = optax.adam(3e-3)

  def mse(params):
    return jnp.mean((model.apply({"params": params}, x, t) - target)**2)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(mse)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=300)
    return losses[0], mse(params)

  initial, final = map(float, fit(tiny.params))
  assert final < 0.2 * initial, (initial, final)
