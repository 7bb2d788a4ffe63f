"""Train state, optimizer and EMA math, the NaN guard, and 1-vs-N-device parity."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxdiff import denoiser as denoiser_lib, parallel, processes, schedules, train_step
from tests.helpers import tiny_config


def digits_batch(batch_size=32, index=0):
  """Batch `index` of real 8×8 digits scaled to [−1, 1], NHWC."""
  digits = load_digits()
  rows = slice(index * batch_size, (index + 1) * batch_size)
  images = digits.images[rows, :, :, None] / 16.0 * 2 - 1
  return {"image": jnp.float32(images), "label": jnp.int32(digits.target[rows])}


# A DiT small enough to compile fast, with tensors large enough to be split over fsdp.
TINY_DIT = dict(name="dit", patch_size=2, depth=2, width=64, num_heads=4)


@functools.cache
def compiled(mesh_shape=(1, 1), dtype="float32", dropout=0.1, grad_accum_steps=1,
             steps_per_call=1, network="unet"):
  """(config, fresh-state function, jitted train step, mesh) on a (data, fsdp) mesh of the first
  data × fsdp devices, compiled once per module; the U-Net has one resolution level and no
  attention, which halves the compile time and changes nothing the tests compare (`network`
  "dit": `TINY_DIT`)."""
  model = TINY_DIT if network == "dit" else dict(ch_mult=(1,), attn_resolutions=())
  config = tiny_config(dtype=dtype, dropout=dropout, **model)
  config.train.update(grad_accum_steps=grad_accum_steps, steps_per_call=steps_per_call)
  data, fsdp = mesh_shape
  mesh = parallel.make_mesh(jax.devices()[:data * fsdp],
                            ml_collections.ConfigDict({"data": data, "fsdp": fsdp}))
  denoiser = denoiser_lib.from_config(config)
  init = functools.partial(train_step.create_state, denoiser, config.train, mesh)
  return config, init, train_step.make_train_step(denoiser, config, mesh), mesh


def run_steps(mesh_shape, num_steps, batch, dtype="float32", network="unet"):
  _, init, step_fn, mesh = compiled(mesh_shape, dtype, network=network)
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
  with pytest.raises(ValueError, match="^lr_decay = 'step': unknown learning-rate decay"):
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
  state, history = run_steps((1, 1), 3, digits_batch(), dtype="bfloat16")
  for tree in (state.params, state.ema_params):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype("float32")}
  assert all(np.isfinite(h["loss"]) and h["finite"] for h in history)
  assert int(state.step) == 3
  # With EMA warm-up, decay at steps 0, 1, 2 is 1/10, 2/11, 3/12: the EMA moved off the init.
  assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])


@pytest.mark.parametrize("mesh_shape", [(4, 1), (2, 2), (1, 4)])
def test_every_mesh_shape_gives_the_losses_of_one_device(mesh_shape):
  batch = digits_batch()
  _, one = run_steps((1, 1), 10, batch)
  _, four = run_steps(mesh_shape, 10, batch)
  for a, b in zip(one, four):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(4, 1), (2, 2)])
def test_the_dit_gives_the_losses_of_one_device_on_every_mesh_shape(mesh_shape):
  """The second network trains data-parallel and FSDP-sharded as the U-Net does (the state's
  large tensors split over fsdp = 2)."""
  batch = digits_batch()
  _, one = run_steps((1, 1), 6, batch, network="dit")
  state, four = run_steps(mesh_shape, 6, batch, network="dit")
  if mesh_shape[1] > 1:
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
  for a, b in zip(one, four):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_gradient_accumulation_equals_the_whole_batch_and_needs_less_memory():
  """k = 4 micro-batches see the whole batch's t and noise, so three steps give the losses,
  loss-by-t sums and state of k = 1 (dropout off: its masks are drawn per micro-batch); the
  compiled step's temporary memory falls."""
  batch = digits_batch()
  histories, states, temp_bytes = {}, {}, {}
  for k in (1, 4):
    _, init, step_fn, mesh = compiled((2, 2), dropout=0.0, grad_accum_steps=k)
    state, sharded = init(jax.random.key(0)), jax.device_put(batch, parallel.batch_sharding(mesh))
    step = step_fn.lower(state, sharded).compile()
    temp_bytes[k] = step.memory_analysis().temp_size_in_bytes
    histories[k] = []
    for _ in range(3):
      state, metrics = step(state, sharded)
      histories[k].append(jax.device_get(metrics))
    states[k] = jax.device_get(state)
  for whole, accumulated in zip(histories[1], histories[4]):
    for name in ("loss", "grad_norm", "loss_bin_sum"):
      np.testing.assert_allclose(accumulated[name], whole[name], rtol=1e-5)
    np.testing.assert_array_equal(accumulated["loss_bin_count"], whole["loss_bin_count"])
  trained = lambda state: jax.tree.leaves((state.params, state.ema_params, state.opt_state))
  for whole, accumulated in zip(trained(states[1]), trained(states[4])):
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5, atol=1e-6)
  assert temp_bytes[4] < temp_bytes[1], temp_bytes


