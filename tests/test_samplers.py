"""Samplers with oracle denoisers whose ideal output is known in closed form."""

import dataclasses
import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from configs import default, mnist5k_cpu
from jaxdiff import errors, generate, parallel, processes, samplers, schedules
from jaxdiff.denoiser import Denoiser
from jaxdiff.models import UNet
from tests import oracles
from tests.oracles import gaussian_flow_map, gaussian_network

SCHEDULE = schedules.linear(1000)
MEAN, STD = 0.3, 0.5


OPTION_NAMES = {field.name for field in dataclasses.fields(samplers.SamplingOptions)}
# The samplers defined on DDPM's chain (edm_stochastic is EDM's: tests/test_processes.py).
DDPM_SAMPLERS = sorted(name for name, registered in samplers.SAMPLERS.items()
                       if registered.processes is None or "ddpm" in registered.processes)


def run(name, num_steps=1000, spacing=None, network=None, key=0, shape=(4096, 2, 2, 1),
        schedule=SCHEDULE, prediction="eps", labels=None, trajectory_every=None, x_init=None,
        **keywords):
  """Sampler `name` jitted on a batch of `shape` from `network` (default: the Gaussian oracle),
  with no clipping by default: `Samples(images, trajectory)`. `keywords` are `SamplingOptions`
  fields, or keywords of the sampler's factory that the options do not carry (`order`,
  `lower_order_final`: then `samplers.run` on the options' grid, else `samplers.sample`)."""
  denoiser = oracles.denoiser(network or gaussian_network(schedule, MEAN, STD), schedule,
                              shape[1:], prediction)
  options = samplers.SamplingOptions(
      sampler=name, num_steps=num_steps, spacing=spacing, batch_size=shape[0],
      **{"clip_x0": False, **{k: v for k, v in keywords.items() if k in OPTION_NAMES}})
  factory_keywords = {k: v for k, v in keywords.items() if k not in OPTION_NAMES}
  common = dict(labels=labels, trajectory_every=trajectory_every, x_init=x_init)
  if factory_keywords:
    options = options.resolved(denoiser.process)
    grid = denoiser.process.sampling_grid(options.num_steps, options.spacing)
    sampler = samplers.SAMPLERS[name].make(**factory_keywords)
    sample = lambda k: samplers.run(sampler, denoiser, None, grid, k, options, **common)
  else:
    sample = lambda k: samplers.sample(denoiser, None, k, options, **common)
  return jax.jit(sample)(jax.random.key(key))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_lands_on_the_single_training_image(variance):
  """For data that is one fixed image, the ideal ε is exact and sampling returns that image."""
  image = jnp.linspace(-0.9, 0.9, 4 * 4 * 2).reshape(1, 4, 4, 2)
  samples = run("ddpm", network=gaussian_network(SCHEDULE, image, 0.0), shape=(3, 4, 4, 2),
                variance=variance).images
  np.testing.assert_allclose(samples, jnp.broadcast_to(image, samples.shape), atol=1e-4)


@pytest.mark.parametrize("name, num_steps, spacing, options", [
    ("ddpm", 1000, "uniform", {"variance": "beta"}),
    ("ddpm", 1000, "uniform", {"variance": "beta_tilde"}),
    ("ddim", 1000, "uniform", {}), ("ddim", 50, "quadratic", {}),
    ("dpm_solver", 10, "logsnr", {}), ("dpm_solver", 20, "logsnr", {}),
    ("dpm_solver_3m", 20, "logsnr", {}), ("dpm_solver_sde", 20, "logsnr", {})])
def test_samplers_reproduce_the_gaussian_data_distribution(name, num_steps, spacing, options):
  samples = run(name, num_steps, spacing, **options).images
  assert abs(float(samples.mean()) - MEAN) < 0.02
  assert abs(float(samples.std()) / STD - 1) < 0.04, float(samples.std())


def test_ddpm_needs_the_full_chain_where_dpm_solver_needs_ten_steps():
  ddpm_error = abs(float(run("ddpm", 10, "uniform").images.std()) / STD - 1)
  dpm_error = abs(float(run("dpm_solver", 10, "logsnr").images.std()) / STD - 1)
  assert ddpm_error > 0.1 and dpm_error < 0.04 and dpm_error < ddpm_error / 4


def flow_rms_error(name, num_steps, spacing, **options):
  """RMS distance, sample by sample from the same x_T, between `name` at `num_steps` and the
  exact probability-flow ODE solution (ending with the denoiser at the first kept timestep)."""
  x_init = jax.random.normal(jax.random.key(8), (1024, 2, 2, 1))
  first_timestep = schedules.spaced_timesteps(SCHEDULE, num_steps, spacing)[0]
  exact = gaussian_flow_map(SCHEDULE, MEAN, STD, x_init, first_timestep)
  samples = run(name, num_steps, spacing, shape=x_init.shape, x_init=x_init, **options).images
  return float(np.sqrt(np.mean((np.asarray(samples, np.float64) - exact)**2)))


@pytest.mark.parametrize("name, num_steps, spacing, max_rms", [
    ("ddim", 1000, "uniform", 0.003), ("ddim", 50, "quadratic", 0.03),
    ("dpm_solver", 10, "logsnr", 0.015), ("dpm_solver", 20, "logsnr", 0.015),
    ("dpm_solver_3m", 20, "logsnr", 0.003)])
def test_deterministic_samplers_follow_the_probability_flow_ode(name, num_steps, spacing,
                                                                max_rms):
  """Against the exact ODE solution; DDIM at 10 steps is ten times further off than
  DPM-Solver++ at 10."""
  error = flow_rms_error(name, num_steps, spacing)
  assert error < max_rms
  if name == "dpm_solver" and num_steps == 10:
    assert flow_rms_error("ddim", 10, "logsnr") > 10 * error


