"""Samplers with oracle denoisers whose ideal output is known in closed form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parallel, samplers, sampling, schedules
from oracles import gaussian_eps

SCHEDULE = schedules.linear(1000)
MEAN, STD = 0.3, 0.5


def run(name, num_steps=1000, spacing="uniform", apply_fn=None, key=0, shape=(4096, 2, 2, 1),
        **options):
  """`name` with the Gaussian oracle on `num_steps` respaced steps, jitted."""
  timesteps = samplers.spaced_timesteps(SCHEDULE, num_steps, spacing)
  apply_fn = apply_fn or gaussian_eps(SCHEDULE, MEAN, STD)
  options.setdefault("clip_x0", False)
  sample = jax.jit(functools.partial(samplers.SAMPLERS[name], apply_fn, shape=shape, **options))
  return sample(None, samplers.respace(SCHEDULE, timesteps), jax.random.key(key),
                timesteps=jnp.asarray(timesteps))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_lands_on_the_single_training_image(variance):
  """For data that is one fixed image, the ideal ε is exact and sampling returns that image."""
  image = jnp.linspace(-0.9, 0.9, 4 * 4 * 2).reshape(1, 4, 4, 2)
  samples = run("ddpm", apply_fn=gaussian_eps(SCHEDULE, image, 0.0), shape=(3, 4, 4, 2),
                variance=variance)
  np.testing.assert_allclose(samples, jnp.broadcast_to(image, samples.shape), atol=1e-4)


@pytest.mark.parametrize("name, num_steps, spacing", [
    ("ddim", 1000, "uniform"), ("ddim", 100, "logsnr"),
    ("dpm_solver", 10, "logsnr"), ("dpm_solver", 20, "logsnr")])
def test_samplers_reproduce_the_gaussian_data_distribution(name, num_steps, spacing):
  samples = run(name, num_steps, spacing)
  assert abs(float(samples.mean()) - MEAN) < 0.02
  assert abs(float(samples.std()) / STD - 1) < 0.04, float(samples.std())


def test_dpm_solver_needs_far_fewer_steps_than_ddpm():
  ddpm_error = abs(float(run("ddpm", 10, "uniform").std()) / STD - 1)
  dpm_error = abs(float(run("dpm_solver", 10, "logsnr").std()) / STD - 1)
  assert ddpm_error > 0.1 and dpm_error < 0.04 and dpm_error < ddpm_error / 4


def test_ddpm_reproduces_the_gaussian_with_either_variance():
  for variance in ("beta", "beta_tilde"):
    samples = run("ddpm", variance=variance)
    assert abs(float(samples.std()) / STD - 1) < 0.04


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_eps_x0_and_v_models_give_the_same_samples(name):
  outputs = [run(name, 20, "logsnr", shape=(64, 2, 2, 1),
                 apply_fn=gaussian_eps(SCHEDULE, MEAN, STD, prediction), prediction=prediction)
             for prediction in ("eps", "x0", "v")]
  np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-3)
  np.testing.assert_allclose(outputs[2], outputs[0], atol=2e-3)


def test_respace_matches_the_improved_ddpm_definition():
  timesteps = np.array([0, 3, 10, 500, 999])
  betas = np.float32(np.linspace(1e-4, 0.02, 1000)).astype(np.float64)
  alpha_bars = np.cumprod(1 - betas)
  kept = alpha_bars[timesteps]
  expected = 1 - kept / np.append(1.0, kept[:-1])
  respaced = samplers.respace(SCHEDULE, timesteps)
  np.testing.assert_allclose(respaced.betas, expected, rtol=1e-5)
  np.testing.assert_allclose(respaced.alpha_bars, kept, rtol=1e-5)
  with pytest.raises(ValueError, match="strictly increasing"):
    samplers.respace(SCHEDULE, [5, 3])


def test_respaced_ddpm_over_every_step_is_plain_ddpm():
  full = samplers.respace(SCHEDULE, np.arange(1000))
  np.testing.assert_array_equal(full.betas, SCHEDULE.betas)
  sample = jax.jit(functools.partial(samplers.ddpm, gaussian_eps(SCHEDULE, MEAN, STD),
                                     shape=(8, 2, 2, 1)))
  plain = sample(None, SCHEDULE, jax.random.key(2))
  respaced = sample(None, full, jax.random.key(2), timesteps=jnp.arange(1000))
  np.testing.assert_allclose(respaced, plain, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_given_x_T_and_eta_one_is_not():
  x_init = jax.random.normal(jax.random.key(9), (16, 2, 2, 1))
  a, b = (run("ddim", 20, key=k, shape=x_init.shape, x_init=x_init) for k in (0, 1))
  np.testing.assert_array_equal(a, b)
  c, d = (run("ddim", 20, key=k, shape=x_init.shape, x_init=x_init, eta=1.0) for k in (0, 1))
  assert not np.allclose(c, d)


def dpm_solver_reference(x_init, timesteps):
  """DPM-Solver++(2M) in float64 NumPy, written from Lu et al. (2022), Algorithm 2."""
  betas = np.float32(np.linspace(1e-4, 0.02, 1000)).astype(np.float64)
  alpha_bars = np.cumprod(1 - betas)
  x0_hat = lambda x, a: MEAN + np.sqrt(a) * STD**2 / (a * STD**2 + 1 - a) * (x - np.sqrt(a) * MEAN)
  lam = lambda a: 0.5 * np.log(a / (1 - a))
  x, previous = np.asarray(x_init, np.float64), None
  path = list(timesteps[::-1])
  for k, t in enumerate(path):
    a = alpha_bars[t]
    d = x0_hat(x, a)
    if k == len(path) - 1:
      return d
    a_next = alpha_bars[path[k + 1]]
    h = lam(a_next) - lam(a)
    if previous is None:
      data = d
    else:
      r = (lam(a) - previous[1]) / h
      data = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * previous[0]
    x = np.sqrt((1 - a_next) / (1 - a)) * x - np.sqrt(a_next) * np.expm1(-h) * data
    previous = (d, lam(a))


def test_dpm_solver_matches_a_float64_reference():
  x_init = jax.random.normal(jax.random.key(3), (32, 2, 2, 1))
  timesteps = samplers.spaced_timesteps(SCHEDULE, 12, "logsnr")
  expected = dpm_solver_reference(np.asarray(x_init), timesteps)
  actual = run("dpm_solver", 12, "logsnr", shape=x_init.shape, x_init=x_init)
  np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_trajectory_frames(name):
  x_init = jax.random.normal(jax.random.key(4), (2, 2, 2, 1))
  final, frames = run(name, 10, shape=x_init.shape, x_init=x_init, trajectory_every=4)
  assert frames.shape == (1 + 2 + 1, 2, 2, 2, 1)  # x_T, after 4 and 8 steps, after 10
  np.testing.assert_array_equal(frames[0], x_init)
  np.testing.assert_array_equal(frames[-1], final)
  np.testing.assert_allclose(final, run(name, 10, shape=x_init.shape, x_init=x_init), atol=1e-6)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_program_size_does_not_grow_with_the_number_of_steps(name):
  """The scan compiles one step: the program for 1000 steps is the program for 10."""

  def hlo_ops(num_steps):
    sample = jax.jit(functools.partial(samplers.SAMPLERS[name], gaussian_eps(SCHEDULE, 0.0, 1.0),
                                       shape=(2, 4, 4, 1)))
    respaced = samplers.respace(SCHEDULE, samplers.spaced_timesteps(SCHEDULE, num_steps))
    text = sample.lower(None, respaced, jax.random.key(0)).as_text()
    return len([line for line in text.splitlines() if "=" in line])

  assert hlo_ops(1000) == hlo_ops(10)


def test_spacings_and_their_errors():
  for spacing in samplers.SPACINGS:
    for num_steps in (1, 7, 50, 1000):
      steps = samplers.spaced_timesteps(SCHEDULE, num_steps, spacing)
      assert len(steps) == num_steps and np.all(np.diff(steps) > 0)
      assert steps[0] >= 0 and steps[-1] <= 999
  np.testing.assert_array_equal(samplers.spaced_timesteps(SCHEDULE, 4, "trailing"),
                                [249, 499, 749, 999])
  for bad in (0, 1001):
    with pytest.raises(ValueError, match="between 1 and T = 1000"):
      samplers.spaced_timesteps(SCHEDULE, bad)
  with pytest.raises(ValueError, match="unknown spacing 'cubic'"):
    samplers.spaced_timesteps(SCHEDULE, 10, "cubic")
  with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddim.*ddpm.*dpm_solver"):
    samplers.get_sampler("euler")


def class_oracle():
  """A class-conditional Gaussian oracle: class y has mean 0.2·y − 0.4, the null label 0."""
  return gaussian_eps(SCHEDULE, lambda y: jnp.where(y == 5, 0.0, 0.2 * y - 0.4), STD)


def test_guidance_zero_is_exactly_the_conditional_model():
  cond = class_oracle()
  labels = jnp.arange(8) % 5
  x_init = jax.random.normal(jax.random.key(5), (8, 2, 2, 1))
  plain = run("ddim", 20, shape=x_init.shape, x_init=x_init,
              apply_fn=lambda v, x, t: cond(v, x, t, labels))
  unguided = run("ddim", 20, shape=x_init.shape, x_init=x_init,
                 apply_fn=samplers.guided(cond, labels, 5, 0.0))
  guided = run("ddim", 20, shape=x_init.shape, x_init=x_init,
               apply_fn=samplers.guided(cond, labels, 5, 2.0))
  np.testing.assert_array_equal(unguided, plain)
  assert not np.allclose(guided, plain)


def test_guidance_pushes_samples_away_from_the_unconditional_mean():
  labels = jnp.full((2048,), 4)  # class mean 0.4, null mean 0.0
  samples = run("ddim", 50, "logsnr", shape=(2048, 2, 2, 1),
                apply_fn=samplers.guided(class_oracle(), labels, 5, 1.0))
  assert float(samples.mean()) > 0.5


def test_generate_is_the_same_on_one_and_eight_devices_and_cuts_the_last_batch():
  common = dict(num_samples=20, image_shape=(2, 2, 1), batch_size=8, sampler="ddim",
                num_steps=10, progress=False)
  apply_fn = gaussian_eps(SCHEDULE, MEAN, STD)
  one = sampling.generate(apply_fn, None, SCHEDULE, jax.random.key(6),
                          mesh=parallel.make_mesh(jax.devices()[:1]), **common)
  eight = sampling.generate(apply_fn, None, SCHEDULE, jax.random.key(6),
                            mesh=parallel.make_mesh(jax.devices()[:8]), **common)
  assert one["images"].shape == (20, 2, 2, 1) and one["labels"] is None
  np.testing.assert_allclose(eight["images"], one["images"], atol=1e-6)


def test_generate_with_labels_guidance_and_trajectory():
  result = sampling.generate(
      class_oracle(), None, SCHEDULE, jax.random.key(7), num_samples=6, image_shape=(2, 2, 1),
      batch_size=8, sampler="dpm_solver", num_steps=10, num_classes=5, guidance_scale=1.0,
      trajectory_every=5, progress=False)
  np.testing.assert_array_equal(result["labels"], [0, 1, 2, 3, 4, 0])
  assert result["trajectory"].shape == (3, 6, 2, 2, 1)
  np.testing.assert_array_equal(result["trajectory"][-1], result["images"])


def test_generate_rejects_bad_requests():
  common = dict(num_samples=4, image_shape=(2, 2, 1), batch_size=8, progress=False)
  with pytest.raises(ValueError, match="unconditional"):
    sampling.generate(gaussian_eps(SCHEDULE, 0, 1), None, SCHEDULE, jax.random.key(0),
                      guidance_scale=2.0, **common)
  with pytest.raises(ValueError, match=r"class labels must be in \[0, 5\)"):
    sampling.generate(class_oracle(), None, SCHEDULE, jax.random.key(0), labels=7,
                      num_classes=5, **common)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sampling.generate(gaussian_eps(SCHEDULE, 0, 1), None, SCHEDULE, jax.random.key(0),
                      **{**common, "batch_size": 6})
