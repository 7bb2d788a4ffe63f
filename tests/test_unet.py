"""Tests for the DDPM U-Net (jaxdiff/models/unet.py)."""

import functools
from typing import NamedTuple

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxdiff.models import UNet, count_params, timestep_embedding
from jaxdiff.models.unet import GroupNorm, group_normalize

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
            out_channels=3)
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.1, out_channels=3, resamp_with_conv=True)
DDPM_CIFAR10_PARAMS = 35_746_307  # the official diffusion_tf count (the paper's "35.7M")


@jax.jit
def perturb(params, key: jax.Array, scale: float = 0.1):
  """Add noise to every parameter, so the zero-initialised layers stop hiding the rest."""
  flat, unravel = ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(key, flat.shape))


@functools.partial(jax.jit, static_argnames=("model", "train"))
def apply(model: UNet, params, x, t, y=None, train: bool = False, dropout_key=None):
  """`model.apply`, compiled once per (model, train, input structure) for the whole module."""
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)


class Setup(NamedTuple):
  model: UNet
  x: jax.Array
  t: jax.Array
  params: dict  # as initialised
  perturbed: dict  # with noise added, so every layer matters


@pytest.fixture(scope="module")
def tiny() -> Setup:
  """The TINY model, its inputs and parameters, initialised once for the whole module."""
  model = UNet(**TINY)
  x_key, t_key, init_key, noise_key = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(x_key, (2, 8, 8, 3))
  t = jax.random.randint(t_key, (2,), 0, 1000)
  params = jax.jit(model.init)(init_key, x, t)["params"]
  return Setup(model, x, t, params, perturb(params, noise_key))


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
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  y = t if config.get("num_classes", 0) else None
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(1), x, t, y)
  assert out.shape == shape[:-1] + (config["out_channels"],)
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def test_fresh_network_predicts_zero(tiny):
  # conv_out is zero-initialised, as in DDPM.
  np.testing.assert_array_equal(apply(tiny.model, tiny.params, tiny.x, tiny.t), 0.0)


def test_bfloat16_computes_in_bfloat16(tiny):
  out32 = apply(tiny.model, tiny.perturbed, tiny.x, tiny.t)
  out16 = apply(UNet(**TINY, dtype="bfloat16"), tiny.perturbed, tiny.x, tiny.t)
  assert out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)
  rel_err = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel_err < 0.05


def test_a_bfloat16_model_sees_t_998_as_998(tiny):
  """bfloat16 holds 998 as 996 or 1000; a bfloat16 model still embeds t and runs the time MLP
  in float32: its time embedding equals the float32 model's, and a float64 NumPy reference,
  for t = 996, 998, 999 and 1000."""
  assert float(jnp.asarray(998, jnp.bfloat16)) in (996.0, 1000.0)
  t = jnp.array([996, 998, 999, 1000])
  x = jnp.broadcast_to(tiny.x[:1], (4, *tiny.x.shape[1:]))

  def time_embedding(dtype):
    _, state = UNet(**TINY, dtype=dtype).apply(
        {"params": tiny.perturbed}, x, t, capture_intermediates=lambda module, _: (
            module.name == "temb_dense1"), mutable=["intermediates"])
    return state["intermediates"]["temb_dense1"]["__call__"][0]

  in_bfloat16 = time_embedding("bfloat16")
  assert in_bfloat16.dtype == jnp.float32
  np.testing.assert_array_equal(in_bfloat16, time_embedding("float32"))
  half = TINY["ch"] // 2
  freqs = np.exp(-np.log(10_000.0) * np.arange(half, dtype=np.float64) / (half - 1))
  args = np.asarray(t, np.float64)[:, None] * freqs
  layer = lambda h, name: (h @ np.asarray(tiny.perturbed[name]["kernel"], np.float64)
                           + np.asarray(tiny.perturbed[name]["bias"], np.float64))
  hidden = layer(np.concatenate([np.sin(args), np.cos(args)], axis=1), "temb_dense0")
  expected = layer(hidden / (1 + np.exp(-hidden)), "temb_dense1")
  np.testing.assert_allclose(in_bfloat16, expected, rtol=1e-4, atol=1e-4)
  gaps = np.abs(np.diff(expected, axis=0)).max(axis=1)  # 996→998, 998→999, 999→1000
  assert gaps.min() > 100 * np.abs(in_bfloat16 - expected).max()


