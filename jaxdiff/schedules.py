"""Noise schedules: β_t and every coefficient derived from it, as one pytree of arrays.

Timesteps are indexed t = 0 … T−1 (the paper's t = 1 … T). Everything is computed in float64
NumPy and stored as float32 arrays, so a `Schedule` passes through `jax.jit` as an argument.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Precomputed per-timestep coefficients, each an array of shape [T]."""

  betas: jax.Array                           # β_t
  alphas: jax.Array                          # α_t = 1 − β_t
  alpha_bars: jax.Array                      # ᾱ_t = ∏_{s≤t} α_s
  alpha_bars_prev: jax.Array                 # ᾱ_{t−1}, with ᾱ_{−1} = 1
  sqrt_alpha_bars: jax.Array                 # √ᾱ_t
  sqrt_one_minus_alpha_bars: jax.Array       # √(1 − ᾱ_t)
  sqrt_recip_alpha_bars: jax.Array           # 1/√ᾱ_t
  sqrt_recipm1_alpha_bars: jax.Array         # √(1/ᾱ_t − 1)
  posterior_variance: jax.Array              # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
  posterior_log_variance_clipped: jax.Array  # log β̃_t, with β̃_0 := β̃_1 (β̃_0 = 0)
  posterior_mean_coef1: jax.Array            # β_t √ᾱ_{t−1} / (1 − ᾱ_t)        (multiplies x0)
  posterior_mean_coef2: jax.Array            # (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t)  (multiplies x_t)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def from_betas(betas) -> Schedule:
  """The schedule for an arbitrary sequence of betas in (0, 1]."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
  if not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("every beta must lie in (0, 1]")
  alphas = 1.0 - betas
  alpha_bars = np.cumprod(alphas)
  alpha_bars_prev = np.append(1.0, alpha_bars[:-1])
  posterior_variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
  # β̃_0 = 0; DDPM clips its log to log β̃_1 (a one-step chain falls back to β_0).
  first_variance = posterior_variance[1] if betas.size > 1 else betas[0]
  log_variance_clipped = np.log(np.append(first_variance, posterior_variance[1:]))
  coefficients = dict(
      betas=betas,
      alphas=alphas,
      alpha_bars=alpha_bars,
      alpha_bars_prev=alpha_bars_prev,
      sqrt_alpha_bars=np.sqrt(alpha_bars),
      sqrt_one_minus_alpha_bars=np.sqrt(1.0 - alpha_bars),
      sqrt_recip_alpha_bars=np.sqrt(1.0 / alpha_bars),
      sqrt_recipm1_alpha_bars=np.sqrt(1.0 / alpha_bars - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=log_variance_clipped,
      posterior_mean_coef1=betas * np.sqrt(alpha_bars_prev) / (1.0 - alpha_bars),
      posterior_mean_coef2=(1.0 - alpha_bars_prev) * np.sqrt(alphas) / (1.0 - alpha_bars),
  )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in coefficients.items()})


def linear(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """DDPM (Ho et al. 2020): β_t evenly spaced from beta_start to beta_end."""
  return from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def cosine_alpha_bar(u, s: float = 0.008):
  """Improved DDPM's ᾱ(u) = cos²((u + s)/(1 + s) · π/2) / cos²(s/(1 + s) · π/2), u = t/T ∈ [0, 1]."""
  f = lambda v: np.cos((v + s) / (1.0 + s) * math.pi / 2) ** 2
  return f(np.asarray(u, dtype=np.float64)) / f(0.0)


def cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """Improved DDPM (Nichol & Dhariwal 2021): β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta)."""
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = cosine_alpha_bar(u, s)
  return from_betas(np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta))


SCHEDULES = {"linear": linear, "cosine": cosine}


def from_config(diffusion_config) -> Schedule:
  """The schedule that `config.diffusion` names (`schedule`, `num_timesteps`, and its options)."""
  name = diffusion_config.schedule
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; available: {sorted(SCHEDULES)}")
  options = dict(diffusion_config.get("schedule_kwargs", {}))
  return SCHEDULES[name](diffusion_config.num_timesteps, **options)