def test_several_steps_per_call_equal_single_calls():
  """Five steps in one scan give each step's metrics and the final state of five calls, to
  float32 rounding: XLA fuses the scan's body a little differently from the lone step (seen:
  values near 0 of the state differ by up to 3e-6 after five steps)."""
  batches = [digits_batch(index=i) for i in range(5)]
  _, init, single_step, mesh = compiled((2, 2))
  state, singles = init(jax.random.key(0)), []
  for batch in batches:
    state, metrics = single_step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    singles.append(jax.device_get(metrics))
  _, init, five_steps, _ = compiled((2, 2), steps_per_call=5)
  stacked = jax.device_put(jax.tree.map(lambda *x: jnp.stack(x), *batches),
                           parallel.stacked_batch_sharding(mesh))
  state_after_five, stacked_metrics = five_steps(init(jax.random.key(0)), stacked)
  stacked_metrics = jax.device_get(stacked_metrics)
  assert stacked_metrics["loss"].shape == (5,) and int(state_after_five.step) == 5
  for i, metrics in enumerate(singles):
    for name, value in metrics.items():
      np.testing.assert_allclose(stacked_metrics[name][i], value, rtol=1e-6, err_msg=name)
  trained = lambda state: jax.tree.leaves(
      jax.device_get((state.step, state.params, state.ema_params, state.opt_state)))
  for one_by_one, together in zip(trained(state), trained(state_after_five)):
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_non_finite_step_leaves_the_state_untouched():
  _, init, step_fn, mesh = compiled((2, 2))
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
  bins = processes.DDPM(schedules.linear(100)).time_bin(t, 10)
  result = train_step.loss_by_timestep(per_example, bins, 10)
  np.testing.assert_array_equal(result["loss_bin_count"], [3, 2, 0, 0, 0, 2, 0, 0, 0, 3])
  np.testing.assert_allclose(result["loss_bin_sum"], [0 + 1 + 9, 2 + 3, 0, 0, 0, 4 + 5, 0, 0, 0,
                                                      6 + 7 + 8])


@pytest.mark.parametrize("diffusion", [
    dict(prediction="v", rescale_zero_terminal_snr=True),
    dict(prediction="v", schedule="cosine", loss_weighting="min_snr"),
], ids=["v_zero_terminal_snr", "v_cosine_min_snr"])
def test_v_prediction_trains_at_zero_terminal_snr_and_on_the_cosine_schedule(diffusion):
  """The loss and its gradient are finite at t = 0 … T−1 (ᾱ_{T−1} = 0 under the rescale), and
  so is one step of make_train_step on real digits (a one-level U-Net: compiles fast)."""
  config = tiny_config(dropout=0.0, ch=8, ch_mult=(1,), attn_resolutions=())
  config.diffusion.update(diffusion)
  mesh = parallel.make_mesh(jax.devices()[:1], ml_collections.ConfigDict({"data": 1, "fsdp": 1}))
  denoiser = denoiser_lib.from_config(config)
  state = train_step.create_state(denoiser, config.train, mesh, jax.random.key(0))
  batch = digits_batch()
  num_timesteps = config.diffusion.num_timesteps
  draws = {"t": jnp.arange(32) * (num_timesteps - 1) // 31,
           "noise": jax.random.normal(jax.random.key(1), batch["image"].shape)}
  value_and_grad = jax.jit(jax.value_and_grad(
      train_step.make_loss_fn(denoiser, config.diffusion), has_aux=True))
  (loss, aux), grads = value_and_grad(state.params, batch, draws, jax.random.key(2))
  assert int(aux["t"][-1]) == num_timesteps - 1
  assert np.all(np.isfinite(aux["per_example_loss"])) and np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  step_fn = train_step.make_train_step(denoiser, config, mesh)
  state, metrics = step_fn(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  assert bool(metrics["finite"]) and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.slow
def test_loss_falls_on_real_digits():
  """A few hundred Adam steps on one batch of real digits drive L_simple well down."""
  _, history = run_steps((1, 1), 200, digits_batch())
  first, last = np.mean([h["loss"] for h in history[:10]]), np.mean([h["loss"] for h in history[-20:]])
  assert last < 0.35 * first, (first, last)