def test_dpm_solver_3m_converges_at_third_order_where_2m_does_at_second():
  """From 20 to 40 steps the 2M error falls about 4× (second order) and the 3M error more than
  2³ = 8×; 3M is 3× closer than 2M at 20 steps and 10× at 40. (At 10 logsnr steps, h ≈ 1, 2M
  is the closer of the two on this data.)"""
  errors_2m = [flow_rms_error("dpm_solver", k, "logsnr") for k in (20, 40)]
  errors_3m = [flow_rms_error("dpm_solver_3m", k, "logsnr") for k in (20, 40)]
  assert 3 < errors_2m[0] / errors_2m[1] < 5
  assert errors_3m[0] / errors_3m[1] > 8
  assert errors_3m[0] < errors_2m[0] / 3 and errors_3m[1] < errors_2m[1] / 10


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_eps_x0_and_v_models_give_the_same_samples(name):
  outputs = [run(name, 20, "logsnr", shape=(64, 2, 2, 1),
                 network=gaussian_network(SCHEDULE, MEAN, STD, prediction),
                 prediction=prediction).images
             for prediction in ("eps", "x0", "v")]
  np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-3)
  np.testing.assert_allclose(outputs[2], outputs[0], atol=2e-3)


def test_respace_matches_the_improved_ddpm_definition():
  timesteps = np.array([0, 3, 10, 500, 999])
  betas = np.float32(np.linspace(1e-4, 0.02, 1000)).astype(np.float64)
  alpha_bars = np.cumprod(1 - betas)
  kept = alpha_bars[timesteps]
  expected = 1 - kept / np.append(1.0, kept[:-1])
  respaced = schedules.respace(SCHEDULE, timesteps)
  np.testing.assert_allclose(respaced.betas, expected, rtol=1e-5)
  np.testing.assert_allclose(respaced.alpha_bars, kept, rtol=1e-5)
  with pytest.raises(ValueError, match="strictly increasing"):
    schedules.respace(SCHEDULE, [5, 3])


def test_respaced_ddpm_over_every_step_is_plain_ddpm():
  full = schedules.respace(SCHEDULE, np.arange(1000))
  np.testing.assert_array_equal(full.betas, SCHEDULE.betas)
  options = samplers.SamplingOptions(sampler="ddpm", clip_x0=False, batch_size=8)
  sample = jax.jit(functools.partial(samplers.run, samplers.ddpm(),
                                     oracles.gaussian_denoiser(SCHEDULE, MEAN, STD), None,
                                     options=options))
  plain = sample(samplers.Grid(SCHEDULE, jnp.arange(1000)), jax.random.key(2)).images
  respaced = sample(samplers.Grid(full, jnp.arange(1000)), jax.random.key(2)).images
  np.testing.assert_allclose(respaced, plain, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_given_x_T_and_eta_one_is_ddpm():
  x_init = jax.random.normal(jax.random.key(9), (16, 2, 2, 1))
  ddim = lambda key, eta: run("ddim", 20, key=key, shape=x_init.shape, eta=eta,
                             x_init=x_init).images
  a, b = (ddim(k, 0.0) for k in (0, 1))
  np.testing.assert_array_equal(a, b)
  c, d = (ddim(k, 1.0) for k in (0, 1))
  assert not np.allclose(c, d)
  ddpm = run("ddpm", 20, "uniform", key=1, shape=x_init.shape, x_init=x_init,
             variance="beta_tilde").images
  np.testing.assert_allclose(d, ddpm, atol=1e-5)


def dpm_solver_reference(x_init, timesteps, lower_order_final, eta=0.0, noises=None):
  """DPM-Solver++(2M) in float64 NumPy, written from Lu et al. (2022), Algorithm 2; with
  η > 0 the 2M SDE (Lu et al. 2022, App. B; k-diffusion's dpmpp_2m_sde), noises[k] the z of
  the k-th step."""
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
    if previous is None or (lower_order_final and k == len(path) - 2):
      data = d
    else:
      r = (lam(a) - previous[1]) / h
      data = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * previous[0]
    x = (np.sqrt((1 - a_next) / (1 - a)) * np.exp(-eta * h) * x
         + np.sqrt(a_next) * (1 - np.exp(-(1 + eta) * h)) * data)
    if eta:
      x = x + np.sqrt(1 - a_next) * np.sqrt(1 - np.exp(-2 * eta * h)) * noises[k]
    previous = (d, lam(a))


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_matches_a_float64_reference(lower_order_final):
  x_init = jax.random.normal(jax.random.key(3), (32, 2, 2, 1))
  timesteps = schedules.spaced_timesteps(SCHEDULE, 12, "logsnr")
  expected = dpm_solver_reference(np.asarray(x_init), timesteps, lower_order_final)
  actual = run("dpm_solver", 12, "logsnr", shape=x_init.shape, x_init=x_init,
               lower_order_final=lower_order_final).images
  np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("num_steps", [8, 20])
def test_dpm_solver_sde_matches_a_float64_reference_with_the_same_noise(num_steps):
  """`run` draws step k's noise (k = 0 … K−1, from x_T on) with key k of split(second half of
  split(key), K)."""
  x_init = jax.random.normal(jax.random.key(3), (32, 2, 2, 1))
  timesteps = schedules.spaced_timesteps(SCHEDULE, num_steps, "logsnr")
  step_keys = jax.random.split(jax.random.split(jax.random.key(15))[1], num_steps)
  noises = [np.asarray(jax.random.normal(k, x_init.shape), np.float64) for k in step_keys]
  # The reference's lower_order_final has no 15-step limit: pass it only where it applies.
  expected = dpm_solver_reference(np.asarray(x_init), timesteps, num_steps < 15, eta=1.0,
                                  noises=noises)
  actual = run("dpm_solver_sde", num_steps, "logsnr", key=15, shape=x_init.shape,
               x_init=x_init).images
  np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)
  ode = run("dpm_solver", num_steps, "logsnr", key=15, shape=x_init.shape, x_init=x_init).images
  assert np.abs(np.asarray(actual) - np.asarray(ode)).mean() > 0.05