def test_built_from_config_dict():
  model_config = ml_collections.ConfigDict({**TINY, "num_classes": 0, "dtype": "float32",
                                            "resamp_with_conv": True, "num_heads": 1,
                                            "remat": False})
  model = UNet(**model_config)
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  out, _ = jax.eval_shape(model.init_with_output, jax.random.key(1), x, t)
  assert out.shape == (1, 8, 8, 3)


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


def group_norm_float64(x, scale, bias, groups, epsilon=1e-6):
  """GroupNorm in float64 NumPy: each group's mean and (biased) variance over H, W, C/G."""
  grouped = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  variance = grouped.var(axis=(1, 3), keepdims=True)
  return ((grouped - mean) / np.sqrt(variance + epsilon)).reshape(x.shape) * scale + bias


def test_group_norm_and_its_hand_written_gradient_match_float64_references():
  rng = np.random.default_rng(0)
  x = rng.normal(1.5, 2.0, size=(2, 3, 3, 8))
  scale, bias = rng.normal(1.0, 0.3, size=8), rng.normal(0.0, 0.3, size=8)
  upstream = rng.normal(size=x.shape)  # the loss is Σ upstream · y

  def loss_float64(x, scale, bias):
    return np.sum(upstream * group_norm_float64(x, scale, bias, groups=4))

  def central_differences(index, step=1e-6):
    args = [x, scale, bias]
    grad = np.zeros_like(args[index])
    for position in np.ndindex(grad.shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[index][position] += step
      minus[index][position] -= step
      grad[position] = (loss_float64(*plus) - loss_float64(*minus)) / (2 * step)
    return grad

  got = group_normalize(*(jnp.asarray(a, jnp.float32) for a in (x, scale, bias)), 4, 1e-6)
  np.testing.assert_allclose(got, group_norm_float64(x, scale, bias, groups=4), atol=2e-5)
  grads = jax.grad(lambda *a: jnp.sum(jnp.asarray(upstream, jnp.float32)
                                      * group_normalize(*a, 4, 1e-6)), argnums=(0, 1, 2))(
      *(jnp.asarray(a, jnp.float32) for a in (x, scale, bias)))
  for index, grad in enumerate(grads):
    np.testing.assert_allclose(grad, central_differences(index), rtol=1e-4, atol=1e-4)


def test_group_norm_holds_flax_group_norms_parameters_and_outputs():
  """Checkpoints written with flax.linen.GroupNorm restore into the U-Net unchanged."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64)) * 3 + 1
  ours, flax_norm = GroupNorm(32), nn.GroupNorm(num_groups=32, epsilon=1e-6)
  params = flax_norm.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
  np.testing.assert_allclose(ours.apply(params, x), flax_norm.apply(params, x), atol=1e-5)


def train_loss(model: UNet, params, x, t, dropout_key):
  return jnp.mean(apply(model, params, x, t, train=True, dropout_key=dropout_key)**2)


train_grads = jax.jit(jax.grad(train_loss, argnums=1), static_argnums=0)


def test_param_gradients_are_finite_and_reach_the_input_conv(tiny):
  grads = train_grads(tiny.model, tiny.perturbed, tiny.x, tiny.t, jax.random.key(3))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["conv_in"]["kernel"]).max() > 0
  assert np.abs(grads["temb_dense0"]["kernel"]).max() > 0


def test_remat_checkpoints_every_res_block_and_keeps_params(tiny):
  rematted = UNet(**TINY, remat=True)
  remat_shapes = jax.eval_shape(rematted.init, jax.random.key(1), tiny.x, tiny.t)["params"]
  assert jax.tree.structure(remat_shapes) == jax.tree.structure(tiny.params)
  args = (tiny.params, tiny.x, tiny.t, jax.random.key(3))
  grad_shapes = jax.eval_shape(train_grads, rematted, *args)
  assert jax.tree.structure(grad_shapes) == jax.tree.structure(tiny.params)

  def num_checkpoints(model: UNet) -> int:
    jaxpr = jax.make_jaxpr(train_loss, static_argnums=0)(model, *args)
    return str(jaxpr).count("remat")

  num_res_blocks = len(TINY["ch_mult"]) * (2 * TINY["num_res_blocks"] + 1) + 2
  assert num_checkpoints(rematted) == num_res_blocks
  assert num_checkpoints(tiny.model) == 0


def test_dropout_only_in_training(tiny):
  def run(train, seed):
    return apply(tiny.model, tiny.perturbed, tiny.x, tiny.t, train=train,
                 dropout_key=jax.random.key(seed))

  assert not np.allclose(run(True, 1), run(True, 2))
  np.testing.assert_array_equal(run(False, 1), run(False, 2))
  np.testing.assert_array_equal(run(False, 1), apply(tiny.model, tiny.perturbed, tiny.x, tiny.t))


def test_timestep_conditions_the_output(tiny):
  t = jnp.full_like(tiny.t, 10)
  out = apply(tiny.model, tiny.perturbed, tiny.x, t)
  assert not np.allclose(out, apply(tiny.model, tiny.perturbed, tiny.x, t + 1))
  # A scalar timestep is broadcast over the batch.
  np.testing.assert_array_equal(out, apply(tiny.model, tiny.perturbed, tiny.x, t[0]))


def test_class_label_conditions_the_output(tiny):
  num_classes = 5
  model = UNet(**TINY, num_classes=num_classes)
  x, t, y = tiny.x, tiny.t, jnp.zeros_like(tiny.t)
  shapes = jax.eval_shape(model.init, jax.random.key(1), x, t, y)["params"]
  assert set(shapes) == set(tiny.params) | {"class_embed"}
  table_shape = shapes["class_embed"]["embedding"].shape
  assert table_shape == (num_classes + 1, 4 * TINY["ch"])
  table = jax.random.normal(jax.random.key(5), table_shape)
  params = {**tiny.perturbed, "class_embed": {"embedding": table}}
  assert not np.allclose(apply(model, params, x, t, y), apply(model, params, x, t, y + 1))
  # y=None means "no label": the extra row num_classes of the embedding table.
  np.testing.assert_array_equal(apply(model, params, x, t),
                                apply(model, params, x, t, y + num_classes))


def test_bad_spatial_size_is_a_clear_error():
  model = UNet(**{**TINY, "ch_mult": (1, 2, 2)})
  x = jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with pytest.raises(ValueError, match=r"6x6.*ch_mult=\(1, 2, 2\)"):
    jax.eval_shape(model.init, jax.random.key(1), x, t)


def test_labels_for_unconditional_model_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match="num_classes=0"):
    apply(tiny.model, tiny.params, tiny.x, tiny.t, jnp.zeros_like(tiny.t))


def test_wrong_rank_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match="rank 4"):
    apply(tiny.model, tiny.params, tiny.x[0], tiny.t)


@pytest.mark.slow
def test_adam_fits_a_fixed_noise_target(tiny):
  model = UNet(**{**TINY, "dropout": 0.0})
  x, t = tiny.x, tiny.t
  target = jax.random.normal(jax.random.key(4), x.shape)
  optimizer = optax.adam(1e-3)

  def mse(params):
    return jnp.mean((model.apply({"params": params}, x, t) - target)**2)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(mse)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=150)
    return losses[0], mse(params)

  initial, final = map(float, fit(tiny.params))
  assert final < 0.1 * initial, (initial, final)
