"""Training objectives."""

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.schedules import Schedule

# denoise_fn(params, x_t, t, labels_or_None, dropout_key) -> network output shaped like x_t.
DenoiseFn = Callable[..., jax.Array]


def drop_labels(key, labels, num_classes: int, p_uncond: float):
  """Classifier-free guidance training: each label becomes `num_classes` (the null label)
  with probability p_uncond."""
  drop = jax.random.bernoulli(key, p_uncond, labels.shape)
  return jnp.where(drop, num_classes, labels)


def diffusion_loss(denoise_fn: DenoiseFn, params, schedule: Schedule, batch, key,
                   prediction: str = "eps", num_classes: int = 0, p_uncond: float = 0.0):
  """L_simple = E_{t, ε} ‖target − f_θ(x_t, t)‖² with t ~ U{0, …, T−1}, ε ~ N(0, I) (DDPM eq. 14).

  The target is ε, x0 or v by `prediction`. Returns (mean loss, aux) where aux holds the
  per-example losses (mean over pixels) and their timesteps, for loss-by-timestep plots.
  """
  x0 = batch["image"]
  t_key, noise_key, label_key, dropout_key = jax.random.split(key, 4)
  t = jax.random.randint(t_key, x0.shape[:1], 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  labels = None
  if num_classes:
    labels = drop_labels(label_key, batch["label"], num_classes, p_uncond)
  output = denoise_fn(params, x_t, t, labels, dropout_key)
  target = diffusion.training_target(schedule, prediction, x0, t, noise)
  per_example = jnp.mean(jnp.square(output.astype(jnp.float32) - target),
                         axis=tuple(range(1, x0.ndim)))
  return jnp.mean(per_example), {"per_example_loss": per_example, "t": t}
