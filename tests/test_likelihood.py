"""The variational bound, term by term, against float64 references; bits/dim of known models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jaxdiff import denoiser as denoiser_lib, losses, parallel, samplers, schedules, train_step
from jaxdiff.evaluation import likelihood, metrics
from jaxdiff.jobs import workdir
from tests import oracles
from tests.helpers import TRAINED_STEPS, job_config


def schedule64(num_timesteps=1000):
  """The linear schedule's ᾱ_t, β_t and posterior coefficients in float64."""
  betas = np.linspace(1e-4, 0.02, num_timesteps)
  alpha_bars = np.cumprod(1 - betas)
  alpha_bars_prev = np.append(1.0, alpha_bars[:-1])
  return betas, alpha_bars, alpha_bars_prev


def test_normal_kl_matches_float64_closed_form():
  rng = np.random.default_rng(0)
  m1, m2, lv1, lv2 = rng.normal(size=(4, 100))
  expected = (np.log(np.sqrt(np.exp(lv2)) / np.sqrt(np.exp(lv1)))
              + (np.exp(lv1) + (m1 - m2) ** 2) / (2 * np.exp(lv2)) - 0.5)
  np.testing.assert_allclose(losses.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(losses.normal_kl(m1, lv1, m1, lv1)))) < 1e-6


def reference_bin_log_mass(x, mean, std, num_levels):
  """log ∫ N(·; mean, std²) over x's bin, float64 scipy (cdf below the mean, sf above)."""
  half = 1.0 / (num_levels - 1)
  upper = np.where(x > 1 - half, np.inf, (x + half - mean) / std)
  lower = np.where(x < -1 + half, -np.inf, (x - half - mean) / std)
  with np.errstate(divide="ignore"):
    below = np.log(stats.norm.cdf(upper) - stats.norm.cdf(lower))
    above = np.log(stats.norm.sf(lower) - stats.norm.sf(upper))
  return np.where(x - mean > 0, above, below)


@pytest.mark.parametrize("num_levels", [17, 256])
def test_discretized_gaussian_matches_scipy_and_sums_to_one(num_levels):
  grid = np.linspace(-1, 1, num_levels)
  for mean, std in [(0.3, 0.05), (-0.99, 0.2), (1.2, 0.01), (0.0, 3.0)]:
    got = losses.discretized_gaussian_log_likelihood(
        jnp.asarray(grid, jnp.float32), jnp.float32(mean), jnp.float32(2 * np.log(std)), num_levels)
    expected = reference_bin_log_mass(grid, mean, std, num_levels)
    finite = expected > -80  # float32 log_ndtr's range; beyond it both are ≈ −∞ in effect
    np.testing.assert_allclose(np.asarray(got)[finite], expected[finite], rtol=2e-4, atol=2e-4)
    assert np.all(np.asarray(got)[~finite] < -70)
    np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)).sum(), 1.0, atol=1e-5)


def test_far_pixels_keep_their_tiny_likelihood():
  """A pixel 20σ from the mean: log mass ≈ log φ-tail, not log(0) or a clip value."""
  x = jnp.float32(0.0)
  got = float(losses.discretized_gaussian_log_likelihood(x, jnp.float32(-0.5), jnp.log(0.025**2),
                                                           256))
  half = 1 / 255
  expected = np.log(stats.norm.sf((0.5 - half) / 0.025) - stats.norm.sf((0.5 + half) / 0.025))
  assert got == pytest.approx(expected, rel=1e-4)


