"""Noise processes (DDPM, EDM, flow matching) against the papers' formulas in float64, and the
ODE samplers on each against an independent NumPy integration of the exact denoiser."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import errors, losses, processes, samplers, schedules
from tests import oracles

MEAN, STD = 0.3, 0.5
PROCESSES = {
    "ddpm_eps": processes.DDPM(schedules.linear(1000), "eps"),
    "ddpm_v": processes.DDPM(schedules.cosine(1000), "v"),
    "edm": processes.EDM(),
    "flow": processes.Flow(),
}


def _times(process, num):
  """`num` training times of `process`, float32 (int32 steps for DDPM)."""
  return process.sample_time(jax.random.key(1), num)


def _alpha_sigma_from_the_papers(process, t):
  """(α, σ) in float64: DDPM √ᾱ_t, √(1 − ᾱ_t) from the betas; EDM (1, σ); flow (1 − t, t)."""
  t = np.asarray(t, np.float64)
  if process.name == "ddpm":
    alpha_bars = np.cumprod(1 - np.asarray(process.schedule.betas, np.float64))
    return np.sqrt(alpha_bars[t.astype(int)]), np.sqrt(1 - alpha_bars[t.astype(int)])
  if process.name == "edm":
    return np.ones_like(t), t
  return 1 - t, t


@pytest.mark.parametrize("name", PROCESSES)
def test_forward_process_is_alpha_x0_plus_sigma_noise(name):
  process = PROCESSES[name]
  t = _times(process, 64)
  x0, noise = jax.random.normal(jax.random.key(2), (2, 64, 3, 3, 1))
  alpha, sigma = _alpha_sigma_from_the_papers(process, t)
  expected = (alpha[:, None, None, None] * np.asarray(x0, np.float64)
              + sigma[:, None, None, None] * np.asarray(noise, np.float64))
  np.testing.assert_allclose(process.q_sample(x0, t, noise), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", PROCESSES)
def test_the_training_target_means_the_true_noise_and_image(name):
  """eps_and_x0(x_t, t, F_target(x0, ε)) = (ε, x0): the target and its reading agree."""
  process = PROCESSES[name]
  t = _times(process, 64)
  if process.name == "ddpm":  # ε is lost where ᾱ_t = 1 − β_0 ≈ 1 to float32: keep t ≥ 10
    t = jnp.maximum(t, 10)
  x0, noise = jax.random.normal(jax.random.key(3), (2, 64, 3, 3, 1))
  x_t = process.q_sample(x0, t, noise)
  eps, x0_read = process.eps_and_x0(x_t, t, process.training_target(x0, noise, x_t, t))
  np.testing.assert_allclose(x0_read, x0, atol=2e-4)
  np.testing.assert_allclose(eps, noise, atol=2e-3)


def test_edm_preconditioning_is_table_1_and_its_weighted_loss_is_the_plain_loss_on_f():
  """c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise =
  ¼ ln σ; and λ(σ)‖D − x0‖², λ = (σ² + σ_d²)/(σσ_d)², is the loss on F (Karras et al. 2022)."""
  process = processes.EDM(sigma_data=0.6)
  sigma = np.geomspace(0.002, 80.0, 9)
  norm = np.sqrt(sigma**2 + 0.36)
  for got, expected in zip(process.preconditioning(jnp.asarray(sigma, jnp.float32)),
                           (0.36 / norm**2, sigma * 0.6 / norm, 1 / norm, np.log(sigma) / 4)):
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  keys = jax.random.split(jax.random.key(4), 3)
  x0, noise, output = (jax.random.normal(key, (9, 4, 4, 1)) for key in keys)
  draws = {"t": jnp.asarray(sigma, jnp.float32), "noise": noise}
  loss, _ = losses.loss_from_draws(lambda params, x, t, y, key: output, None, process,
                                   {"image": x0}, draws, None)
  x_t = np.asarray(x0, np.float64) + sigma[:, None, None, None] * np.asarray(noise, np.float64)
  c_skip, c_out = 0.36 / norm**2, sigma * 0.6 / norm
  denoised = (c_skip[:, None, None, None] * x_t
              + c_out[:, None, None, None] * np.asarray(output, np.float64))
  weight = (sigma**2 + 0.36) / (sigma * 0.6) ** 2
  expected = np.mean(weight * np.mean((denoised - np.asarray(x0, np.float64)) ** 2, (1, 2, 3)))
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_flow_loss_is_the_squared_velocity_error():
  process = processes.Flow(time_distribution="uniform")
  keys = jax.random.split(jax.random.key(5), 3)
  x0, noise, output = (jax.random.normal(key, (16, 4, 4, 1)) for key in keys)
  draws = {"t": jnp.linspace(0.0, 1.0, 16), "noise": noise}
  loss, _ = losses.loss_from_draws(lambda params, x, t, y, key: output, None, process,
                                   {"image": x0}, draws, None)
  expected = np.mean((np.asarray(output, np.float64) - (np.asarray(noise, np.float64)
                                                        - np.asarray(x0, np.float64))) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_training_times_follow_each_papers_distribution():
  """EDM: ln σ ~ N(P_mean, P_std²); flow: logit t ~ N(m, s²) or t ~ U(0, 1)."""
  num = 200_000
  log_sigma = np.log(np.asarray(processes.EDM(p_mean=-1.0, p_std=1.4).sample_time(
      jax.random.key(6), num), np.float64))
  assert abs(log_sigma.mean() + 1.0) < 0.02 and abs(log_sigma.std() - 1.4) < 0.02
  t = np.asarray(processes.Flow(logit_mean=0.5, logit_std=0.8).sample_time(
      jax.random.key(7), num), np.float64)
  logit = np.log(t / (1 - t))
  assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01
  t = np.asarray(processes.Flow(time_distribution="uniform").sample_time(jax.random.key(8), num))
  assert np.all((t >= 0) & (t < 1)) and abs(t.mean() - 0.5) < 0.005
  assert abs(np.mean(t < 0.25) - 0.25) < 0.005


def test_edm_karras_grid_is_equation_5_and_its_vp_chain_is_one_over_one_plus_sigma_squared():
  process = processes.EDM(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  grid = process.sampling_grid(18, "karras")
  i = np.arange(18)[::-1]  # EDM's σ_0 = σ_max … σ_17 = σ_min; the grid increases
  sigmas = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(grid.timesteps, sigmas, rtol=1e-6)
  np.testing.assert_allclose(grid.schedule.alpha_bars, 1 / (1 + sigmas**2), rtol=1e-6)
  np.testing.assert_allclose(grid.scales, np.sqrt(1 + sigmas**2), rtol=1e-6)
  # σ back from ᾱ: float32 ᾱ = 1/(1 + σ²) holds σ to 1e-4 where σ ≥ 0.05 (σ_min: 1%)
  wide = sigmas >= 0.05
  np.testing.assert_allclose(process.time_at(grid.schedule.alpha_bars)[wide], sigmas[wide],
                             rtol=1e-4)


def test_flow_uniform_grid_ends_at_pure_noise_and_maps_back_to_its_times():
  process = processes.Flow(t_min=0.01)
  grid = process.sampling_grid(10, "uniform")
  times = np.linspace(0.01, 1.0, 10)
  np.testing.assert_allclose(grid.timesteps, times, rtol=1e-6)
  np.testing.assert_allclose(grid.schedule.alpha_bars,
                             (1 - times) ** 2 / ((1 - times) ** 2 + times**2), atol=1e-7)
  assert float(grid.schedule.alpha_bars[-1]) == 0.0  # zero terminal SNR: x_T is noise alone
  np.testing.assert_allclose(process.time_at(grid.schedule.alpha_bars), times, atol=1e-5)


def _exact_denoiser(x, alpha, sigma):
  """E[x0 | x_t = x] for x0 ~ N(MEAN, STD²), x_t = α x0 + σ ε, float64."""
  return MEAN + alpha * STD**2 * (x - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2)


def _numpy_ode_solution(process, times, x_T, heun: bool):
  """EDM's Algorithm 1 (Heun; or Euler alone) from x_T at times[-1] down to t = 0 in the
  process's own variables, float64: dx/dt = (x − x̂0(x; t))/t, which is EDM's (x − D(x; σ))/σ
  at t = σ and the flow's velocity v = ε̂ − x̂0 at α = 1 − t."""
  alpha = (lambda t: 1.0) if process.name == "edm" else (lambda t: 1 - t)
  slope = lambda x, t: (x - _exact_denoiser(x, alpha(t), t)) / t
  times = np.append(np.asarray(times, np.float64)[::-1], 0.0)
  x = np.asarray(x_T, np.float64)
  for t, t_next in zip(times[:-1], times[1:]):
    d = slope(x, t)
    x_next = x + (t_next - t) * d
    if heun and t_next > 0:
      x_next = x + (t_next - t) * 0.5 * (d + slope(x_next, t_next))
    x = x_next
  return x


