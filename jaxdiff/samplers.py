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
from jaxdiff.processes import Grid
from jaxdiff.schedules import SPACINGS, Schedule

# (ε̂, x̂0) of the denoiser at a point, with the run's guidance and x̂0 policy (see `run`).
Denoise = Callable[..., tuple[jax.Array, jax.Array]]


class StepInputs(NamedTuple):
  """What a step sees besides x_i: the step index i into the grid (a scalar), a key of its own,
  the denoiser's estimates ε̂ and x̂0 at x_i (x̂0 clipped or thresholded; None for a sampler that
  does not want them), and, for samplers that call the denoiser more than once a step,
  `denoise(x, j)` at grid step j and `denoise_between(x, ᾱ)` at any ᾱ of a continuous process
  (x the VP variable, as the step's own)."""

  index: jax.Array
  key: jax.Array
  eps: jax.Array | None
  x0: jax.Array | None
  denoise: Denoise | None = None
  denoise_between: Denoise | None = None


class Sampler(NamedTuple):
  """`init(x_T) -> state`; `step(x_i, state, inputs, schedule) -> (x_{i−1}, state)`. Both pure;
  `state` is any pytree the sampler carries from step to step (() for one-step methods).
  `evaluated`: the driver calls the denoiser at x_i for the step (False for a sampler that
  calls it itself, elsewhere)."""

  init: Callable[[jax.Array], Any]
  step: Callable[[jax.Array, Any, StepInputs, Schedule], tuple[jax.Array, Any]]
  evaluated: bool = True


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


def _ode_point(alpha_bar, ode_slopes):
  """(τ, n) at a VP ᾱ of the process's own ODE variable x_ode = n·x = a(τ) x0 + b(τ) ε, where
  a = 1 + a'τ, b = b'τ (`ode_slopes` = (a', b'): (0, 1) for x̃ = x/√ᾱ and σ̃, EDM's; (−1, 1) for
  rectified flow's x and t). With α = √ᾱ, σ = √(1−ᾱ): τ = σ/(b'α − a'σ), n = b'/(b'α − a'σ)."""
  slope_a, slope_b = ode_slopes
  alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
  denominator = slope_b * alpha - slope_a * sigma
  return sigma / denominator, slope_b / denominator


def _heun_step(x_ode, tau, slope, tau_next, n_next, inputs: StepInputs, ode_slopes):
  """x at τ_next by Heun's method from x_ode at τ, where dx_ode/dτ = `slope`: the Euler step,
  then the average of the slopes at both ends (the one at τ_next from the denoiser at grid step
  i − 1, dx_ode/dτ = a' x̂0 + b' ε̂); at the last step, which lands on the clean end, Euler alone
  (EDM, Algorithm 1). Returns the VP variable."""
  euler = x_ode + (tau_next - tau) * slope

  def corrected():
    eps, x0 = inputs.denoise(euler / n_next, inputs.index - 1)
    return x_ode + (tau_next - tau) * 0.5 * (slope + ode_slopes[0] * x0 + ode_slopes[1] * eps)

  return jax.lax.cond(inputs.index > 0, corrected, lambda: euler) / n_next


def euler(ode_slopes=(0.0, 1.0)) -> Sampler:
  """Euler's method on the probability-flow ODE in the process's own variables (`_ode_point`),
  dx_ode/dτ = a' x̂0 + b' ε̂: x_ode(τ_{i−1}) = x_ode(τ_i) + (τ_{i−1} − τ_i)(a' x̂0_i + b' ε̂_i).
  On rectified flow that is x_{t'} = x_t + (t' − t) v̂; for every process it equals DDIM (η = 0)."""

  def update(x, inputs, schedule):
    tau, n = _ode_point(schedule.alpha_bars[inputs.index], ode_slopes)
    tau_next, n_next = _ode_point(schedule.alpha_bars_prev[inputs.index], ode_slopes)
    slope = ode_slopes[0] * inputs.x0 + ode_slopes[1] * inputs.eps
    return (n * x + (tau_next - tau) * slope) / n_next

  return _stateless(update)


