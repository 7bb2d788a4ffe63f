"""Samplers: each walks the reverse process inside one `jax.lax.scan` with a static step count.

`apply_fn(variables, x_t, t)` returns the network output for a batch x_t at int timesteps
t of shape [batch]; `prediction` says whether that output is ε, x0 or v.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.schedules import Schedule

ApplyFn = Callable[..., jax.Array]


def ddpm(apply_fn: ApplyFn, variables, schedule: Schedule, key, shape: Sequence[int], *,
         prediction: str = "eps", variance: str = "beta", clip_x0: bool = True):
  """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2).

  x_T ~ N(0, I); for t = T−1 … 0: x_{t−1} = μ̃_t(x̂0, x_t) + σ_t z, z ~ N(0, I), with no noise
  at the last step; σ_t² = β_t or β̃_t by `variance`; x̂0 clipped to [−1, 1] by `clip_x0`.
  """
  num_steps = schedule.num_timesteps
  init_key, noise_key = jax.random.split(key)
  x_init = jax.random.normal(init_key, tuple(shape), jnp.float32)

  def step(x_t, inputs):
    t, step_key = inputs
    t_batch = jnp.full(x_t.shape[:1], t, jnp.int32)
    output = apply_fn(variables, x_t, t_batch)
    mean, log_variance, _ = diffusion.p_mean_variance(
        schedule, prediction, x_t, t_batch, output, clip_x0, variance)
    noise = jax.random.normal(step_key, x_t.shape, x_t.dtype)
    return mean + (t > 0) * jnp.exp(0.5 * log_variance) * noise, None

  timesteps = jnp.arange(num_steps - 1, -1, -1)
  x0, _ = jax.lax.scan(step, x_init, (timesteps, jax.random.split(noise_key, num_steps)))
  return x0
