"""Noise schedules: β_t and every coefficient derived from it, as one pytree of arrays.

Timesteps are indexed t = 0 … T−1 (the paper's t = 1 … T). Everything is computed in float64
NumPy and stored as float32 arrays, so a `Schedule` passes through `jax.jit` as an argument.
"""

import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import validation
from jaxdiff.errors import ArgumentError


class Schedule(NamedTuple):
  """Precomputed per-timestep coefficients, each an array of shape [T]. Every one is finite,
  except the two reciprocals of √ᾱ at a zero-terminal-SNR schedule's last step (ᾱ_{T−1} = 0)."""

  betas: jax.Array                           # β_t
  alphas: jax.Array                          # α_t = 1 − β_t
  alpha_bars: jax.Array                      # ᾱ_t = ∏_{s≤t} α_s
  alpha_bars_prev: jax.Array                 # ᾱ_{t−1}, with ᾱ_{−1} = 1
  sqrt_alpha_bars: jax.Array                 # √ᾱ_t
  sqrt_one_minus_alpha_bars: jax.Array       # √(1 − ᾱ_t)
  sqrt_recip_alpha_bars: jax.Array           # 1/√ᾱ_t        (+inf where ᾱ_t = 0)
  sqrt_recipm1_alpha_bars: jax.Array         # √(1/ᾱ_t − 1)  (+inf where ᾱ_t = 0)
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
  # ᾱ_{T−1} = 0 (a zero-terminal-SNR schedule) makes 1/√ᾱ and √(1/ᾱ − 1) there +inf.
  with np.errstate(divide="ignore"):
    recip_alpha_bars = 1.0 / alpha_bars
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
      sqrt_recip_alpha_bars=np.sqrt(recip_alpha_bars),
      sqrt_recipm1_alpha_bars=np.sqrt(recip_alpha_bars - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=log_variance_clipped,
      posterior_mean_coef1=betas * np.sqrt(alpha_bars_prev) / (1.0 - alpha_bars),
      posterior_mean_coef2=(1.0 - alpha_bars_prev) * np.sqrt(alphas) / (1.0 - alpha_bars),
  )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in coefficients.items()})


def from_alpha_bars(alpha_bars) -> Schedule:
  """The schedule whose ᾱ_t are `alpha_bars` (decreasing, in [0, 1)): β_t = 1 − ᾱ_t/ᾱ_{t−1}, with
  ᾱ_{−1} = 1, computed in float64."""
  alpha_bars = np.asarray(alpha_bars, np.float64)
  return from_betas(1.0 - alpha_bars / np.append(1.0, alpha_bars[:-1]))


def linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM (Ho et al. 2020): β_t evenly spaced from beta_start to beta_end, in float64."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def linear(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """The schedule of `linear_betas`."""
  return from_betas(linear_betas(num_timesteps, beta_start, beta_end))


def scaled_linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> np.ndarray:
  """diffusers' scaled_linear (Stable Diffusion's, there with 0.00085 … 0.012): √β_t evenly
  spaced from √beta_start to √beta_end, squared, in float64."""
  return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps,
                     dtype=np.float64) ** 2


def cosine_alpha_bar(u, s: float = 0.008):
  """Improved DDPM's ᾱ(u) = cos²((u + s)/(1 + s) · π/2) / cos²(s/(1 + s) · π/2), u = t/T ∈ [0, 1]."""
  f = lambda v: np.cos((v + s) / (1.0 + s) * math.pi / 2) ** 2
  return f(np.asarray(u, dtype=np.float64)) / f(0.0)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM (Nichol & Dhariwal 2021): β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta), in
  float64."""
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = cosine_alpha_bar(u, s)
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """The schedule of `cosine_betas`."""
  return from_betas(cosine_betas(num_timesteps, s, max_beta))


def rescale_zero_terminal_snr(betas) -> np.ndarray:
  """Lin et al. 2024, Algorithm 1: √ᾱ_t shifted and scaled to (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 /
  (√ᾱ_0 − √ᾱ_{T−1}), so that √ᾱ_{T−1} = 0 (x_T is pure noise, SNR 0) and √ᾱ_0 is kept; the
  betas follow as 1 − ᾱ_t/ᾱ_{t−1} (the last one 1). In float64."""
  betas = np.asarray(betas, np.float64)
  if betas.size < 2:
    raise ValueError("rescaling to zero terminal SNR needs at least 2 timesteps")
  sqrt_alpha_bars = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_alpha_bars[0], sqrt_alpha_bars[-1]
  alpha_bars = np.square((sqrt_alpha_bars - last) * first / (first - last))
  return 1.0 - alpha_bars / np.append(1.0, alpha_bars[:-1])


# Each schedule's betas by name: config.diffusion.schedule, its options schedule_kwargs.
SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas,
             "cosine": cosine_betas}


def schedule_options(name: str, options) -> dict:
  """The `options` (config.diffusion.schedule_kwargs) for schedule `name`. The default config
  carries linear's options at their defaults: another schedule's option left at its default is
  dropped, so that --config.diffusion.schedule=cosine works alone; every other option is kept,
  for the schedule to refuse if it is not its own."""
  own = inspect.signature(SCHEDULES[name]).parameters
  others_defaults = {option: parameter.default for betas_fn in SCHEDULES.values()
                     for option, parameter in inspect.signature(betas_fn).parameters.items()
                     if option not in own}
  return {option: value for option, value in dict(options).items()
          if option not in others_defaults or value != others_defaults[option]}


def from_config(diffusion_config) -> Schedule:
  """The schedule that `config.diffusion` names (`schedule`, `num_timesteps`, and its options
  from `schedule_options`), rescaled to zero terminal SNR where `rescale_zero_terminal_snr` is
  set (absent, as in configs saved before it: not)."""
  name = validation.one_of("schedule", diffusion_config.schedule, SCHEDULES, "schedule")
  options = schedule_options(name, diffusion_config.get("schedule_kwargs", {}))
  betas = SCHEDULES[name](diffusion_config.num_timesteps, **options)
  if diffusion_config.get("rescale_zero_terminal_snr", False):
    betas = rescale_zero_terminal_snr(betas)
  return from_betas(betas)


SPACINGS = ("uniform", "trailing", "quadratic", "logsnr", "karras")
KARRAS_RHO = 7.0
KARRAS_LOG_SNR_FLOOR = -5.0


def spaced_timesteps(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """`num_steps` distinct timesteps of 0 … T−1, increasing.

  uniform:   round(linspace(0, T−1, K))       — even steps, first 0 and last T−1 (iDDPM, DDIM);
  trailing:  round(i·T/K) − 1, i = 1 … K      — even steps ending at T−1 (Lin et al. 2024);
  quadratic: round(linspace(0, √(0.8·T), K)²) — dense near t = 0 (DDIM's CIFAR-10 choice);
  logsnr:    even steps in λ = log(√ᾱ/√(1−ᾱ)) from t = T−1 to 0 (DPM-Solver's choice); where
             ᾱ_{T−1} = 0 (zero terminal SNR, λ = −∞), T−1 and then the steps as from T−2.
  karras:    even steps in σ^{1/ρ}, σ = e^{−λ}, ρ = 7 (Karras et al. 2022, eq. 5), from σ_max to
             σ_min = σ_0; a step is Δλ ∝ σ^{−1/ρ}, so against logsnr, short steps at high noise
             and long ones at low noise. σ_max is σ_{T−1}, but at most e^5 (λ ≥ −5, where
             DPM-Solver ends its cosine schedule), so that a schedule that lingers at pure noise
             (cosine: λ_{T−1} ≈ −10) spends no steps there; T−1 stays the first step.
  Rounding collisions are pushed apart so that the K timesteps are distinct.
  """
  num_timesteps = schedule.num_timesteps
  if not 1 <= num_steps <= num_timesteps:
    raise ArgumentError("num_steps", num_steps, f"expected 1 … T = {num_timesteps}")
  if spacing == "uniform":
    steps = np.linspace(0, num_timesteps - 1, num_steps)
  elif spacing == "trailing":
    steps = np.arange(1, num_steps + 1) * num_timesteps / num_steps - 1
  elif spacing == "quadratic":
    steps = np.linspace(0, np.sqrt(0.8 * num_timesteps), num_steps) ** 2
  elif spacing in ("logsnr", "karras"):
    alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
    with np.errstate(divide="ignore"):
      log_snr = 0.5 * (np.log(alpha_bars) - np.log1p(-alpha_bars))  # decreasing in t
    finite = np.isfinite(log_snr)  # all but λ_{T−1} = −∞ of a zero-terminal-SNR schedule
    lowest, highest = log_snr[finite][-1], log_snr[0]
    if spacing == "logsnr":
      targets = np.linspace(lowest, highest, num_steps)
    else:  # σ^{1/ρ} = e^{−λ/ρ}, even from σ_max^{1/ρ} to σ_min^{1/ρ}
      lowest = max(lowest, KARRAS_LOG_SNR_FLOOR)
      targets = -KARRAS_RHO * np.log(np.linspace(
          np.exp(-lowest / KARRAS_RHO), np.exp(-highest / KARRAS_RHO), num_steps))
    steps = np.interp(targets, log_snr[finite][::-1], np.flatnonzero(finite)[::-1])[::-1]
    steps[-1] = num_timesteps - 1
  else:
    validation.one_of("spacing", spacing, SPACINGS, "spacing")
  steps = np.clip(np.round(steps).astype(np.int64), 0, num_timesteps - 1)
  for i in range(1, num_steps):
    steps[i] = max(steps[i], steps[i - 1] + 1)
  for i in range(num_steps - 1, -1, -1):
    steps[i] = min(steps[i], num_timesteps - num_steps + i)
  return steps


def respace(schedule: Schedule, timesteps) -> Schedule:
  """The process that visits only `timesteps` (Improved DDPM §4): ᾱ'_i = ᾱ_{timesteps[i]}, so
  β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}} = 1 − ∏_{S_{i−1} < s ≤ S_i} (1 − β_s), computed in float64."""
  timesteps = np.asarray(timesteps)
  if timesteps.ndim != 1 or np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 \
      or timesteps[-1] >= schedule.num_timesteps:
    raise ArgumentError("timesteps", timesteps.tolist(), "expected strictly increasing indices "
                        "into the schedule")
  alphas = 1.0 - np.asarray(schedule.betas, np.float64)
  bounds = np.append(-1, timesteps)
  betas = [1.0 - np.prod(alphas[lo + 1:hi + 1]) for lo, hi in zip(bounds[:-1], bounds[1:])]
  return from_betas(betas)
