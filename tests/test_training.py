"""Train state, optimizer and EMA math, the NaN guard, and 1-vs-N-device parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import default
from jaxdiff import parallel, schedules, train_step


def tiny_config(**model):
  config = default.get_config()
  config.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                      dropout=0.1, **model)
  config.diffusion.num_timesteps = 100
  config.train.update(batch_size=32, learning_rate=2e-3, warmup_steps=10, num_steps=200,
                      eval_every=0)
  return config


def digits_batch(batch_size=32):
  """Real 8×8 digits scaled to [−1, 1], NHWC."""
  digits = load_digits()
  images = digits.images[:batch_size, :, :, None] / 16.0 * 2 - 1
  return {"image": jnp.float32(images), "label": jnp.int32(digits.target[:batch_size])}


@functools.cache
def compiled(num_devices: int, dtype: str = "float32"):
  """(config, fresh-state function, jitted train step, mesh), compiled once per module."""
  config = tiny_config(dtype=dtype)
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  model = train_step.create_model(config)
  schedule = schedules.from_config(config.diffusion)
  init = jax.jit(functools.partial(train_step.init_state, config, model),
                 out_shardings=parallel.replicated(mesh))
  return config, init, train_step.make_train_step(model, schedule, config, mesh), mesh


def run_steps(num_devices, num_steps, batch, dtype="float32"):
  _, init, step_fn, mesh = compiled(num_devices, dtype)
  state = init(jax.random.key(0))
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  history = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def test_warmup_then_cosine_learning_rate():
  config = tiny_config().train
  config.update(learning_rate=1e-3, warmup_steps=100, num_steps=1100, lr_decay="cosine")
  lr = train_step.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(lr(600), 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
  np.testing.assert_allclose(lr(1100), 0.0, atol=1e-9)
  config.lr_decay = "constant"
  np.testing.assert_allclose(train_step.learning_rate_schedule(config)(5000), 1e-3)
  config.lr_decay = "step"
  with pytest.raises(ValueError, match="unknown lr_decay 'step'"):
    train_step.learning_rate_schedule(config)


def test_ema_update_and_decay_warmup():
  ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
  np.testing.assert_allclose(train_step.ema_update(ema, params, 0.9)["w"],
                             0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([3.0, -2.0]), rtol=1e-6)
  np.testing.assert_allclose(train_step.ema_decay_at(0, 0.9999, True), 1 / 10)
  np.testing.assert_allclose(train_step.ema_decay_at(90, 0.9999, True), 91 / 100)
  np.testing.assert_allclose(train_step.ema_decay_at(10**6, 0.9999, True), 0.9999)
  np.testing.assert_allclose(train_step.ema_decay_at(0, 0.9999, False), 0.9999)


def test_state_is_float32_and_ema_follows_params():
  state, history = run_steps(1, 3, digits_batch(), dtype="bfloat16")
  for tree in (state.params, state.ema_params):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype("float32")}
  assert all(np.isfinite(h["loss"]) and h["finite"] for h in history)
  assert int(state.step) == 3
  # With EMA warm-up, decay at steps 0, 1, 2 is 1/10, 2/11, 3/12: the EMA moved off the init.
  assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])


def test_one_and_four_devices_give_the_same_losses():
  batch = digits_batch()
  _, one = run_steps(1, 4, batch)
  _, four = run_steps(4, 4, batch)
  for a, b in zip(one, four):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-3)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3)


def test_non_finite_step_leaves_the_state_untouched():
  _, init, step_fn, mesh = compiled(4)
  state = init(jax.random.key(0))
  before = jax.device_get(state)
  batch = digits_batch()
  batch["image"] = batch["image"].at[3, 2, 2, 0].set(jnp.nan)
  state, metrics = step_fn(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  assert not bool(metrics["finite"])
  assert int(state.step) == 1
  after = jax.device_get(state)
  for name in ("params", "ema_params", "opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
      np.testing.assert_array_equal(x, y)


def test_loss_by_timestep_bins_cover_every_example():
  per_example = jnp.arange(10.0)
  t = jnp.array([0, 9, 10, 19, 50, 55, 90, 99, 99, 0])
  result = train_step.loss_by_timestep(per_example, t, 100, 10)
  np.testing.assert_array_equal(result["loss_bin_count"], [3, 2, 0, 0, 0, 2, 0, 0, 0, 3])
  np.testing.assert_allclose(result["loss_bin_sum"], [0 + 1 + 9, 2 + 3, 0, 0, 0, 4 + 5, 0, 0, 0,
                                                      6 + 7 + 8])


@pytest.mark.slow
def test_loss_falls_on_real_digits():
  """A few hundred Adam steps on one batch of real digits drive L_simple well down."""
  _, history = run_steps(1, 200, digits_batch())
  first, last = np.mean([h["loss"] for h in history[:10]]), np.mean([h["loss"] for h in history[-20:]])
  assert last < 0.35 * first, (first, last)
