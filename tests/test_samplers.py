"""Samplers with oracle denoisers whose ideal output is known in closed form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, schedules
from oracles import gaussian_eps


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_lands_on_the_single_training_image(variance):
  """For data that is one fixed image, the ideal ε is exact and sampling returns that image."""
  schedule = schedules.linear(1000)
  image = jnp.linspace(-0.9, 0.9, 4 * 4 * 2).reshape(1, 4, 4, 2)
  apply_fn = gaussian_eps(schedule, image, 0.0)
  samples = jax.jit(functools.partial(samplers.ddpm, apply_fn, variance=variance),
                    static_argnames="shape")(None, schedule, jax.random.key(0), shape=(3, 4, 4, 2))
  np.testing.assert_allclose(samples, jnp.broadcast_to(image, samples.shape), atol=1e-4)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_matches_gaussian_data_distribution(variance):
  mean, std = 0.3, 0.5
  schedule = schedules.linear(1000)
  samples = jax.jit(functools.partial(samplers.ddpm, gaussian_eps(schedule, mean, std),
                                      variance=variance, clip_x0=False),
                    static_argnames="shape")(None, schedule, jax.random.key(1), shape=(4096, 2, 2, 1))
  assert abs(float(samples.mean()) - mean) < 0.02
  assert abs(float(samples.std()) / std - 1) < 0.05


def test_ddpm_is_deterministic_for_a_key_and_varies_across_keys():
  schedule = schedules.linear(50)
  sample = jax.jit(functools.partial(samplers.ddpm, gaussian_eps(schedule, 0.0, 0.5)),
                   static_argnames="shape")
  a = sample(None, schedule, jax.random.key(3), shape=(2, 3, 3, 1))
  b = sample(None, schedule, jax.random.key(3), shape=(2, 3, 3, 1))
  c = sample(None, schedule, jax.random.key(4), shape=(2, 3, 3, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_ddpm_program_size_does_not_grow_with_num_timesteps():
  """The scan compiles one step: the program for T = 1000 is the program for T = 10."""

  def hlo_ops(T):
    schedule = schedules.linear(T)
    sample = jax.jit(functools.partial(samplers.ddpm, gaussian_eps(schedule, 0.0, 1.0)),
                     static_argnames="shape")
    text = sample.lower(None, schedule, jax.random.key(0), shape=(2, 4, 4, 1)).as_text()
    return len([line for line in text.splitlines() if "=" in line])

  assert hlo_ops(1000) == hlo_ops(10)