def dpm_solver_3m_reference(x_init, timesteps, lower_order_final):
  """DPM-Solver++(3M) in float64 NumPy, as an exponential integrator: a third-order step is
  x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ p(λ) dλ with p the quadratic through the last
  three (λ, x̂0), integrated by Gauss–Legendre quadrature; a first-order step takes p = x̂0_s,
  a second-order step is 2M's. Orders as in diffusers' `DPMSolverMultistepScheduler`: capped
  by how many x̂0 there are and, with `lower_order_final` and fewer than 15 steps, by the
  steps left."""
  betas = np.float32(np.linspace(1e-4, 0.02, 1000)).astype(np.float64)
  alpha_bars = np.cumprod(1 - betas)
  x0_hat = lambda x, a: MEAN + np.sqrt(a) * STD**2 / (a * STD**2 + 1 - a) * (x - np.sqrt(a) * MEAN)
  lam = lambda a: 0.5 * np.log(a / (1 - a))
  nodes, weights = np.polynomial.legendre.leggauss(20)
  x, outputs, lambdas = np.asarray(x_init, np.float64), [], []
  path = list(timesteps[::-1])
  for k, t in enumerate(path):
    a = alpha_bars[t]
    outputs.append(x0_hat(x, a))
    lambdas.append(lam(a))
    if k == len(path) - 1:
      return outputs[-1]
    order = min(3, len(outputs))
    if lower_order_final and len(path) < 15:
      order = min(order, len(path) - 1 - k)
    a_t = alpha_bars[path[k + 1]]
    lambda_s, lambda_t = lambdas[-1], lam(a_t)
    h = lambda_t - lambda_s
    if order == 2:
      r = (lambda_s - lambdas[-2]) / h
      data = (1 + 1 / (2 * r)) * outputs[-1] - 1 / (2 * r) * outputs[-2]
      x = np.sqrt((1 - a_t) / (1 - a)) * x - np.sqrt(a_t) * np.expm1(-h) * data
      continue
    known = np.stack(outputs[-order:]).reshape(order, -1)
    coefficients = np.polyfit(lambdas[-order:], known, order - 1)  # [order, pixels]
    points = lambda_s + 0.5 * h * (nodes + 1)
    interpolant = np.stack([np.polyval(coefficients, p) for p in points])
    integral = 0.5 * h * np.einsum("q,q,qn->n", weights, np.exp(points), interpolant)
    x = (np.sqrt((1 - a_t) / (1 - a)) * x
         + np.sqrt(1 - a_t) * integral.reshape(x.shape))