def _sample(process, options, x_T):
  """jaxdiff's samples from x_T (in the process's own variable at the grid's last time) with
  the exact denoiser, and the grid."""
  options = options.resolved(process)
  grid = process.sampling_grid(options.num_steps, options.spacing)
  denoiser = oracles.gaussian_process_denoiser(process, MEAN, STD, image_shape=x_T.shape[1:])
  x_init = jnp.asarray(x_T / np.asarray(grid.scales, np.float64)[-1], jnp.float32)
  options = dataclasses.replace(options, batch_size=x_T.shape[0])
  return np.asarray(samplers.sample(denoiser, None, jax.random.key(0), options,
                                    x_init=x_init).images, np.float64), grid


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("name, spacing, num_steps", [("edm", "karras", 18), ("edm", "logsnr", 7),
                                                      ("flow", "uniform", 12),
                                                      ("flow", "karras", 9)])
def test_ode_samplers_are_edm_algorithm_1_in_the_process_variables(sampler, name, spacing,
                                                                   num_steps):
  process = PROCESSES[name]
  options = samplers.SamplingOptions(sampler=sampler, num_steps=num_steps, spacing=spacing)
  grid = process.sampling_grid(num_steps, spacing)
  x_T = float(grid.timesteps[-1]) * np.linspace(-2.5, 2.5, 8).reshape(8, 1, 1, 1)
  if name == "flow":  # pure noise at t = 1
    x_T = x_T / float(grid.timesteps[-1])
  images, grid = _sample(process, options, x_T)
  expected = _numpy_ode_solution(process, np.asarray(grid.timesteps, np.float64), x_T,
                                 heun=sampler == "heun")
  np.testing.assert_allclose(images, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PROCESSES)
