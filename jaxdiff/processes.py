"""Noise processes as values: x_t = α(t)·x0 + σ(t)·ε, each with the network's time input, the
training distribution of t and the network's target.

A process says
  alpha_sigma(t)                 α(t), σ(t), shaped like t
  q_sample(x0, t, ε)             x_t = α(t) x0 + σ(t) ε
  network_inputs(x_t, t)         (c_in(t)·x_t, c_noise(t)): what the network sees
  eps_and_x0(x_t, t, F)          (ε̂, x̂0): what the network's output F means
  sample_time(key, n)            n draws of t from the training distribution
  training_target(x0, ε, x_t, t) the output F that is exactly right for (x0, ε) at t
  sampling_grid(K, spacing)      the K steps a sampler visits (`Grid`)

Three of them:
  DDPM  the discrete variance-preserving chain (Ho et al. 2020): t = 0 … T−1 indexes a
        `Schedule`, α = √ᾱ_t, σ = √(1−ᾱ_t); the network sees (x_t, t) and predicts ε, x0 or v.
  EDM   Karras et al. 2022: t = σ, α = 1; the network F is preconditioned, D(x; σ) =
        c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)), trained at log-normal σ.
  Flow  rectified flow / flow matching (Liu et al. 2023, Lipman et al. 2023): α = 1 − t, σ = t,
        t ∈ [0, 1]; the network predicts the velocity v = ε − x0 at uniform or logit-normal t.

Every sampler runs on the same footing, a `Grid`: a variance-preserving schedule indexed by
step (ᾱ_i = α_i²/(α_i² + σ_i²): x_t/√(α² + σ²) is a VP process with the same x̂0 and ε̂, so the
samplers written on ᾱ run on every process), with the process's own time at each step.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, schedules, validation
from jaxdiff.errors import ArgumentError
from jaxdiff.schedules import Schedule


class Grid(NamedTuple):
  """The K steps a sampler visits: `schedule`, the equivalent variance-preserving chain indexed
  by step i = 0 … K−1 (ᾱ'_i; ᾱ'_{−1} = 1 is the clean end), `timesteps` [K], the process's time
  t_i at each step (what the network is shown, through `network_inputs`), and `scales` [K]
  (None for DDPM, where they are all 1), √(α_i² + σ_i²): x_t = scales_i · x_i^VP."""

  schedule: Schedule
  timesteps: jax.Array
  scales: jax.Array | None = None


def _expand(coefficient, x):
  """A per-example coefficient [B] (or a scalar) shaped to broadcast against x [B, …]."""
  coefficient = jnp.asarray(coefficient)
  return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))


def _continuous_grid(times: np.ndarray, alpha_sigma) -> Grid:
  """The grid of increasing float64 `times` of a continuous process."""
  alpha, sigma = alpha_sigma(times)
  norm_squared = alpha**2 + sigma**2
  return Grid(schedules.from_alpha_bars(alpha**2 / norm_squared),
              jnp.asarray(times, jnp.float32), jnp.asarray(np.sqrt(norm_squared), jnp.float32))


def rho_spaced(low: float, high: float, num_steps: int, rho: float) -> np.ndarray:
  """`num_steps` values from `low` to `high`, even in v^{1/ρ} (Karras et al. 2022, eq. 5, in
  increasing order), float64."""
  if num_steps == 1:
    return np.array([high], np.float64)
  return np.linspace(low ** (1 / rho), high ** (1 / rho), num_steps) ** rho


@dataclasses.dataclass(frozen=True, eq=False)
class EDM:
  """Karras et al. 2022 ("Elucidating the design space", Table 1): α = 1, σ(t) = t;

      c_skip = σ_d²/(σ² + σ_d²),  c_out = σ σ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),
      c_noise = ¼ ln σ,           D(x; σ) = c_skip x + c_out F(c_in x; c_noise),

  training σ ~ exp(N(P_mean, P_std²)), loss λ(σ)‖D − x0‖² with λ = (σ² + σ_d²)/(σ σ_d)²; as
  λ c_out² = 1, that is ‖F − F_target‖² with F_target = (x0 − c_skip x)/c_out, unweighted.
  Sampling σ lies in [sigma_min, sigma_max], by default with ρ = 7 spacing (eq. 5)."""

  sigma_data: float = 0.5
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  p_mean: float = -1.2
  p_std: float = 1.2

  name = "edm"
  spacings = ("karras", "logsnr", "uniform")

  def preconditioning(self, sigma):
    """(c_skip, c_out, c_in, c_noise) at σ."""
    sigma_data = self.sigma_data
    norm = jnp.sqrt(sigma**2 + sigma_data**2)
    return sigma_data**2 / norm**2, sigma * sigma_data / norm, 1 / norm, jnp.log(sigma) / 4

  def alpha_sigma(self, t):
    return jnp.ones_like(t), t

  def q_sample(self, x0, t, noise):
    return x0 + _expand(t, x0) * noise

  def network_inputs(self, x_t, t):
    _, _, c_in, c_noise = self.preconditioning(t)
    return _expand(c_in, x_t) * x_t, c_noise

  def eps_and_x0(self, x_t, t, output):
    c_skip, c_out, _, _ = self.preconditioning(t)
    x0 = _expand(c_skip, x_t) * x_t + _expand(c_out, x_t) * output
    return (x_t - x0) / _expand(t, x_t), x0

  def sample_time(self, key, num):
    return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (num,)))

  def training_target(self, x0, noise, x_t, t):
    del noise
    c_skip, c_out, _, _ = self.preconditioning(t)
    return (x0 - _expand(c_skip, x_t) * x_t) / _expand(c_out, x_t)

  def sampling_grid(self, num_steps: int, spacing: str) -> Grid:
    """σ_0 < … < σ_{K−1} from sigma_min to sigma_max: ρ-spaced (karras), even in λ = −ln σ
    (logsnr) or even in σ (uniform); the last step lands on σ = 0."""
    validation.whole("num_steps", num_steps, 1)
    low, high = self.sigma_min, self.sigma_max
    sigmas = {"karras": lambda: rho_spaced(low, high, num_steps, self.rho),
              "logsnr": lambda: np.exp(np.linspace(math.log(low), math.log(high), num_steps)),
              "uniform": lambda: np.linspace(low, high, num_steps)}
    validation.one_of("spacing", spacing, sigmas, "spacing of this process")
    return _continuous_grid(sigmas[spacing](), lambda s: (np.ones_like(s), s))

  def time_at(self, alpha_bar):
    """σ at a VP ᾱ: √(1/ᾱ − 1)."""
    return jnp.sqrt(1 / alpha_bar - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class Flow:
  """Rectified flow / flow matching: x_t = (1 − t) x0 + t ε, t ∈ [0, 1]; the network predicts the
  velocity v = dx_t/dt = ε − x0, so x̂0 = x_t − t v̂ and ε̂ = x_t + (1 − t) v̂. Training t is
  uniform, or logit-normal: t = sigmoid(N(logit_mean, logit_std²)) (Esser et al. 2024). The
  network is shown c_noise = 1000 t, the range of DDPM's step index its embedding is made for.
  Sampling t lies in [t_min, 1]; t = 1 is pure noise (zero terminal SNR)."""

  time_distribution: str = "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  t_min: float = 1e-3

  name = "flow"
  spacings = ("uniform", "logsnr", "karras")
  TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
  NETWORK_TIME_SCALE = 1000.0

  def __post_init__(self):
    validation.one_of("time_distribution", self.time_distribution, self.TIME_DISTRIBUTIONS,
                      "time distribution")

  def alpha_sigma(self, t):
    return 1 - t, t

  def q_sample(self, x0, t, noise):
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise

  def network_inputs(self, x_t, t):
    return x_t, self.NETWORK_TIME_SCALE * t

  def eps_and_x0(self, x_t, t, output):
    t = _expand(t, x_t)
    return x_t + (1 - t) * output, x_t - t * output

  def sample_time(self, key, num):
    if self.time_distribution == "uniform":
      return jax.random.uniform(key, (num,))
    return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (num,)))

  def training_target(self, x0, noise, x_t, t):
    del x_t, t
    return noise - x0

  def sampling_grid(self, num_steps: int, spacing: str) -> Grid:
    """t_0 < … < t_{K−1} = 1: even in t from t_min (uniform), even in λ = ln((1 − t)/t) or in
    σ̃^{1/ρ} = (t/(1 − t))^{1/ρ} (karras, ρ = 7) from t_min to the t of λ = −5 (as DPM-Solver
    caps its cosine schedule), the first step at t = 1; the last step lands on t = 0."""
    validation.whole("num_steps", num_steps, 1)
    lowest = 1 / (1 + math.exp(-5.0))  # t where λ = −5
    to_t = lambda ratios: ratios / (1 + ratios)  # σ̃ = t/(1 − t) → t
    low = self.t_min / (1 - self.t_min)
    times = {
        "uniform": lambda: np.linspace(self.t_min, 1.0, num_steps),
        "logsnr": lambda: np.append(to_t(np.exp(np.linspace(
            math.log(low), math.log(lowest / (1 - lowest)), num_steps - 1))), 1.0),
        "karras": lambda: np.append(to_t(rho_spaced(low, lowest / (1 - lowest), num_steps - 1,
                                                    7.0)), 1.0),
    }
    validation.one_of("spacing", spacing, times, "spacing of this process")
    chosen = times[spacing]() if num_steps > 1 or spacing == "uniform" else np.ones(1)
    return _continuous_grid(np.asarray(chosen, np.float64)[-num_steps:],
                            lambda t: (1 - t, t))

  def time_at(self, alpha_bar):
    """t at a VP ᾱ: σ_VP/(α_VP + σ_VP)."""
    alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    return sigma / (alpha + sigma)
