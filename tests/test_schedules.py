"""Schedules against float64 NumPy references written from the papers' equations."""

import math

import jax
import numpy as np
import pytest

from jaxdiff import schedules
from tests.helpers import reference


def assert_matches_reference(schedule, betas):
  for name, expected in reference(betas).items():
    actual = getattr(schedule, name)
    assert actual.dtype == np.float32, name
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=2e-6, atol=1e-9,
                               err_msg=name)


@pytest.mark.parametrize("T", [10, 1000])
def test_linear_matches_ddpm_equations(T):
  betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
  schedule = schedules.linear(T)
  assert schedule.num_timesteps == T
  assert_matches_reference(schedule, betas)


@pytest.mark.parametrize("T", [50, 1000])
def test_cosine_matches_improved_ddpm_equations(T):
  f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
  schedule = schedules.cosine(T)
  assert_matches_reference(schedule, betas)
  # ᾱ_t follows f(t+1)/f(0) wherever no beta was clipped.
  expected = np.array([f(t + 1) / f(0) for t in range(T)])
  unclipped = np.cumsum(np.array(betas) >= 0.999) == 0
  np.testing.assert_allclose(np.asarray(schedule.alpha_bars)[unclipped], expected[unclipped],
                             rtol=1e-5)


def test_linear_reaches_pure_noise():
  schedule = schedules.linear(1000)
  assert float(schedule.alpha_bars[-1]) < 5e-5  # x_T is almost exactly N(0, I)


def test_schedule_is_a_pytree_that_passes_through_jit():
  schedule = schedules.cosine(20)
  doubled = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x, s))(schedule)
  assert isinstance(doubled, schedules.Schedule)
  np.testing.assert_allclose(doubled.betas, 2 * np.asarray(schedule.betas))


def test_from_config_and_bad_names():
  import ml_collections
  config = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=7))
  assert schedules.from_config(config).num_timesteps == 7
  config.schedule = "quadratic"
  with pytest.raises(ValueError, match="^schedule = 'quadratic': unknown schedule; "
                     "choose one of .*linear.*cosine"):
    schedules.from_config(config)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    schedules.from_betas([0.1, 1.5])


def zero_terminal_snr_reference(betas):
  """Lin et al. 2024, Algorithm 1, step by step in float64."""
  alphas = 1.0 - np.asarray(betas, np.float64)
  alphas_bar_sqrt = np.sqrt(np.cumprod(alphas))
  alphas_bar_sqrt_0 = alphas_bar_sqrt[0].copy()
  alphas_bar_sqrt_T = alphas_bar_sqrt[-1].copy()
  alphas_bar_sqrt -= alphas_bar_sqrt_T
  alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
  return 1.0 - alphas


def diffusion_config(**fields):
  import ml_collections
  return ml_collections.ConfigDict(dict(num_timesteps=1000, **fields))


@pytest.mark.parametrize("name, betas_fn", [
    ("linear", lambda: np.linspace(1e-4, 0.02, 1000)),
    ("cosine", lambda: schedules.cosine_betas(1000)),
])
def test_zero_terminal_snr_rescale_matches_algorithm_1(name, betas_fn):
  config = diffusion_config(schedule=name, rescale_zero_terminal_snr=True)
  rescaled = schedules.from_config(config)
  expected_betas = zero_terminal_snr_reference(betas_fn())
  np.testing.assert_allclose(schedules.rescale_zero_terminal_snr(betas_fn()), expected_betas,
                             rtol=1e-10, atol=0)
  with np.errstate(divide="ignore"):  # 1/√ᾱ at ᾱ_{T−1} = 0
    assert_matches_reference(rescaled, expected_betas)
  assert float(rescaled.alpha_bars[-1]) == 0.0 and float(rescaled.sqrt_alpha_bars[-1]) == 0.0
  assert float(rescaled.betas[-1]) == 1.0
  original = schedules.from_config(diffusion_config(schedule=name))
  np.testing.assert_allclose(rescaled.alpha_bars[0], original.alpha_bars[0], rtol=1e-7)
  # Every coefficient is finite but the two reciprocals of √ᾱ at ᾱ_{T−1} = 0, which are +inf.
  for field, values in rescaled._asdict().items():
    values = np.asarray(values)
    if field in ("sqrt_recip_alpha_bars", "sqrt_recipm1_alpha_bars"):
      assert np.all(np.isfinite(values[:-1])) and values[-1] == np.inf, field
    else:
      assert np.all(np.isfinite(values)), field


def test_rescale_is_off_by_default_and_needs_two_timesteps():
  import ml_collections
  linear = schedules.linear(1000)
  for config in (diffusion_config(schedule="linear"),
                 diffusion_config(schedule="linear", rescale_zero_terminal_snr=False)):
    for got, expected in zip(schedules.from_config(config), linear):
      np.testing.assert_array_equal(got, expected)
  one_step = ml_collections.ConfigDict(dict(schedule="linear", num_timesteps=1,
                                            rescale_zero_terminal_snr=True))
  with pytest.raises(ValueError, match="at least 2 timesteps"):
    schedules.from_config(one_step)


def test_other_schedules_default_options_are_dropped_but_changed_ones_refused():
  """The default config carries linear's beta_start and beta_end: cosine takes them at their
  defaults as absent, and refuses them changed."""
  kwargs = dict(beta_start=1e-4, beta_end=0.02)
  config = diffusion_config(schedule="cosine", schedule_kwargs=kwargs)
  for got, expected in zip(schedules.from_config(config), schedules.cosine(1000)):
    np.testing.assert_array_equal(got, expected)
  config.schedule_kwargs.beta_end = 0.01
  with pytest.raises(TypeError, match="beta_end"):
    schedules.from_config(config)
  config = diffusion_config(schedule="linear", schedule_kwargs=dict(beta_end=0.01, s=0.008))
  for got, expected in zip(schedules.from_config(config), schedules.linear(1000, beta_end=0.01)):
    np.testing.assert_array_equal(got, expected)
