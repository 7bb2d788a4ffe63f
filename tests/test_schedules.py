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
  with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*cosine.*linear"):
    schedules.from_config(config)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    schedules.from_betas([0.1, 1.5])