def heun(ode_slopes=(0.0, 1.0)) -> Sampler:
  """Heun's second-order method on the same ODE as `euler` (EDM, Algorithm 1: σ(t) = t, s = 1
  for EDM; t and v for rectified flow): 2K − 1 network calls for K steps."""

  def update(x, inputs, schedule):
    tau, n = _ode_point(schedule.alpha_bars[inputs.index], ode_slopes)
    tau_next, n_next = _ode_point(schedule.alpha_bars_prev[inputs.index], ode_slopes)
    slope = ode_slopes[0] * inputs.x0 + ode_slopes[1] * inputs.eps
    return _heun_step(n * x, tau, slope, tau_next, n_next, inputs, ode_slopes)

  return _stateless(update)


def edm_stochastic(s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                   s_noise: float = 1.0) -> Sampler:
  """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), on EDM's process (σ̃ = σ):
  at step i, with γ_i = min(S_churn/K, √2 − 1) where S_tmin ≤ σ_i ≤ S_tmax (else 0),
  σ̂ = (1 + γ_i) σ_i and x̂ = x_i + √(σ̂² − σ_i²) S_noise z, z ~ N(0, I); then Heun's step from
  (x̂, σ̂) to σ_{i−1} with dx/dσ = (x̂ − D(x̂; σ̂))/σ̂ = ε̂. S_churn = 0 is `heun`."""

  def update(x, inputs, schedule):
    alpha_bar = schedule.alpha_bars[inputs.index]
    sigma = jnp.sqrt(1 / alpha_bar - 1)
    churn = min(s_churn / schedule.num_timesteps, math.sqrt(2) - 1)
    sigma_hat = sigma * (1 + jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), churn, 0.0))
    noise = jax.random.normal(inputs.key, x.shape, x.dtype)
    x_hat = x / jnp.sqrt(alpha_bar) + jnp.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise
    alpha_bar_hat = 1 / (1 + sigma_hat**2)
    eps, _ = inputs.denoise_between(x_hat * jnp.sqrt(alpha_bar_hat), alpha_bar_hat)
    tau_next, n_next = _ode_point(schedule.alpha_bars_prev[inputs.index], (0.0, 1.0))
    return _heun_step(x_hat, sigma_hat, eps, tau_next, n_next, inputs, (0.0, 1.0))

  sampler = _stateless(update)
  return sampler._replace(evaluated=False)


def dynamic_threshold(x0, percentile: float):
  """Imagen's dynamic thresholding (Saharia et al. 2022): per sample s = max(q_p(|x̂0|), 1),
  x̂0 ← clip(x̂0, −s, s)/s, so x̂0 ∈ [−1, 1] without flattening everything beyond ±1."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  scale = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  scale = scale.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -scale, scale) / scale


def _x0_policy(x, eps, x0, clip_x0: bool, threshold_percentile: float | None, predict_eps):
  """x̂0 clipped to [−1, 1] (`clip_x0`), then dynamically thresholded, and ε̂ recomputed from it
  by `predict_eps(x, x̂0)`; (ε̂, x̂0) unchanged when neither applies."""
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = predict_eps(x, x0)
  if threshold_percentile is not None:
    x0 = dynamic_threshold(x0, threshold_percentile)
    eps = predict_eps(x, x0)
  return eps, x0


def _denoisers(denoiser: Denoiser, params, grid: Grid, options: "SamplingOptions", labels):
  """(denoise(x, j), denoise_between(x, ᾱ)): (ε̂, x̂0) at grid step j [scalar], and at a VP ᾱ
  off the grid (continuous processes), x the VP variable; the network under guidance, x̂0 under
  the options' policy."""
  process = denoiser.process
  policy = functools.partial(_x0_policy, clip_x0=options.clip_x0,
                             threshold_percentile=options.threshold_percentile)

  def output_at(x_t, t):
    return denoiser.output(params, x_t, jnp.full(x_t.shape[:1], t, t.dtype), labels,
                           options.guidance_scale)

  def denoise(x, j):
    t, index = grid.timesteps[j], jnp.full(x.shape[:1], j, jnp.int32)
    x_t = x if grid.scales is None else grid.scales[j] * x
    eps, x0 = process.eps_and_x0_on_grid(grid, index, x, output_at(x_t, t))
    return policy(x, eps, x0, predict_eps=lambda x, x0: diffusion.predict_eps(
        grid.schedule, x, index, x0))

  def denoise_between(x, alpha_bar):
    t = process.time_at(alpha_bar)
    alpha, sigma = process.alpha_sigma(t)
    x_t = jnp.sqrt(alpha**2 + sigma**2) * x
    eps, x0 = process.eps_and_x0(x_t, t, output_at(x_t, t))
    return policy(x, eps, x0, predict_eps=lambda x, x0: (x - jnp.sqrt(alpha_bar) * x0)
                  / jnp.sqrt(1 - alpha_bar))

  return denoise, denoise_between


