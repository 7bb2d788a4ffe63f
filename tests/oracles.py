"""Denoisers whose optimal output is known in closed form, for testing samplers and losses."""

import jax.numpy as jnp

from jaxdiff.schedules import Schedule


def gaussian_eps(schedule: Schedule, mean: float, std: float):
  """apply_fn for data x0 ~ N(mean, std² I): the MMSE noise prediction E[ε | x_t].

  x_t = √ᾱ x0 + √(1−ᾱ) ε is Gaussian with mean √ᾱ·mean and variance ᾱ std² + 1 − ᾱ, so
  E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ·mean) / (ᾱ std² + 1 − ᾱ).
  """

  def apply_fn(variables, x_t, t):
    del variables
    alpha_bar = schedule.alpha_bars[t].reshape(t.shape + (1,) * (x_t.ndim - 1))
    return (jnp.sqrt(1 - alpha_bar) * (x_t - jnp.sqrt(alpha_bar) * mean)
            / (alpha_bar * std**2 + 1 - alpha_bar))

  return apply_fn