def test_prior_term_is_about_1e5_bits_per_dim_for_the_linear_schedule():
  rng = np.random.default_rng(1)
  x0 = rng.integers(0, 17, size=(16, 8, 8, 1)) / 8.0 - 1.0
  _, alpha_bars, _ = schedule64()
  mean, var = np.sqrt(alpha_bars[-1]) * x0, 1 - alpha_bars[-1]
  expected = 0.5 * (-np.log(var) - 1 + var + mean**2).sum(axis=(1, 2, 3))
  got = losses.prior_kl(schedules.linear(1000), jnp.asarray(x0, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-3)
  bits_per_dim = expected.mean() / (64 * math.log(2))
  assert 2e-6 < bits_per_dim < 3e-5


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_vb_terms_match_a_float64_reference(variance):
  """Every term, for a fixed (non-optimal) network ε̂ = 0.7·x_t, against float64 NumPy."""
  num_levels, num_timesteps = 17, 1000
  schedule = schedules.linear(num_timesteps)
  betas, alpha_bars, alpha_bars_prev = schedule64(num_timesteps)
  rng = np.random.default_rng(2)
  x0 = rng.integers(0, num_levels, size=(6, 4, 4, 1)) / 8.0 - 1.0
  noise = rng.normal(size=x0.shape)
  t = np.array([0, 1, 2, 500, 998, 999])
  network = lambda variables, x_t, t: 0.7 * x_t
  got = losses.vb_term(network, None, schedule, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                       jnp.asarray(noise, jnp.float32), num_levels=num_levels, variance=variance)

  shape = (-1, 1, 1, 1)
  ab, ab_prev, beta = (v[t].reshape(shape) for v in (alpha_bars, alpha_bars_prev, betas))
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  x0_hat = np.clip((x_t - np.sqrt(1 - ab) * 0.7 * x_t) / np.sqrt(ab), -1, 1)
  coef1 = beta * np.sqrt(ab_prev) / (1 - ab)
  coef2 = (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab)
  posterior_var = np.where(t.reshape(shape) == 0, 1.0, beta * (1 - ab_prev) / (1 - ab))  # t = 0: unused
  beta_tilde_1 = betas[1] * (1 - alpha_bars[0]) / (1 - alpha_bars[1])
  model_var = np.where(t.reshape(shape) == 0, beta_tilde_1,
                       beta if variance == "beta" else posterior_var)
  model_mean = coef1 * x0_hat + coef2 * x_t
  true_mean = coef1 * x0 + coef2 * x_t
  kl = 0.5 * (np.log(model_var / posterior_var) - 1 + posterior_var / model_var
              + (true_mean - model_mean) ** 2 / model_var)
  decoder = -reference_bin_log_mass(x0, model_mean, np.sqrt(model_var), num_levels)
  expected = np.where(t == 0, decoder.sum(axis=(1, 2, 3)),
                      kl.sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4)


def gaussian_levels_data(num_images, levels, mean, std, seed):
  """Images of i.i.d. pixels from N(mean, std²) rounded onto the grid of `levels` values, and
  the exact entropy in bits of one such pixel."""
  grid = np.linspace(-1, 1, levels)
  half = 1 / (levels - 1)
  upper = np.where(grid > 1 - half, np.inf, grid + half)
  lower = np.where(grid < -1 + half, -np.inf, grid - half)
  probs = stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std)
  rng = np.random.default_rng(seed)
  pixels = rng.choice(grid, size=(num_images, 8, 8, 1), p=probs / probs.sum())
  entropy_bits = -np.sum(special.xlogy(probs, probs)) / math.log(2)
  return pixels.astype(np.float32), entropy_bits


def run_bits_per_dim(denoiser, pixels, mesh, levels, batch_size=32):
  bound_fn = likelihood.make_bound_fn(denoiser, None, mesh, num_levels=levels,
                                      timestep_chunk=250)
  batches = [{"image": pixels[i:i + batch_size], "label": np.zeros(batch_size, np.int32),
              "mask": np.ones(batch_size, bool)}
             for i in range(0, len(pixels), batch_size)]
  return likelihood.bits_per_dim(bound_fn, None, batches, jax.random.key(0), pixels.shape[1:])


@pytest.fixture(scope="module")
def gaussian_case():
  levels, mean, std = 256, 0.1, 0.3
  pixels, entropy = gaussian_levels_data(64, levels, mean, std, seed=3)
  denoiser = oracles.gaussian_denoiser(schedules.linear(1000), mean, std,
                                       image_shape=pixels.shape[1:])
  return dict(denoiser=denoiser, pixels=pixels, levels=levels, entropy=entropy)


def expected_gaussian_kl_bits(std, variance):
  """E[L_{t−1}] per pixel in bits for data N(·, std²) and its MMSE denoiser, t = 1 … T−1:
  the posterior means differ by coef1_t (x0 − E[x0 | x_t]), whose second moment is
  Var(x0 | x_t) = std² (1 − ᾱ_t) / (ᾱ_t std² + 1 − ᾱ_t), so
  E[KL] = ½ (log σ_t²/β̃_t − 1 + β̃_t/σ_t² + coef1_t² Var(x0 | x_t)/σ_t²)."""
  betas, alpha_bars, alpha_bars_prev = (v[1:] for v in schedule64())
  beta_tilde = betas * (1 - alpha_bars_prev) / (1 - alpha_bars)
  coef1 = betas * np.sqrt(alpha_bars_prev) / (1 - alpha_bars)
  var_x0 = std**2 * (1 - alpha_bars) / (alpha_bars * std**2 + 1 - alpha_bars)
  sigma2 = betas if variance == "beta" else beta_tilde
  kl = 0.5 * (np.log(sigma2 / beta_tilde) - 1 + beta_tilde / sigma2 + coef1**2 * var_x0 / sigma2)
  return kl / math.log(2)