@pytest.mark.parametrize("num_steps", [6, 12, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_3m_matches_a_float64_reference(num_steps, lower_order_final):
  x_init = jax.random.normal(jax.random.key(3), (32, 2, 2, 1))
  timesteps = schedules.spaced_timesteps(SCHEDULE, num_steps, "logsnr")
  expected = dpm_solver_3m_reference(np.asarray(x_init), timesteps, lower_order_final)
  actual = run("dpm_solver_3m", num_steps, "logsnr", shape=x_init.shape, x_init=x_init,
               lower_order_final=lower_order_final).images
  np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


def unipc_reference(x_init, timesteps, order, lower_order_final):
  """UniPC (Zhao et al. 2023, data prediction, B(h) = e^h − 1) in float64 NumPy, as a linear
  multistep exponential integrator: from (λ_s, x_s, x̂0_s) and further points (λ_m, x̂0_m),
  x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) x̂0_s + σ_t Σ_m w_m (x̂0_m − x̂0_s)/r_m, where the
  w_m make Σ_m w_m r_m^{k−1} equal ∫_{λ_s}^{λ_t} e^λ ((λ − λ_s)/h)^k dλ (Gauss–Legendre), k = 1 … n
  (a single point: ½ α_t (1 − e^{−h})). Each step corrects the point it is at with the network's
  x̂0 there, then predicts the next one; the last step returns x̂0."""
  alpha_bars = np.cumprod(1 - np.float32(np.linspace(1e-4, 0.02, 1000)).astype(np.float64))
  x0_hat = lambda x, a: MEAN + np.sqrt(a) * STD**2 / (a * STD**2 + 1 - a) * (x - np.sqrt(a) * MEAN)
  lam = lambda a: 0.5 * np.log(a / (1 - a))
  nodes, weights = np.polynomial.legendre.leggauss(30)

  def update(x, a_s, a_t, x0_s, points):
    lambda_s, h = lam(a_s), lam(a_t) - lam(a_s)
    x_t = np.sqrt((1 - a_t) / (1 - a_s)) * x + np.sqrt(a_t) * (1 - np.exp(-h)) * x0_s
    if not points:
      return x_t
    r = np.array([(lambda_m - lambda_s) / h for lambda_m, _ in points])
    u = 0.5 * (nodes + 1)  # (λ − λ_s)/h at the quadrature nodes
    moments = [0.5 * h * np.sum(weights * np.exp(lambda_s + h * u) * u**k)
               for k in range(1, len(points) + 1)]
    w = ([0.5 * np.sqrt(a_t) * (1 - np.exp(-h)) / np.sqrt(1 - a_t)] if len(points) == 1
         else np.linalg.solve(np.vander(r, increasing=True).T, moments))
    return x_t + np.sqrt(1 - a_t) * sum(
        w_m * (x0_m - x0_s) / r_m for w_m, r_m, (_, x0_m) in zip(w, r, points))

  path = list(timesteps[::-1])
  x, x_start, outputs, lambdas, orders = np.asarray(x_init, np.float64), None, [], [], []
  for k, t in enumerate(path):
    x0 = x0_hat(x, alpha_bars[t])
    if k == len(path) - 1:
      return x0
    if outputs:  # correct x with its x̂0 as one more point of the last prediction
      earlier = [(lambdas[-j], outputs[-j]) for j in range(2, orders[-1] + 1)]
      x = update(x_start, alpha_bars[path[k - 1]], alpha_bars[t], outputs[-1],
                 [(lam(alpha_bars[t]), x0)] + earlier)
    outputs.append(x0)
    lambdas.append(lam(alpha_bars[t]))
    orders.append(min(order, k + 1, len(path) - k) if lower_order_final else min(order, k + 1))
    x_start = x
    x = update(x, alpha_bars[t], alpha_bars[path[k + 1]], x0,
               [(lambdas[-j], outputs[-j]) for j in range(2, orders[-1] + 1)])


@pytest.mark.parametrize("order, num_steps, lower_order_final", [
    (1, 12, True), (2, 6, True), (2, 12, True), (3, 12, True), (3, 12, False)])
def test_unipc_matches_a_float64_reference(order, num_steps, lower_order_final):
  x_init = jax.random.normal(jax.random.key(3), (32, 2, 2, 1))
  timesteps = schedules.spaced_timesteps(SCHEDULE, num_steps, "logsnr")
  expected = unipc_reference(np.asarray(x_init), timesteps, order, lower_order_final)
  actual = run("unipc", num_steps, "logsnr", shape=x_init.shape, x_init=x_init, order=order,
               lower_order_final=lower_order_final).images
  np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


def test_unipc_converges_one_order_above_its_predictor():
  """UniPC-p is of order p + 1: the error against the exact ODE solution over 5, 10, 20, 40
  logsnr steps falls as K^−q with q (least squares in log–log) above 1.7 for order 1, 2.2 for
  order 2 and 3.2 for order 3; order 2 is closer than DPM-Solver++(2M) at 5, 20 and 40 steps
  (h ≈ 2.4, 0.5, 0.25) but not at 10 (h ≈ 1, where 2M's two final first-order steps land
  close on this data, 3.5× closer)."""
  steps = np.array([5, 10, 20, 40])
  slopes, errors_by_order = {}, {}
  for order in (1, 2, 3):
    errors_by_order[order] = [flow_rms_error("unipc", k, "logsnr", order=order)
                              for k in steps.tolist()]
    slopes[order] = -np.polyfit(np.log(steps), np.log(errors_by_order[order]), 1)[0]
  assert slopes[1] > 1.7 and slopes[2] > 2.2 and slopes[3] > 3.2, slopes
  errors_2m = [flow_rms_error("dpm_solver", k, "logsnr") for k in steps.tolist()]
  ratios = np.array(errors_2m) / np.array(errors_by_order[2])
  assert ratios[0] > 1.5 and ratios[2] > 1.3 and ratios[3] > 2.5 and ratios[1] < 1, ratios


def zero_terminal_snr_schedule():
  """SCHEDULE rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1) in float64 NumPy:
  √ᾱ shifted so that √ᾱ_{T−1} = 0 and scaled so that √ᾱ_0 is unchanged; β_{T−1} = 1."""
  sqrt_alpha_bars = np.sqrt(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
  first, last = sqrt_alpha_bars[0], sqrt_alpha_bars[-1]
  alpha_bars = ((sqrt_alpha_bars - last) * first / (first - last))**2
  return schedules.from_betas(1 - alpha_bars / np.append(1.0, alpha_bars[:-1]))


def test_logsnr_spacing_of_a_zero_terminal_snr_schedule_starts_at_pure_noise():
  schedule = zero_terminal_snr_schedule()
  assert float(schedule.alpha_bars[-1]) == 0 and float(schedule.betas[-1]) == 1
  alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
  log_snr = 0.5 * np.log(alpha_bars[:-1] / (1 - alpha_bars[:-1]))
  for num_steps in (2, 10, 50):
    steps = schedules.spaced_timesteps(schedule, num_steps, "logsnr")
    assert len(steps) == num_steps and np.all(np.diff(steps) > 0) and steps[-1] == 999
    # The others even in λ from λ_998 (the lowest finite one) to λ_0, to within one timestep.
    targets = np.linspace(log_snr[-1], log_snr[0], num_steps)[1:][::-1]
    np.testing.assert_allclose(log_snr[steps[:-1]], targets,
                               atol=np.abs(np.diff(log_snr)).max())


@pytest.mark.parametrize("schedule", [SCHEDULE, schedules.cosine(1000)], ids=["linear", "cosine"])
def test_karras_spacing_is_even_in_sigma_to_the_one_over_rho(schedule):
  """Karras et al. 2022, eq. 5, in float64: σ_i = (σ_max^{1/ρ} + i/(K−1) (σ_min^{1/ρ} −
  σ_max^{1/ρ}))^ρ, ρ = 7, σ = √((1−ᾱ)/ᾱ), σ_min = σ_0 and σ_max = min(σ_{T−1}, e^5). T−1 takes
  the place of σ_max; every other σ_i lies between σ at its timestep's neighbours."""
  alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
  sigma = np.sqrt((1 - alpha_bars) / alpha_bars)
  sigma_max = min(sigma[-1], np.exp(5.0))
  for num_steps in (5, 10, 20):
    steps = schedules.spaced_timesteps(schedule, num_steps, "karras")
    assert len(steps) == num_steps and np.all(np.diff(steps) > 0) and steps[-1] == 999
    ramp = np.arange(num_steps) / (num_steps - 1)
    targets = (sigma_max**(1 / 7) + ramp * (sigma[0]**(1 / 7) - sigma_max**(1 / 7)))**7
    chosen = steps[:-1][::-1]  # the timesteps of σ_1 … σ_{K−1}, decreasing
    below, above = sigma[np.maximum(chosen - 1, 0)], sigma[np.minimum(chosen + 1, 999)]
    assert np.all((below <= targets[1:]) & (targets[1:] <= above)), (steps, targets)


@pytest.mark.parametrize("name, num_steps", [
    ("ddpm", 1000), ("ddim", 200), ("dpm_solver", 20), ("dpm_solver_3m", 20),
    ("dpm_solver_sde", 50), ("unipc", 20)])
def test_samplers_on_a_zero_terminal_snr_schedule(name, num_steps):
  """With ᾱ_{T−1} = 0 the first step starts at λ = −∞ (h = +∞): a v-predicting model is still
  fine there (x̂0 = −v, ε̂ = x), the solvers take their limit (x_{i−1} = α_{i−1} x̂0 + σ_{i−1} ε̂
  for the ODE ones) and every sampler, at its default spacing, reproduces the data."""
  schedule = zero_terminal_snr_schedule()
  samples = run(name, num_steps, schedule=schedule, prediction="v",
                network=gaussian_network(schedule, MEAN, STD, "v")).images
  assert np.all(np.isfinite(samples))
  assert abs(float(samples.mean()) - MEAN) < 0.02
  assert abs(float(samples.std()) / STD - 1) < 0.04, float(samples.std())


@pytest.mark.parametrize("name, num_steps", [("ddpm", 1000), ("ddim", 200)])
def test_clipping_samplers_on_the_configs_zero_terminal_snr_schedule(name, num_steps):
  """`config.diffusion.rescale_zero_terminal_snr` builds the schedule of the float64 reference
  above, and DDPM/DDIM with their default x̂0 clipping stay finite from ᾱ = 0 (ε̂ = x_T there)
  and reproduce the data."""
  config = ml_collections.ConfigDict(dict(
      schedule="linear", num_timesteps=1000, rescale_zero_terminal_snr=True,
      schedule_kwargs=dict(beta_start=1e-4, beta_end=0.02)))
  schedule = schedules.from_config(config)
  np.testing.assert_allclose(schedule.alpha_bars, zero_terminal_snr_schedule().alpha_bars,
                             rtol=1e-6, atol=1e-12)
  mean, std = 0.1, 0.3  # data well inside [−1, 1], so clipping leaves its distribution alone
  samples = run(name, num_steps, schedule=schedule, prediction="v", clip_x0=True,
                network=gaussian_network(schedule, mean, std, "v")).images
  assert np.all(np.isfinite(samples))
  assert abs(float(samples.mean()) - mean) < 0.01
  assert abs(float(samples.std()) / std - 1) < 0.04, float(samples.std())


def test_the_first_step_from_zero_terminal_snr_is_the_ddim_step():
  """From ᾱ = 0 the ODE solvers' first step is their h → ∞ limit, first order: α x̂0 + σ ε̂
  with ε̂ = x_T, as DDIM; here with a one-step-of-two run stopped after that step."""
  schedule = zero_terminal_snr_schedule()
  x_init = jax.random.normal(jax.random.key(16), (8, 2, 2, 1))
  timesteps = schedules.spaced_timesteps(schedule, 4, "logsnr")
  alpha_bar = float(schedule.alpha_bars[timesteps[-2]])
  x0 = MEAN  # E[x0 | x_T] at ᾱ = 0
  expected = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * np.asarray(x_init)
  for name in ("ddim", "dpm_solver", "dpm_solver_3m", "unipc"):
    _, frames = run(name, 4, "logsnr", schedule=schedule, prediction="v", shape=x_init.shape,
                    network=gaussian_network(schedule, MEAN, STD, "v"), x_init=x_init,
                    trajectory_every=1)
    np.testing.assert_allclose(frames[1], expected, atol=1e-5, err_msg=name)


def test_dynamic_threshold_rescales_only_samples_beyond_one():
  x0 = jnp.array([[0.5, -0.2, 0.9, 0.1], [3.0, -2.0, 0.5, 1.0]]).reshape(2, 2, 2, 1)
  np.testing.assert_allclose(samplers.dynamic_threshold(x0, 1.0).reshape(2, 4),
                             [[0.5, -0.2, 0.9, 0.1], [1.0, -2 / 3, 0.5 / 3, 1 / 3]], rtol=1e-6)
  # The 0.75-quantile of |x| = (0.5, 1, 2, 3) is 2.25.
  np.testing.assert_allclose(samplers.dynamic_threshold(x0, 0.75)[1].ravel(),
                             [1.0, -2 / 2.25, 0.5 / 2.25, 1 / 2.25], rtol=1e-6)
  far = gaussian_network(SCHEDULE, 2.0, STD)
  plain = run("dpm_solver", 10, shape=(64, 2, 2, 1), network=far).images
  thresholded = run("dpm_solver", 10, shape=(64, 2, 2, 1), network=far,
                    threshold_percentile=0.99).images
  assert float(plain.max()) > 1.5 and float(jnp.abs(thresholded).max()) <= 1.0


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_trajectory_frames(name):
  x_init = jax.random.normal(jax.random.key(4), (2, 2, 2, 1))
  final, frames = run(name, 10, shape=x_init.shape, x_init=x_init, trajectory_every=4)
  assert frames.shape == (1 + 2 + 1, 2, 2, 2, 1)  # x_T, after 4 and 8 steps, after 10
  np.testing.assert_array_equal(frames[0], x_init)
  np.testing.assert_array_equal(frames[-1], final)
  plain = run(name, 10, shape=x_init.shape, x_init=x_init)
  assert plain.trajectory is None
  np.testing.assert_allclose(final, plain.images, atol=1e-6)
  _, every_frame = run(name, 10, shape=x_init.shape, x_init=x_init, trajectory_every=1)
  assert every_frame.shape == (11, 2, 2, 2, 1)
  np.testing.assert_allclose(frames, every_frame[np.array([0, 4, 8, 10])], atol=1e-6)


def test_ddim_trajectory_of_a_single_image_is_the_forward_process_in_reverse():
  """For one-image data DDIM η = 0 keeps ε̂ fixed: after n of K steps x = √ᾱ x0 + √(1−ᾱ) ε̂
  with ᾱ that of the respaced timestep it has reached (1 at the end)."""
  image = jnp.linspace(-0.9, 0.9, 8).reshape(1, 2, 2, 2)
  x_init = jax.random.normal(jax.random.key(10), (3, 2, 2, 2))
  _, frames = run("ddim", 9, "quadratic", network=gaussian_network(SCHEDULE, image, 0.0),
                  shape=x_init.shape, x_init=x_init, trajectory_every=3)
  alpha_bars = np.asarray(SCHEDULE.alpha_bars, np.float64)
  reached = schedules.spaced_timesteps(SCHEDULE, 9, "quadratic")[::-1]
  start = alpha_bars[reached[0]]  # x_T is taken to be at the last kept timestep, 800
  eps = (x_init - np.sqrt(start) * image) / np.sqrt(1 - start)
  expected = [np.sqrt(a) * image + np.sqrt(1 - a) * eps
              for a in list(alpha_bars[reached[[0, 3, 6]]]) + [1.0]]
  np.testing.assert_allclose(frames, np.stack(expected), atol=2e-5)


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
@pytest.mark.parametrize("trajectory_every", [None, 3])
def test_program_size_does_not_grow_with_the_number_of_steps(name, trajectory_every):
  """The scan compiles one step: the program for 1000 steps is the program for 10."""

  def hlo_ops(num_steps):
    options = samplers.SamplingOptions(sampler=name, clip_x0=False, batch_size=2)
    sample = jax.jit(functools.partial(
        samplers.run, options.make_sampler(processes.DDPM(SCHEDULE)),
        oracles.gaussian_denoiser(SCHEDULE, 0.0, 1.0, image_shape=(4, 4, 1)), None,
        options=options, trajectory_every=trajectory_every))
    grid = processes.DDPM(SCHEDULE).sampling_grid(num_steps, "uniform")
    text = sample.lower(grid, jax.random.key(0)).as_text()
    return len([line for line in text.splitlines() if "=" in line])

  assert hlo_ops(1000) == hlo_ops(10)


def test_spacings_and_their_errors():
  for spacing in schedules.SPACINGS:
    for num_steps in (1, 7, 50, 1000):
      steps = schedules.spaced_timesteps(SCHEDULE, num_steps, spacing)
      assert len(steps) == num_steps and np.all(np.diff(steps) > 0)
      assert steps[0] >= 0 and steps[-1] <= 999
  np.testing.assert_array_equal(schedules.spaced_timesteps(SCHEDULE, 4, "uniform"),
                                [0, 333, 666, 999])
  np.testing.assert_array_equal(schedules.spaced_timesteps(SCHEDULE, 4, "trailing"),
                                [249, 499, 749, 999])
  np.testing.assert_array_equal(schedules.spaced_timesteps(SCHEDULE, 4, "quadratic"),
                                [0, 89, 356, 800])
  for bad in (0, 1001):
    with pytest.raises(errors.ArgumentError, match=f"^num_steps = {bad}: expected 1 … T = 1000$"):
      schedules.spaced_timesteps(SCHEDULE, bad)
  with pytest.raises(errors.ArgumentError, match="^spacing = 'cubic': unknown spacing"):
    schedules.spaced_timesteps(SCHEDULE, 10, "cubic")
  with pytest.raises(errors.ArgumentError,
                     match="^sampler = 'plms': unknown sampler; .*ddpm, ddim, dpm_solver"):
    samplers.SamplingOptions(sampler="plms")
  with pytest.raises(errors.ArgumentError,
                     match="^trajectory_every = 0: expected a whole number ≥ 1"):
    run("ddim", 10, shape=(1, 2, 2, 1), trajectory_every=0)


def class_oracle():
  """A class-conditional Gaussian oracle network: class y has mean 0.2·y − 0.4, the null label 0."""
  return gaussian_network(SCHEDULE, lambda y: jnp.where(y == 5, 0.0, 0.2 * y - 0.4), STD,
                          num_classes=5)


def test_guidance_zero_is_exactly_the_conditional_model():
  cond = class_oracle()
  labels = jnp.arange(8) % 5
  x_init = jax.random.normal(jax.random.key(5), (8, 2, 2, 1))
  labelled = oracles.Network(lambda x, t, y: cond.predict(x, t, labels))
  plain = run("ddim", 20, shape=x_init.shape, x_init=x_init, network=labelled).images
  unguided = run("ddim", 20, shape=x_init.shape, x_init=x_init, network=cond, labels=labels,
                 guidance_scale=0.0).images
  guided = run("ddim", 20, shape=x_init.shape, x_init=x_init, network=cond, labels=labels,
               guidance_scale=2.0).images
  np.testing.assert_array_equal(unguided, plain)
  assert not np.allclose(guided, plain)


def test_guidance_combines_both_branches_from_one_network_call():
  cond, batch_sizes = class_oracle(), []

  def recording(x, t, y):
    batch_sizes.append(x.shape[0])
    return cond.predict(x, t, y)

  denoiser = oracles.denoiser(oracles.Network(recording, num_classes=5), SCHEDULE)
  labels, w = jnp.array([0, 4, 2]), 1.5
  x, t = jax.random.normal(jax.random.key(11), (3, 2, 2, 1)), jnp.array([10, 500, 900])
  out = denoiser.output(None, x, t, labels, w)
  expected = (1 + w) * cond.predict(x, t, labels) - w * cond.predict(x, t, jnp.full(3, 5))
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  denoiser.output(None, x, t, labels, 0.0)
  assert batch_sizes == [6, 3]


def test_guidance_errors():
  shape = (2, 2, 2, 1)
  with pytest.raises(errors.ArgumentError, match="^guidance_scale = 2.0: this model is "
                     "unconditional"):
    run("ddim", 10, shape=shape, labels=jnp.zeros(2, jnp.int32), guidance_scale=2.0)
  with pytest.raises(errors.ArgumentError, match=r"^labels = .*: this model is unconditional"):
    run("ddim", 10, shape=shape, labels=jnp.zeros(2, jnp.int32))
  for bad in ([0, 5], [-1, 2]):
    with pytest.raises(errors.ArgumentError, match=rf"^labels = \[{bad[0]}, {bad[1]}\]: class "
                       r"labels must be in \[0, 5\)"):
      run("ddim", 10, shape=shape, network=class_oracle(), labels=jnp.array(bad),
          guidance_scale=1.0)


def test_guidance_pushes_samples_away_from_the_unconditional_mean():
  labels = jnp.full((2048,), 4)  # class mean 0.4, null mean 0.0
  samples = run("ddim", 50, "logsnr", shape=(2048, 2, 2, 1), network=class_oracle(),
                labels=labels, guidance_scale=1.0).images
  assert float(samples.mean()) > 0.5


def test_generate_is_the_same_on_one_and_eight_devices_and_cuts_the_last_batch():
  options = samplers.SamplingOptions(sampler="ddim", num_steps=10, batch_size=8)
  denoiser = oracles.gaussian_denoiser(SCHEDULE, MEAN, STD)
  common = dict(progress=False)
  one = generate.generate(denoiser, None, jax.random.key(6), options, num_samples=20,
                          mesh=parallel.make_mesh(jax.devices()[:1]), **common)
  eight = generate.generate(denoiser, None, jax.random.key(6), options, num_samples=20,
                            mesh=parallel.make_mesh(jax.devices()[:8]), **common)
  assert one["images"].shape == (20, 2, 2, 1) and one["labels"] is None
  assert one["trajectory"] is None
  np.testing.assert_array_equal(eight["images"], one["images"])
  whole = generate.generate(denoiser, None, jax.random.key(6), options, num_samples=24,
                            mesh=parallel.make_mesh(jax.devices()[:8]), **common)
  np.testing.assert_array_equal(whole["images"][:20], one["images"])
  assert len(np.unique(whole["images"][:, 0, 0, 0])) == 24  # every batch has its own noise


def test_generate_times_the_first_batch_apart_from_the_steady_rate():
  options = samplers.SamplingOptions(sampler="ddim", num_steps=10, batch_size=8)
  denoiser = oracles.gaussian_denoiser(SCHEDULE, MEAN, STD)
  three = generate.generate(denoiser, None, jax.random.key(6), options, num_samples=20,
                            progress=False)["timing"]
  assert three["first_batch_seconds"] > 0 and three["images_per_second"] > 0
  one = generate.generate(denoiser, None, jax.random.key(6), options, num_samples=8,
                          progress=False)["timing"]
  assert one["first_batch_seconds"] > 0 and one["images_per_second"] is None
  assert generate.timing_line(12.345, 67.891) == (
      "sampling: first batch (compile and run) 12.3 s, then 67.89 images/s")
  assert generate.timing_line(0.5, None) == (
      "sampling: first batch (compile and run) 0.5 s, one batch only, no steady rate")


@dataclasses.dataclass(frozen=True, eq=False)
class TimestepRecorder:
  """A network that records the dtype and first value of every t it is shown in `seen`."""

  network: UNet
  seen: list

  dtype = property(lambda self: self.network.dtype)
  num_classes = property(lambda self: self.network.num_classes)

  def apply(self, variables, x, t, y=None, **keywords):
    jax.debug.callback(lambda t: self.seen.append((np.asarray(t).dtype, int(np.asarray(t)[0]))),
                       t)
    return self.network.apply(variables, x, t, y, **keywords)


def test_bfloat16_sampling_stays_close_to_float32_with_time_in_float32():
  """A tiny U-Net with noisy params (so no layer is zero) sampled by DDIM-10 as a float32 and
  as a bfloat16 network: the images differ (bf16 computes) but stay close, and the network
  is shown exactly the int32 timesteps 999 … 0 of the spacing."""
  network = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                 out_channels=1)
  float32 = Denoiser(network=network, process=processes.DDPM(SCHEDULE, "eps"), num_classes=0,
                     image_shape=(8, 8, 1))
  params = float32.init(jax.random.key(0))
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  params = unravel(flat + 0.05 * jax.random.normal(jax.random.key(1), flat.shape))
  bfloat16 = float32.computing_in("bfloat16")
  assert (float32.dtype, bfloat16.dtype) == ("float32", "bfloat16")
  seen = []
  recording = dataclasses.replace(bfloat16, network=TimestepRecorder(bfloat16.network, seen))

  options = samplers.SamplingOptions(sampler="ddim", num_steps=10, batch_size=8, clip_x0=False)
  results = {name: generate.generate(denoiser, params, jax.random.key(2), options,
                                     num_samples=8, trajectory_every=1, progress=False)
             for name, denoiser in (("float32", float32), ("bfloat16", recording))}
  images = {name: result["images"] for name, result in results.items()}
  assert results["bfloat16"]["trajectory"].dtype == np.float32  # x after every step
  respaced = schedules.respace(SCHEDULE, schedules.spaced_timesteps(SCHEDULE, 10, "uniform"))
  assert all(np.asarray(coefficients).dtype == np.float32 for coefficients in respaced)
  assert not np.array_equal(images["bfloat16"], images["float32"])
  relative_error = (np.linalg.norm(images["bfloat16"] - images["float32"])
                    / np.linalg.norm(images["float32"]))
  assert relative_error < 0.02, relative_error
  expected = schedules.spaced_timesteps(SCHEDULE, 10, "uniform")[::-1]
  assert seen == [(np.int32, int(t)) for t in expected] and 999 in expected


def test_generate_with_labels_guidance_and_trajectory():
  options = samplers.SamplingOptions(sampler="dpm_solver", num_steps=10, batch_size=8,
                                     guidance_scale=1.0)
  denoiser = oracles.denoiser(class_oracle(), SCHEDULE)
  common = dict(num_samples=6, progress=False)
  result = generate.generate(denoiser, None, jax.random.key(7), options, trajectory_every=5,
                             **common)
  np.testing.assert_array_equal(result["labels"], [0, 1, 2, 3, 4, 0])
  assert result["trajectory"].shape == (3, 6, 2, 2, 1)
  np.testing.assert_array_equal(result["trajectory"][-1], result["images"])
  fixed = generate.generate(denoiser, None, jax.random.key(7), options,
                            labels=[0, 1, 2, 3, 4, 0], **common)
  np.testing.assert_array_equal(fixed["images"], result["images"])


def test_generate_rejects_bad_requests():
  options = samplers.SamplingOptions(batch_size=8)
  unconditional = oracles.gaussian_denoiser(SCHEDULE, 0, 1)
  common = dict(num_samples=4, progress=False)
  with pytest.raises(ValueError, match="unconditional"):
    generate.generate(unconditional, None, jax.random.key(0),
                      dataclasses.replace(options, guidance_scale=2.0), **common)
  with pytest.raises(errors.ArgumentError,
                     match=r"^labels = 7: class labels must be in \[0, 5\)$"):
    generate.generate(oracles.denoiser(class_oracle(), SCHEDULE), None, jax.random.key(0),
                      options, labels=7, **common)
  with pytest.raises(errors.ArgumentError,
                     match="^batch_size = 6: .* split evenly over the 8 devices: choose a "
                     "multiple of 8$"):
    generate.generate(unconditional, None, jax.random.key(0),
                      dataclasses.replace(options, batch_size=6), **common)
  with pytest.raises(errors.ArgumentError,
                     match=r"^num_steps = 1001: more than the model's T = 1000 .* 1 … 1000$"):
    generate.generate(unconditional, None, jax.random.key(0),
                      dataclasses.replace(options, num_steps=1001), **common)


def test_the_driver_guides_labelled_samples_like_the_guided_network():
  """Every sampler gives the images of an unconditional network that is the guided model."""
  labels, x_init = jnp.arange(4) % 5, jax.random.normal(jax.random.key(12), (4, 2, 2, 1))
  conditional = oracles.denoiser(class_oracle(), SCHEDULE)
  guided = oracles.Network(lambda x, t, y: conditional.output(None, x, t, labels, 1.5))
  for name in DDPM_SAMPLERS:
    by_driver = run(name, 10, shape=x_init.shape, x_init=x_init, network=class_oracle(),
                    labels=labels, guidance_scale=1.5).images
    by_network = run(name, 10, shape=x_init.shape, x_init=x_init, network=guided).images
    np.testing.assert_array_equal(by_driver, by_network)
  with pytest.raises(errors.ArgumentError, match="guidance needs the class labels"):
    run("ddim", 10, shape=x_init.shape, network=class_oracle(), guidance_scale=1.0)


def test_a_sampler_added_to_the_registry_runs_everywhere(monkeypatch):
  """A new sampler is a (init, step) pair and one registry line; generate then runs it. Here
  DDIM η = 0 written again, x_{i−1} = √ᾱ_{i−1} x̂0 + √(1 − ᾱ_{i−1}) ε̂, must give DDIM's images."""

  def jump(x, state, inputs, schedule):
    alpha_bar_prev = schedule.alpha_bars_prev[inputs.index]
    return (jnp.sqrt(alpha_bar_prev) * inputs.x0
            + jnp.sqrt(jnp.maximum(1 - alpha_bar_prev, 0.0)) * inputs.eps), state

  monkeypatch.setitem(samplers.SAMPLERS, "jump", samplers.Registered(
      lambda: samplers.Sampler(init=lambda x_T: (), step=jump), spacing="uniform",
      clip_x0=True))
  denoiser = oracles.gaussian_denoiser(SCHEDULE, 2.0, STD)
  images = {name: generate.generate(
      denoiser, None, jax.random.key(13),
      samplers.SamplingOptions(sampler=name, num_steps=10, batch_size=8), num_samples=8,
      progress=False)["images"] for name in ("jump", "ddim")}
  np.testing.assert_allclose(images["jump"], images["ddim"], atol=1e-6)
  assert float(np.abs(images["jump"]).max()) <= 1.0  # the registered default: clip x̂0


def test_dpm_solver_clipping_and_thresholding_options_reach_the_sampler():
  """Through SamplingOptions and generate, as `samplers.run(samplers.dpm_solver(), …)` on the
  respaced schedule with the key generate gives batch 0; the default clips nothing."""
  far = oracles.gaussian_denoiser(SCHEDULE, 2.0, STD)
  key = jax.random.key(14)
  timesteps = schedules.spaced_timesteps(SCHEDULE, 10, "logsnr")
  grid = samplers.Grid(schedules.respace(SCHEDULE, timesteps), jnp.asarray(timesteps))
  direct = jax.jit(lambda options: samplers.run(
      samplers.dpm_solver(), far, None, grid, jax.random.fold_in(key, 0), options).images,
      static_argnums=0)
  results = {}
  for clip_x0, threshold_percentile in [(None, None), (True, None), (None, 0.9)]:
    options = samplers.SamplingOptions(sampler="dpm_solver", num_steps=10, batch_size=8,
                                       clip_x0=clip_x0, threshold_percentile=threshold_percentile)
    images = generate.generate(far, None, key, options, num_samples=8, progress=False)["images"]
    np.testing.assert_array_equal(
        images, direct(dataclasses.replace(options, clip_x0=bool(clip_x0))))
    results[clip_x0, threshold_percentile] = images
  assert float(results[None, None].max()) > 1.5
  assert float(np.abs(results[True, None]).max()) <= 1.0
  assert float(np.abs(results[None, 0.9]).max()) <= 1.0
  assert not np.allclose(results[True, None], results[None, 0.9])


def test_sampling_options_from_config_sections():
  config = default.get_config()
  assert samplers.SamplingOptions.from_config(config.sample) == samplers.SamplingOptions(
      sampler="ddpm", num_steps=1000, clip_x0=True, guidance_scale=0.0, batch_size=64)
  config.eval.threshold_percentile = 0.995
  assert samplers.SamplingOptions.from_config(config.eval) == samplers.SamplingOptions(
      sampler="dpm_solver", num_steps=20, batch_size=128, threshold_percentile=0.995)
  assert samplers.SamplingOptions.from_config(mnist5k_cpu.get_config().eval) == (
      samplers.SamplingOptions(sampler="dpm_solver_sde", num_steps=20, spacing="karras",
                               batch_size=250))
  config.sample.sampler = "plms"
  with pytest.raises(errors.ArgumentError, match="^sampler = 'plms': unknown sampler; choose "
                     "one of ddpm, ddim, dpm_solver, dpm_solver_3m, dpm_solver_sde, unipc, euler, "
                     "heun, edm_stochastic$"):
    samplers.SamplingOptions.from_config(config.sample)


@pytest.mark.parametrize("field, value, message", [
    ("sampler", "plms", "sampler = 'plms': unknown sampler; choose one of ddpm, ddim, "
     "dpm_solver"),
    ("num_steps", 0, "num_steps = 0: expected a whole number ≥ 1"),
    ("spacing", "cubic", "spacing = 'cubic': unknown spacing; choose one of uniform, trailing, "
     "leading, quadratic, logsnr, karras"),
    ("threshold_percentile", 0.0, "threshold_percentile = 0.0: expected a number in (0, 1]"),
    ("threshold_percentile", 1.5, "threshold_percentile = 1.5: expected a number in (0, 1]"),
    ("eta", 0.5, "eta = 0.5: an option of sampler ddim, not of ddpm"),
    ("batch_size", 0, "batch_size = 0: expected a whole number ≥ 1"),
    ("batch_size", -8, "batch_size = -8: expected a whole number ≥ 1")])
def test_sampling_options_refuse_bad_values(field, value, message):
  with pytest.raises(errors.ArgumentError) as raised:
    samplers.SamplingOptions(**{field: value})
  assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