def test_heun_converges_at_second_order_and_euler_at_first_on_every_process(name):
  """The RMS distance to the exact ODE end (`oracles.sampling_errors`) falls ~4× (Heun) and
  ~2× (Euler) when the steps double."""
  denoiser = oracles.gaussian_process_denoiser(PROCESSES[name], MEAN, STD)
  ratios = {}
  for sampler in ("euler", "heun"):
    coarse, fine = (oracles.sampling_errors(
        denoiser, samplers.SamplingOptions(sampler=sampler, num_steps=k, clip_x0=False),
        MEAN, STD)[1] for k in (16, 32))
    ratios[sampler] = coarse / fine
  assert 1.6 < ratios["euler"] < 2.6, ratios
  assert 3.0 < ratios["heun"] < 5.5, ratios


def test_edm_stochastic_without_churn_is_heun_and_with_churn_keeps_the_data_distribution():
  process = PROCESSES["edm"]
  x_T = 80.0 * np.asarray(jax.random.normal(jax.random.key(9), (4096, 1, 1, 1)), np.float64)
  heun, _ = _sample(process, samplers.SamplingOptions(sampler="heun", num_steps=18), x_T)
  plain, _ = _sample(process, samplers.SamplingOptions(sampler="edm_stochastic", num_steps=18),
                     x_T)
  np.testing.assert_allclose(plain, heun, rtol=1e-5, atol=1e-5)
  churned, _ = _sample(process, samplers.SamplingOptions(
      sampler="edm_stochastic", num_steps=32, s_churn=40.0, s_tmin=0.05, s_tmax=50.0), x_T)
  assert np.abs(churned - heun).mean() > 0.2  # the churn's noise changed the paths …
  assert abs(churned.mean() - MEAN) < 0.02 and abs(churned.std() - STD) < 0.03  # … not the law


def test_process_from_config_and_what_a_checkpoint_fixes():
  config = ml_collections.ConfigDict({"process": "edm", "sigma_data": 0.6, "sigma_max": 40.0})
  process = processes.from_config(config)
  assert (process.name, process.sigma_data, process.sigma_max, process.rho) == ("edm", 0.6, 40.0,
                                                                                7.0)
  assert processes.fixed_fields(config) == ["process", "sigma_data"]
  flow = processes.from_config(ml_collections.ConfigDict({"process": "flow", "t_min": 0.01}))
  assert (flow.name, flow.t_min, flow.time_distribution) == ("flow", 0.01, "logit_normal")
  with pytest.raises(errors.ArgumentError, match="process"):
    processes.from_config(ml_collections.ConfigDict({"process": "vdm"}))
  with pytest.raises(errors.ArgumentError, match="sigma_min"):
    processes.EDM(sigma_min=1.0, sigma_max=0.5)
  with pytest.raises(errors.ArgumentError, match="spacing"):
    processes.EDM().sampling_grid(10, "trailing")


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_euler_is_ddim_on_the_equivalent_vp_process(name):
  """x_{t'} = x_t + (t' − t) v̂ on the flow (dx/dσ = ε̂ on EDM) is DDIM with η = 0 on the VP
  chain of the same grid: both keep x̂0 and ε̂ and move ᾱ."""
  process = PROCESSES[name]
  x_T = np.linspace(-2.0, 2.0, 8).reshape(8, 1, 1, 1) * (1.0 if name == "flow" else 80.0)
  euler, _ = _sample(process, samplers.SamplingOptions(sampler="euler", num_steps=10), x_T)
  ddim, _ = _sample(process, samplers.SamplingOptions(sampler="ddim", num_steps=10,
                                                      spacing=process.spacings[0],
                                                      clip_x0=False), x_T)
  np.testing.assert_allclose(euler, ddim, rtol=1e-4, atol=1e-4)