def test_bound_of_the_exact_denoiser_matches_the_analytic_value(gaussian_case):
  """Pixels ~ N(0.1, 0.3²) on 256 levels (entropy 7.30 bits). With the MMSE denoiser the
  diffusion terms equal their closed form (4.91 bits/dim), and the bound lies above the
  entropy: fixed variances leave a gap of about 0.15 bits/dim at T = 1000."""
  result = run_bits_per_dim(gaussian_case["denoiser"], gaussian_case["pixels"],
                            parallel.make_mesh(), gaussian_case["levels"])
  expected_terms = expected_gaussian_kl_bits(0.3, "beta")
  assert result["diffusion_bpd"] == pytest.approx(expected_terms.sum(), rel=0.03)
  late = slice(50, None)  # where the pixel grid no longer matters: continuous closed form
  assert np.sum(result["bpd_per_timestep"][late]) == pytest.approx(
      expected_terms[49:].sum(), rel=0.03)
  entropy = gaussian_case["entropy"]
  assert entropy - 3 * result["bpd_stderr"] < result["bpd"] < entropy + 0.3
  assert result["num_images"] == 64
  parts = result["prior_bpd"] + result["diffusion_bpd"] + result["decoder_bpd"]
  assert result["bpd"] == pytest.approx(parts, rel=1e-5)
  assert result["bpd_per_timestep"][0] == pytest.approx(result["decoder_bpd"])
  assert len(result["bpd_per_timestep"]) == 1000


def test_bits_per_dim_are_the_same_on_one_and_eight_devices(gaussian_case):
  one, eight = (run_bits_per_dim(gaussian_case["denoiser"], gaussian_case["pixels"][:32],
                                 parallel.make_mesh(devices), gaussian_case["levels"])
                for devices in (jax.devices()[:1], jax.devices()))
  assert one["bpd"] == pytest.approx(eight["bpd"], rel=1e-5)
  np.testing.assert_allclose(one["bpd_per_timestep"], eight["bpd_per_timestep"],
                             rtol=1e-4, atol=1e-9)


def test_padding_is_left_out():
  """What sits in the padded rows of a last batch changes nothing."""
  schedule = schedules.linear(10)
  pixels, _ = gaussian_levels_data(8, 17, 0.0, 0.5, seed=4)
  halving = oracles.denoiser(oracles.Network(lambda x, t, y: 0.5 * x), schedule, pixels.shape[1:])
  bound_fn = likelihood.make_bound_fn(halving, None, parallel.make_mesh(), num_levels=17,
                                      timestep_chunk=5)

  def with_padding(fill):
    images = np.concatenate([pixels[:5], np.full_like(pixels[:3], fill)])
    batch = {"image": images, "label": np.zeros(8, np.int32), "mask": np.arange(8) < 5}
    return likelihood.bits_per_dim(bound_fn, None, [batch], jax.random.key(1), pixels.shape[1:])

  zeros, ones = with_padding(0.0), with_padding(1.0)
  assert zeros["num_images"] == 5
  assert zeros["bpd"] == ones["bpd"] and zeros["prior_bpd"] == ones["prior_bpd"]
  assert zeros["bpd_per_timestep"] == ones["bpd_per_timestep"]


# Bits/dim of real models on the digits (the session's judged_data_dir and trained_workdir).


@pytest.mark.slow  # trains the digits classifier (judged_data_dir)
@pytest.mark.parametrize("num_images, batch_size", [(5, 128), (11, 8)])
def test_bits_per_dim_counts_exactly_the_images_asked_for(judged_data_dir, num_images,
                                                          batch_size):
  config = job_config(judged_data_dir)
  config.diffusion.num_timesteps = 10
  denoiser = denoiser_lib.from_config(config)
  params = train_step.init_state(denoiser, config.train, jax.random.key(0)).ema_params
  request = metrics.Request(sampling=samplers.SamplingOptions(batch_size=batch_size),
                            num_images=num_images, timestep_chunk=5)
  result = metrics.bits_per_dim(denoiser, params, config.data, parallel.make_mesh(),
                                jax.random.key(1), request)
  assert result["num_images"] == num_images
  assert np.isfinite(result["bpd"]) and result["bpd"] > 0


@pytest.mark.slow
def test_a_trained_model_beats_the_uniform_baseline_in_bits_per_dim(trained_workdir):
  """Digits take 17 values: a uniform model costs log2 17 ≈ 4.09 bits/dim. 300 steps of the
  tiny U-Net (`helpers.trained_config`) bring the bound to about 3.9 (the 1,500-step default
  model reaches 2.99)."""
  trained = workdir.load_model(trained_workdir)
  assert trained.step == TRAINED_STEPS
  request = metrics.Request(sampling=samplers.SamplingOptions(batch_size=32), num_images=64)
  result = metrics.bits_per_dim(trained.denoiser, trained.params, trained.config.data,
                                parallel.make_mesh(), jax.random.key(0), request)
  assert result["uniform_bpd"] == pytest.approx(np.log2(17))
  assert result["bpd"] + 3 * result["bpd_stderr"] < result["uniform_bpd"]