def run(sampler: Sampler, denoiser: Denoiser, params, grid: Grid, key, options: "SamplingOptions",
        *, labels=None, trajectory_every: int | None = None, x_init=None) -> Samples:
  """`sampler` from x_T to x0 in one `lax.scan` over the grid's steps i = K−1 … 0.

  x_T is `x_init`, or N(0, (1 − ᾱ_{K−1}) I) [options.batch_size, *image shape] (N(0, I) on
  DDPM's chain, as DDPM draws it) drawn with the first key of split(key); step i gets key
  K−1−i of split(second key, K) (the scan's i-th). The network sees the process's time
  grid.timesteps[i] (with `labels`, under classifier-free guidance `options.guidance_scale`:
  `Denoiser.output`); its output becomes (ε̂, x̂0) of the grid's VP variable; x̂0 is clipped to
  [−1, 1] by `options.clip_x0` (a bool here: see `SamplingOptions.resolved`), then dynamically
  thresholded at `options.threshold_percentile` if given, with ε̂ recomputed from it.
  """
  schedule, timesteps = grid.schedule, grid.timesteps
  num_steps = schedule.num_timesteps
  if trajectory_every is not None and trajectory_every < 1:
    raise ArgumentError("trajectory_every", trajectory_every, "expected a whole number ≥ 1")
  if labels is not None:
    denoiser.check_labels(labels)
  init_key, noise_key = jax.random.split(key)
  shape = (options.batch_size, *denoiser.image_shape)
  if x_init is None:
    x_init = jax.random.normal(init_key, shape, jnp.float32)
    if grid.scales is not None:
      x_init = jnp.sqrt(1 - schedule.alpha_bars[-1]) * x_init
  indices = jnp.arange(num_steps - 1, -1, -1)
  xs = (indices, jax.random.split(noise_key, num_steps))
  denoise, denoise_between = _denoisers(denoiser, params, grid, options, labels)

  def step(carry, xs):
    x, state = carry
    i, step_key = xs
    eps, x0 = denoise(x, i) if sampler.evaluated else (None, None)
    inputs = StepInputs(i, step_key, eps, x0, denoise, denoise_between)
    return sampler.step(x, state, inputs, schedule)

  carry = (x_init, sampler.init(x_init))
  if trajectory_every is None:
    (x, _), _ = jax.lax.scan(lambda carry, xs: (step(carry, xs), None), carry, xs)
    return Samples(x)
  num_frames = 1 + -(-num_steps // trajectory_every)
  frames = jnp.zeros((num_frames, *x_init.shape), x_init.dtype).at[0].set(x_init)

  def step_and_record(carry_and_frames, xs):
    carry, frames = carry_and_frames
    carry = step(carry, xs)
    # After n = K − i steps, write frame ⌈n/k⌉: its last write is the one after min(jk, K).
    frame = (num_steps - xs[0] + trajectory_every - 1) // trajectory_every
    return (carry, jax.lax.dynamic_update_index_in_dim(frames, carry[0], frame, 0)), None

  ((x, _), frames), _ = jax.lax.scan(step_and_record, (carry, frames), xs)
  return Samples(x, frames)


class Registered(NamedTuple):
  """A sampler's factory, the spacing of its timesteps by default on DDPM's chain and on the
  continuous processes (None there: the process's own, `spacings[0]`), whether it clips x̂0 to
  [−1, 1] by default, which `SamplingOptions` fields are its factory's keywords, whether it
  integrates the process's own ODE (`ode`: it takes the process's `ode_slopes`), and the
  processes it is defined for (None: every one)."""

  make: Callable[..., Sampler]
  spacing: str
  clip_x0: bool
  options: tuple[str, ...] = ()
  ode: bool = False
  processes: tuple[str, ...] | None = None
  continuous_spacing: str | None = None


SAMPLERS = {
    "ddpm": Registered(ddpm, spacing="uniform", clip_x0=True, options=("variance",)),
    "ddim": Registered(ddim, spacing="uniform", clip_x0=True, options=("eta",)),
    "dpm_solver": Registered(dpm_solver, spacing="logsnr", clip_x0=False,
                             continuous_spacing="logsnr"),
    "dpm_solver_3m": Registered(dpm_solver_3m, spacing="logsnr", clip_x0=False,
                                continuous_spacing="logsnr"),
    "dpm_solver_sde": Registered(functools.partial(dpm_solver, eta=1.0), spacing="logsnr",
                                 clip_x0=False, continuous_spacing="logsnr"),
    "unipc": Registered(unipc, spacing="logsnr", clip_x0=False, continuous_spacing="logsnr"),
    "euler": Registered(euler, spacing="karras", clip_x0=False, ode=True),
    "heun": Registered(heun, spacing="karras", clip_x0=False, ode=True),
    "edm_stochastic": Registered(edm_stochastic, spacing="karras", clip_x0=False,
                                 options=("s_churn", "s_tmin", "s_tmax", "s_noise"),
                                 processes=("edm",)),
}


def _check_fields(options: "SamplingOptions") -> None:
  """ArgumentError naming the first field of `options` out of its range, or a sampler's own
  option given to another sampler."""
  validation.one_of("sampler", options.sampler, SAMPLERS, "sampler")
  if options.num_steps is not None:
    validation.whole("num_steps", options.num_steps, 1)
  if options.spacing is not None:
    validation.one_of("spacing", options.spacing, SPACINGS, "spacing")
  validation.boolean("clip_x0", options.clip_x0, optional=True)
  if options.threshold_percentile is not None:
    validation.real("threshold_percentile", options.threshold_percentile, 0.0, 1.0,
                    low_included=False, high_included=True)
  validation.real("eta", options.eta, 0.0)
  validation.one_of("variance", options.variance, diffusion.VARIANCES, "variance")
  for name in ("s_churn", "s_tmin", "s_noise"):
    validation.real(name, getattr(options, name), 0.0)
  if not options.s_tmax > options.s_tmin:
    raise ArgumentError("s_tmax", options.s_tmax, f"must exceed s_tmin = {options.s_tmin}")
  validation.real("guidance_scale", options.guidance_scale, 0.0)
  validation.whole("batch_size", options.batch_size, 1)
  defaults = {field.name: field.default for field in dataclasses.fields(options)}
  own = SAMPLERS[options.sampler].options
  for name in {option for registered in SAMPLERS.values() for option in registered.options}:
    if name not in own and getattr(options, name) != defaults[name]:
      takers = [sampler for sampler, registered in SAMPLERS.items() if name in registered.options]
      raise ArgumentError(name, getattr(options, name), f"an option of sampler "
                          f"{' or '.join(takers)}, not of {options.sampler}")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to sample, as one value: `sampler` on `num_steps` steps (None: the process's default,
  all T on DDPM's chain) spaced by `spacing`, x̂0 clipped to [−1, 1] by `clip_x0` and/or
  dynamically thresholded at `threshold_percentile`, the sampler's own options (`eta` of ddim,
  `variance` of ddpm, EDM's S_churn, S_tmin, S_tmax and S_noise of edm_stochastic),
  classifier-free guidance `guidance_scale`, and `batch_size` images per compiled call.
  `spacing` and `clip_x0` None: the defaults (`resolved`). Checked on creation:
  errors.ArgumentError naming the field and its value."""

  sampler: str = "ddpm"
  num_steps: int | None = None
  spacing: str | None = None
  clip_x0: bool | None = None
  threshold_percentile: float | None = None
  eta: float = 0.0
  variance: str = "beta"
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = math.inf
  s_noise: float = 1.0
  guidance_scale: float = 0.0
  batch_size: int = 64

  def __post_init__(self):
    _check_fields(self)

  @classmethod
  def from_config(cls, section) -> "SamplingOptions":
    """The options a config section (`config.sample`, `config.eval`) names; the defaults for
    those it does not."""
    names = [field.name for field in dataclasses.fields(cls)]
    return cls(**{name: section[name] for name in names if name in section})

  def check_model(self, denoiser: Denoiser) -> None:
    """ArgumentError where these options cannot sample `denoiser`: a sampler not defined for
    its process, a spacing its process has not, more steps than DDPM's T, the ODE samplers at
    zero terminal SNR, or guidance for an unconditional model."""
    process, registered = denoiser.process, SAMPLERS[self.sampler]
    if registered.processes is not None and process.name not in registered.processes:
      raise ArgumentError("sampler", self.sampler, f"defined for the process "
                          f"{' or '.join(registered.processes)} only; this model's is "
                          f"{process.name}")
    if self.spacing is not None:
      validation.one_of("spacing", self.spacing, process.spacings,
                        f"spacing for the {process.name} process")
    if not process.continuous:
      num_timesteps = process.num_timesteps
      if self.num_steps is not None and self.num_steps > num_timesteps:
        raise ArgumentError("num_steps", self.num_steps, f"more than the model's T = "
                            f"{num_timesteps} diffusion steps; choose 1 … {num_timesteps}")
      if registered.ode and np.asarray(process.schedule.alpha_bars)[-1] == 0:
        raise ArgumentError("sampler", self.sampler, "integrates in σ̃ = √(1/ᾱ − 1), which is "
                            "infinite at zero terminal SNR; use ddim or a DPM-Solver")
    if self.guidance_scale and denoiser.num_classes < 1:
      raise ArgumentError("guidance_scale", self.guidance_scale, "this model is unconditional "
                          "(num_classes = 0): guidance needs a class-conditional model")

  def resolved(self, process) -> "SamplingOptions":
    """These options with every default made explicit for `process`: its default step count
    (DDPM: all T), the sampler's spacing for the process (logsnr for the DPM-Solvers and UniPC;
    else on DDPM's chain the sampler's own, on the others the process's) and the sampler's x̂0
    clipping where they are None."""
    registered = SAMPLERS[self.sampler]
    spacing = (registered.spacing if not process.continuous
               else registered.continuous_spacing or process.spacings[0])
    return dataclasses.replace(
        self, num_steps=process.default_steps() if self.num_steps is None else self.num_steps,
        spacing=self.spacing or spacing,
        clip_x0=registered.clip_x0 if self.clip_x0 is None else self.clip_x0)

  def make_sampler(self, process) -> Sampler:
    """The sampler, made with its own options (and `process`'s ODE where it integrates it)."""
    registered = SAMPLERS[self.sampler]
    keywords = {name: getattr(self, name) for name in registered.options}
    if registered.ode:
      keywords["ode_slopes"] = process.ode_slopes
    return registered.make(**keywords)


def sample(denoiser: Denoiser, params, key, options: SamplingOptions, *, labels=None,
           trajectory_every: int | None = None, x_init=None) -> Samples:
  """`run` of `options.sampler` on the grid of `options.num_steps` steps spaced by
  `options.spacing` that the denoiser's process makes, defaults as `SamplingOptions.resolved`
  says. The grid is NumPy on the host, so the process must be concrete: under `jax.jit`, close
  over the denoiser."""
  options.check_model(denoiser)
  options = options.resolved(denoiser.process)
  grid = denoiser.process.sampling_grid(options.num_steps, options.spacing)
  return run(options.make_sampler(denoiser.process), denoiser, params, grid, key, options,
             labels=labels, trajectory_every=trajectory_every, x_init=x_init)
