"""Samplers as (init, step) pairs of pure functions, all run by one `lax.scan` driver, `run`.

A sampler is `Sampler(init, step)`, like optax's GradientTransformation:

    state = init(x_T)
    x_{i−1}, state = step(x_i, state, StepInputs(index=i, key, eps=ε̂, x0=x̂0), schedule)

for i = K−1 … 0. `run` owns everything the samplers share: it draws x_T, splits the key, calls
the `Denoiser` at the model's timestep t_i (with classifier-free guidance when given labels),
turns its output into (ε̂, x̂0) (whichever of ε, x0 or v it predicts), clips or dynamically
thresholds x̂0, and records the trajectory. It runs on a `Grid`: a schedule indexed by step
i = 0 … K−1 and the network's timestep at each; `sampling_grid` makes the K-step one
(`respace(schedule, S)` with the K timesteps S from `spaced_timesteps`), which `sample`
does for you. How to sample travels as one value, `SamplingOptions`. Every run returns
`Samples(images, trajectory)`: with `trajectory_every=k`, trajectory[0] is x_T and
trajectory[j] is x after min(j·k, K) steps, so the last frame is the images; else trajectory
is None.

Adding a sampler: a factory returning its `Sampler` and one line in `SAMPLERS` (its default
spacing, whether it clips x̂0 by default, and which `SamplingOptions` fields it takes; a new
option is a field there). Clipping x̂0 to [−1, 1] is the default for DDPM and DDIM, made for
images in [−1, 1]; DPM-Solver++ defaults to neither clipping nor dynamic thresholding.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, schedules, validation
from jaxdiff.denoiser import Denoiser
from jaxdiff.errors import ArgumentError
from jaxdiff.schedules import Schedule

SPACINGS = ("uniform", "trailing", "leading", "quadratic", "logsnr", "karras")
KARRAS_RHO = 7.0
KARRAS_LOG_SNR_FLOOR = -5.0


def spaced_timesteps(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """`num_steps` distinct timesteps of 0 … T−1, increasing.

  uniform:   round(linspace(0, T−1, K))       — even steps, first 0 and last T−1 (iDDPM, DDIM);
  trailing:  round(i·T/K) − 1, i = 1 … K      — even steps ending at T−1 (Lin et al. 2024);
  leading:   i·⌊T/K⌋, i = 0 … K−1             — even whole steps from 0, so the last is
                                                 T−⌊T/K⌋ at most (diffusers' default);
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
  elif spacing == "leading":
    steps = np.arange(num_steps) * (num_timesteps // num_steps)
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
    raise ValueError("timesteps must be strictly increasing indices into the schedule")
  alphas = 1.0 - np.asarray(schedule.betas, np.float64)
  bounds = np.append(-1, timesteps)
  betas = [1.0 - np.prod(alphas[lo + 1:hi + 1]) for lo, hi in zip(bounds[:-1], bounds[1:])]
  return schedules.from_betas(betas)


class StepInputs(NamedTuple):
  """What a step sees besides x_i: the step index i into the (respaced) schedule (a scalar), a
  key of its own, and the denoiser's estimates ε̂ and x̂0 at x_i (x̂0 clipped or thresholded)."""

  index: jax.Array
  key: jax.Array
  eps: jax.Array
  x0: jax.Array


class Sampler(NamedTuple):
  """`init(x_T) -> state`; `step(x_i, state, inputs, schedule) -> (x_{i−1}, state)`. Both pure;
  `state` is any pytree the sampler carries from step to step (() for one-step methods)."""

  init: Callable[[jax.Array], Any]
  step: Callable[[jax.Array, Any, StepInputs, Schedule], tuple[jax.Array, Any]]


class Samples(NamedTuple):
  """x0 [batch, …] and, when asked for, the frames [1 + ⌈K/k⌉, batch, …] (else None)."""

  images: jax.Array
  trajectory: jax.Array | None = None


def _stateless(update) -> Sampler:
  """The sampler whose x_{i−1} = update(x_i, inputs, schedule) needs nothing from before."""
  return Sampler(init=lambda x_T: (),
                 step=lambda x, state, inputs, schedule: (update(x, inputs, schedule), ()))


def ddpm(variance: str = "beta") -> Sampler:
  """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on the full or a respaced chain:
  x_{i−1} = μ̃_i(x̂0, x_i) + σ_i z, z ~ N(0, I), with no noise at the last step;
  σ_i² = β_i or β̃_i by `variance`."""

  def update(x, inputs, schedule):
    # x̂0 given as an x0-prediction: the posterior at the x̂0 the driver made, unchanged.
    mean, log_variance, _ = diffusion.p_mean_variance(
        schedule, "x0", x, inputs.index, inputs.x0, False, variance)
    noise = jax.random.normal(inputs.key, x.shape, x.dtype)
    return mean + (inputs.index > 0) * jnp.exp(0.5 * log_variance) * noise

  return _stateless(update)


def ddim(eta: float = 0.0) -> Sampler:
  """DDIM (Song et al. 2021, eq. 12): from (x̂0, ε̂) at step i,

      x_{i−1} = √ᾱ_{i−1} x̂0 + √(1 − ᾱ_{i−1} − σ_i²) ε̂ + σ_i z,
      σ_i = η √((1 − ᾱ_{i−1})/(1 − ᾱ_i)) √(1 − ᾱ_i/ᾱ_{i−1}).

  η = 0 is deterministic given x_T; η = 1 is DDPM with σ_i² = β̃_i (same keys, same samples).
  """

  def update(x, inputs, schedule):
    alpha_bar = schedule.alpha_bars[inputs.index]
    alpha_bar_prev = schedule.alpha_bars_prev[inputs.index]
    sigma = eta * jnp.sqrt(
        (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    noise = jax.random.normal(inputs.key, x.shape, x.dtype)
    return (jnp.sqrt(alpha_bar_prev) * inputs.x0
            + jnp.sqrt(jnp.maximum(1 - alpha_bar_prev - sigma**2, 0.0)) * inputs.eps
            + sigma * noise)

  return _stateless(update)


def _log_snr(alpha_bar):
  """λ = log(α/σ) = ½ (log ᾱ − log(1 − ᾱ)): −∞ at ᾱ = 0 (zero terminal SNR), +∞ at ᾱ = 1."""
  return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


def dpm_solver(lower_order_final: bool = True, eta: float = 0.0) -> Sampler:
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction; deterministic at η = 0,
  DPM-Solver++(2M) SDE at η = 1 (diffusers' sde-dpmsolver++, k-diffusion's dpmpp_2m_sde).

  With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_{i−1} − λ_i, a step from i to i−1 is
      x_{i−1} = (σ_{i−1}/σ_i) e^{−ηh} x_i + α_{i−1} (1 − e^{−(1+η)h}) D
                + σ_{i−1} √(1 − e^{−2ηh}) z,   z ~ N(0, I),
      D = (1 + 1/(2r)) x̂0_i − 1/(2r) x̂0_{i+1},  r = h_{prev}/h;
  at η = 0 that is x_{i−1} = (σ_{i−1}/σ_i) x_i − α_{i−1} (e^{−h} − 1) D.
  Steps are first order (D = x̂0_i) at the start, at the end (which lands on ᾱ = 1, x = x̂0)
  and, with `lower_order_final` and fewer than 15 steps (as in diffusers), also the step
  before it, which steadies very short runs. The state is (x̂0_{i+1}, λ_{i+1}).
  """
  def init(x_T):
    return jnp.zeros_like(x_T), jnp.zeros((), jnp.float32)

  def step(x, state, inputs, schedule):
    x0_before, lambda_before = state
    i, x0, num_steps = inputs.index, inputs.x0, schedule.num_timesteps
    final_first_order_steps = 2 if lower_order_final and num_steps < 15 else 1
    alpha_bar, alpha_bar_next = schedule.alpha_bars[i], schedule.alpha_bars_prev[i]
    lambda_now = _log_snr(alpha_bar)
    first_order = (i == num_steps - 1) | (i < final_first_order_steps)
    h = _log_snr(alpha_bar_next) - lambda_now
    r = (lambda_now - lambda_before) / jnp.where(first_order, 1.0, h)
    half_over_r = 0.5 / jnp.where(first_order, 1.0, r)
    data = jnp.where(first_order, x0, (1 + half_over_r) * x0 - half_over_r * x0_before)
    h = jnp.where(i == 0, 0.0, h)
    decay = jnp.exp(-eta * h) if eta else 1.0  # e^{−ηh}, also at h = ∞ (ᾱ_i = 0)
    x_next = (jnp.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * decay * x
              - jnp.sqrt(alpha_bar_next) * jnp.expm1(-(1 + eta) * h) * data)
    if eta:
      noise = jax.random.normal(inputs.key, x.shape, x.dtype)
      x_next = x_next + jnp.sqrt(-(1 - alpha_bar_next) * jnp.expm1(-2 * eta * h)) * noise
    return jnp.where(i == 0, x0, x_next), (x0, lambda_now)

  return Sampler(init, step)


def dpm_solver_3m(lower_order_final: bool = True) -> Sampler:
  """DPM-Solver++(3M) (Lu et al. 2022), data prediction, deterministic: the multistep update
  of diffusers' `DPMSolverMultistepScheduler(solver_order=3)` with the x̂0 of the two steps
  before, x̂0_{i+1} at λ_{i+1} and x̂0_{i+2} at λ_{i+2}. With `dpm_solver`'s α, σ, λ and
  h = λ_{i−1} − λ_i, φ1 = e^{−h} − 1, φ2 = φ1/h + 1, φ3 = φ2/h − ½:

      r0 = (λ_i − λ_{i+1})/h,  r1 = (λ_{i+1} − λ_{i+2})/h,
      D1_0 = (x̂0_i − x̂0_{i+1})/r0,  D1_1 = (x̂0_{i+1} − x̂0_{i+2})/r1,
      D1 = D1_0 + r0/(r0 + r1) (D1_0 − D1_1) ≈ h x̂0',  D2 = 2 (D1_0 − D1_1)/(r0 + r1) ≈ h² x̂0'',
      x_{i−1} = (σ_{i−1}/σ_i) x_i − α_{i−1} φ1 x̂0_i + α_{i−1} φ2 D1 − α_{i−1} φ3 D2,

  the Taylor expansion of x̂0 in λ integrated exactly to third order. diffusers (and the
  DPM-Solver code) take D2 without the factor 2, half its Taylor weight; that measures as a
  second-order method (float64, Gaussian data: error ∝ K^−2.2 against K^−4 here).
  The first step is first order and the second is `dpm_solver`'s 2M step (x̂0_i + ½ D1_0 in
  place of x̂0_i), the warm-up; the end lands on ᾱ = 1, x = x̂0. With `lower_order_final`
  and fewer than 15 steps the two steps before the end are second and first order (the
  order of step i is then at most i), as in diffusers. The state is
  (x̂0_{i+1}, λ_{i+1}, x̂0_{i+2}, λ_{i+2}).
  """
  def init(x_T):
    zero = jnp.zeros((), jnp.float32)
    return jnp.zeros_like(x_T), zero, jnp.zeros_like(x_T), zero

  def step(x, state, inputs, schedule):
    x0_before, lambda_before, x0_before2, lambda_before2 = state
    i, x0, num_steps = inputs.index, inputs.x0, schedule.num_timesteps
    lower_final = lower_order_final and num_steps < 15
    order = jnp.minimum(jnp.minimum(3, num_steps - i), jnp.where(lower_final, i, 3))
    alpha_bar, alpha_bar_next = schedule.alpha_bars[i], schedule.alpha_bars_prev[i]
    lambda_now = _log_snr(alpha_bar)
    h = jnp.where(i == 0, 1.0, _log_snr(alpha_bar_next) - lambda_now)
    r0 = jnp.where(order >= 2, (lambda_now - lambda_before) / h, 1.0)
    r1 = jnp.where(order >= 3, (lambda_before - lambda_before2) / h, 1.0)
    d1_0 = (x0 - x0_before) / r0
    d1_1 = (x0_before - x0_before2) / r1
    phi1 = jnp.expm1(-h)
    alpha_next = jnp.sqrt(alpha_bar_next)
    second = -0.5 * alpha_next * phi1 * d1_0
    phi2 = phi1 / h + 1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)
    third = alpha_next * phi2 * d1 - alpha_next * (phi2 / h - 0.5) * d2
    correction = jnp.where(order == 3, third, jnp.where(order == 2, second, 0.0))
    x_next = jnp.where(
        i == 0, x0,
        jnp.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * x - alpha_next * phi1 * x0
        + correction)
    return x_next, (x0, lambda_now, x0_before, lambda_before)

  return Sampler(init, step)


def _unipc_update(x, x0, alpha_bar, alpha_bar_next, r, x0_points, num_points):
  """UniPC's step (Zhao et al. 2023, data prediction) from x at ᾱ to ᾱ_next, with the x̂0 at x
  and, of the points x̂0_m at r_m = (λ_m − λ)/h (h = λ_next − λ; m over the leading axis), the
  first `num_points`:

      x_next = (σ_next/σ) x − α_next (e^{−h} − 1) x̂0 − α_next Σ_m w_m (x̂0_m − x̂0)/r_m,
      Σ_m w_m r_m^{k−1} = k! φ_k(−h) − 1,  k = 1 … n,  φ_1(z) = (e^z − 1)/z,
      φ_{k+1}(z) = (φ_k(z) − 1/k!)/z,

  x̂0 expanded in λ to order n and integrated exactly (the paper's w = B(h) a); as in the paper,
  one point takes a = ½ with B(h) = e^{−h} − 1 ("bh2"), w = (e^{−h} − 1)/2. A point at λ = −∞
  (zero terminal SNR) is infinitely far: it drops out, its weight the limit 0.
  """
  h = _log_snr(alpha_bar_next) - _log_snr(alpha_bar)
  alpha_next = jnp.sqrt(alpha_bar_next)
  x_next = jnp.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * x - alpha_next * jnp.expm1(-h) * x0
  size = r.shape[0]
  if size == 0:
    return x_next
  used = (jnp.arange(size) < num_points) & jnp.isfinite(r)
  count = used.sum()
  phi, targets = jnp.expm1(-h) / -h, []
  for k in range(1, size + 1):
    targets.append(math.factorial(k) * phi - 1)
    phi = (phi - 1 / math.factorial(k)) / -h
  rows = jnp.arange(size)[:, None]
  inside = (rows < count) & used[None, :]
  powers = jnp.where(inside, jnp.where(used, r, 1.0)[None, :] ** rows, rows == jnp.arange(size))
  weights = jnp.linalg.solve(powers, jnp.where(jnp.arange(size) < count, jnp.stack(targets), 0))
  weights = jnp.where(num_points == 1, (jnp.arange(size) == 0) * jnp.expm1(-h) / 2, weights)
  slopes = jnp.where(used.reshape((-1,) + (1,) * x.ndim),
                     (x0_points - x0) / jnp.where(used, r, 1.0).reshape((-1,) + (1,) * x.ndim), 0)
  return x_next - alpha_next * jnp.tensordot(weights, slopes, 1)


def unipc(order: int = 2, lower_order_final: bool = True) -> Sampler:
  """UniPC (Zhao et al. 2023): the UniP-p predictor with the UniC-p corrector, data prediction,
  B(h) = e^h − 1 ("bh2"), deterministic; one network call per step.

  Step i first corrects x_i, which step i+1 predicted, with the network's x̂0_i there (UniC):
  `_unipc_update` from x_{i+1} again, its points those of step i+1's prediction and x̂0_i
  (r = 1), one order more; x̂0_i is kept as it is (no second call). It then predicts x_{i−1}
  from the corrected x_i with the points x̂0_{i+1} … x̂0_{i+p−1} (UniP-p; UniP-2 is
  DPM-Solver++(2M)), p = min(order, K − i) and, with `lower_order_final`, p ≤ i + 1. The last
  step lands on ᾱ = 1 (x = x̂0_0) with no corrector after it. UniPC-p is of order p + 1. The
  state is (x_{i+1} corrected, [x̂0_{i+1}, …, x̂0_{i+order}]).
  """
  if order not in (1, 2, 3):
    raise ValueError(f"UniPC's order must be 1, 2 or 3, got {order}")

  def step_order(i, num_steps):
    return jnp.minimum(jnp.minimum(order, num_steps - i), i + 1 if lower_order_final else order)

  def init(x_T):
    return x_T, jnp.zeros((order, *x_T.shape), x_T.dtype)

  def step(x, state, inputs, schedule):
    x_before, x0s_before = state
    i, x0, num_steps = inputs.index, inputs.x0, schedule.num_timesteps
    alpha_bars = schedule.alpha_bars[jnp.minimum(i + jnp.arange(order + 1), num_steps - 1)]
    lambdas = _log_snr(alpha_bars)  # λ_i, λ_{i+1}, …, λ_{i+order}
    corrector_r = jnp.concatenate(
        [jnp.ones(1), (lambdas[2:] - lambdas[1]) / (lambdas[0] - lambdas[1])])
    corrected = _unipc_update(x_before, x0s_before[0], alpha_bars[1], alpha_bars[0], corrector_r,
                              jnp.concatenate([x0[None], x0s_before[1:]]),
                              step_order(i + 1, num_steps))
    x = jnp.where(i == num_steps - 1, x, corrected)
    alpha_bar_next = schedule.alpha_bars_prev[i]
    predictor_r = (lambdas[1:order] - lambdas[0]) / (_log_snr(alpha_bar_next) - lambdas[0])
    x_next = _unipc_update(x, x0, alpha_bars[0], alpha_bar_next, predictor_r,
                           x0s_before[:order - 1], step_order(i, num_steps) - 1)
    return (jnp.where(i == 0, x0, x_next),
            (x, jnp.concatenate([x0[None], x0s_before[:-1]])))

  return Sampler(init, step)


def dynamic_threshold(x0, percentile: float):
  """Imagen's dynamic thresholding (Saharia et al. 2022): per sample s = max(q_p(|x̂0|), 1),
  x̂0 ← clip(x̂0, −s, s)/s, so x̂0 ∈ [−1, 1] without flattening everything beyond ±1."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  scale = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  scale = scale.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -scale, scale) / scale


class Grid(NamedTuple):
  """The K steps a sampler visits: `schedule` indexed by step i = 0 … K−1 (the respaced chain,
  ᾱ'_i = ᾱ_{t_i}) and `timesteps` [K], the network's timestep t_i at each step."""

  schedule: Schedule
  timesteps: jax.Array


def sampling_grid(schedule: Schedule, num_steps: int, spacing: str) -> Grid:
  """The grid of `num_steps` timesteps spaced by `spacing` (`spaced_timesteps`) on `schedule`.
  NumPy on the host: `schedule` must be concrete (under `jax.jit`, close over it)."""
  timesteps = spaced_timesteps(schedule, num_steps, spacing)
  return Grid(respace(schedule, timesteps), jnp.asarray(timesteps))


def run(sampler: Sampler, denoiser: Denoiser, params, grid: Grid, key, options: "SamplingOptions",
        *, labels=None, trajectory_every: int | None = None, x_init=None) -> Samples:
  """`sampler` from x_T to x0 in one `lax.scan` over the grid's steps i = K−1 … 0.

  x_T is `x_init`, or N(0, I) [options.batch_size, *image shape] drawn with the first key of
  split(key); step i gets key i of split(second key, K). The network sees t = grid.timesteps[i]
  (with `labels`, under classifier-free guidance `options.guidance_scale`: `Denoiser.output`);
  its output becomes (ε̂, x̂0) on the grid's schedule; x̂0 is clipped to [−1, 1] by
  `options.clip_x0` (a bool here: see `SamplingOptions.resolved`), then dynamically
  thresholded at `options.threshold_percentile` if given, with ε̂ recomputed from it.
  """
  schedule, timesteps = grid
  num_steps = schedule.num_timesteps
  if trajectory_every is not None and trajectory_every < 1:
    raise ArgumentError("trajectory_every", trajectory_every, "expected a whole number ≥ 1")
  if labels is not None:
    denoiser.check_labels(labels)
  init_key, noise_key = jax.random.split(key)
  shape = (options.batch_size, *denoiser.image_shape)
  x = jax.random.normal(init_key, shape, jnp.float32) if x_init is None else x_init
  indices = jnp.arange(num_steps - 1, -1, -1)
  xs = (indices, timesteps[indices], jax.random.split(noise_key, num_steps))

  def step(carry, xs):
    x, state = carry
    i, t, step_key = xs
    index = jnp.full(x.shape[:1], i, jnp.int32)
    output = denoiser.output(params, x, jnp.full(x.shape[:1], t, jnp.int32), labels,
                             options.guidance_scale)
    eps, x0 = diffusion.eps_and_x0(schedule, denoiser.prediction, x, index, output,
                                   options.clip_x0)
    if options.threshold_percentile is not None:
      x0 = dynamic_threshold(x0, options.threshold_percentile)
      eps = diffusion.predict_eps(schedule, x, index, x0)
    return sampler.step(x, state, StepInputs(i, step_key, eps, x0), schedule)

  carry = (x, sampler.init(x))
  if trajectory_every is None:
    (x, _), _ = jax.lax.scan(lambda carry, xs: (step(carry, xs), None), carry, xs)
    return Samples(x)
  num_frames = 1 + -(-num_steps // trajectory_every)
  frames = jnp.zeros((num_frames, *x.shape), x.dtype).at[0].set(x)

  def step_and_record(carry_and_frames, xs):
    carry, frames = carry_and_frames
    carry = step(carry, xs)
    # After n = K − i steps, write frame ⌈n/k⌉: its last write is the one after min(jk, K).
    frame = (num_steps - xs[0] + trajectory_every - 1) // trajectory_every
    return (carry, jax.lax.dynamic_update_index_in_dim(frames, carry[0], frame, 0)), None

  ((x, _), frames), _ = jax.lax.scan(step_and_record, (carry, frames), xs)
  return Samples(x, frames)


class Registered(NamedTuple):
  """A sampler's factory, the spacing of its timesteps by default, whether it clips x̂0 to
  [−1, 1] by default, and which `SamplingOptions` fields are its factory's keywords."""

  make: Callable[..., Sampler]
  spacing: str
  clip_x0: bool
  options: tuple[str, ...] = ()


SAMPLERS = {
    "ddpm": Registered(ddpm, spacing="uniform", clip_x0=True, options=("variance",)),
    "ddim": Registered(ddim, spacing="uniform", clip_x0=True, options=("eta",)),
    "dpm_solver": Registered(dpm_solver, spacing="logsnr", clip_x0=False),
    "dpm_solver_3m": Registered(dpm_solver_3m, spacing="logsnr", clip_x0=False),
    "dpm_solver_sde": Registered(functools.partial(dpm_solver, eta=1.0), spacing="logsnr",
                                 clip_x0=False),
    "unipc": Registered(unipc, spacing="logsnr", clip_x0=False),
}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to sample, as one value: `sampler` on `num_steps` timesteps (None: all T) spaced by
  `spacing`, x̂0 clipped to [−1, 1] by `clip_x0` and/or dynamically thresholded at
  `threshold_percentile`, the sampler's own options (`eta` of ddim, `variance` of ddpm),
  classifier-free guidance `guidance_scale`, and `batch_size` images per compiled call.
  `spacing` and `clip_x0` None: the sampler's registered defaults (`resolved`). Checked on
  creation: errors.ArgumentError naming the field and its value."""

  sampler: str = "ddpm"
  num_steps: int | None = None
  spacing: str | None = None
  clip_x0: bool | None = None
  threshold_percentile: float | None = None
  eta: float = 0.0
  variance: str = "beta"
  guidance_scale: float = 0.0
  batch_size: int = 64

  def __post_init__(self):
    validation.one_of("sampler", self.sampler, SAMPLERS, "sampler")
    if self.num_steps is not None:
      validation.whole("num_steps", self.num_steps, 1)
    if self.spacing is not None:
      validation.one_of("spacing", self.spacing, SPACINGS, "spacing")
    validation.boolean("clip_x0", self.clip_x0, optional=True)
    if self.threshold_percentile is not None:
      validation.real("threshold_percentile", self.threshold_percentile, 0.0, 1.0,
                      low_included=False, high_included=True)
    validation.real("eta", self.eta, 0.0)
    validation.one_of("variance", self.variance, diffusion.VARIANCES, "variance")
    validation.real("guidance_scale", self.guidance_scale, 0.0)
    validation.whole("batch_size", self.batch_size, 1)
    defaults = {field.name: field.default for field in dataclasses.fields(self)}
    own = SAMPLERS[self.sampler].options
    for name in {option for registered in SAMPLERS.values() for option in registered.options}:
      if name not in own and getattr(self, name) != defaults[name]:
        takers = [sampler for sampler, registered in SAMPLERS.items() if name in registered.options]
        raise ArgumentError(name, getattr(self, name), f"an option of sampler "
                            f"{' or '.join(takers)}, not of {self.sampler}")

  @classmethod
  def from_config(cls, section) -> "SamplingOptions":
    """The options a config section (`config.sample`, `config.eval`) names; the defaults for
    those it does not."""
    names = [field.name for field in dataclasses.fields(cls)]
    return cls(**{name: section[name] for name in names if name in section})

  def check_model(self, denoiser: Denoiser) -> None:
    """ArgumentError where these options cannot sample `denoiser`: more steps than its T, or
    guidance for an unconditional model."""
    num_timesteps = denoiser.schedule.num_timesteps
    if self.num_steps is not None and self.num_steps > num_timesteps:
      raise ArgumentError("num_steps", self.num_steps, f"more than the model's T = "
                          f"{num_timesteps} diffusion steps; choose 1 … {num_timesteps}")
    if self.guidance_scale and denoiser.num_classes < 1:
      raise ArgumentError("guidance_scale", self.guidance_scale, "this model is unconditional "
                          "(num_classes = 0): guidance needs a class-conditional model")

  def resolved(self, num_timesteps: int) -> "SamplingOptions":
    """These options with every default made explicit: all T steps, and the sampler's spacing
    and x̂0 clipping where they are None."""
    registered = SAMPLERS[self.sampler]
    return dataclasses.replace(
        self, num_steps=num_timesteps if self.num_steps is None else self.num_steps,
        spacing=self.spacing or registered.spacing,
        clip_x0=registered.clip_x0 if self.clip_x0 is None else self.clip_x0)

  def make_sampler(self) -> Sampler:
    """The sampler, made with its own options."""
    registered = SAMPLERS[self.sampler]
    return registered.make(**{name: getattr(self, name) for name in registered.options})


def sample(denoiser: Denoiser, params, key, options: SamplingOptions, *, labels=None,
           trajectory_every: int | None = None, x_init=None) -> Samples:
  """`run` of `options.sampler` on `options.num_steps` timesteps (default all T) spaced by
  `options.spacing` (`sampling_grid`), showing the network the original timesteps; defaults as
  `SamplingOptions.resolved` says. The grid is NumPy on the host, so the denoiser's schedule
  must be concrete: under `jax.jit`, close over the denoiser."""
  options.check_model(denoiser)
  options = options.resolved(denoiser.schedule.num_timesteps)
  grid = sampling_grid(denoiser.schedule, options.num_steps, options.spacing)
  return run(options.make_sampler(), denoiser, params, grid, key, options, labels=labels,
             trajectory_every=trajectory_every, x_init=x_init)
