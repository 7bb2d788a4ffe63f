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
class DDPM:
  """DDPM's discrete variance-preserving chain (Ho et al. 2020): t = 0 … T−1 indexes `schedule`,
  α = √ᾱ_t, σ = √(1−ᾱ_t); the network sees (x_t, t) and predicts `prediction` (ε, x0 or v);
  training t ~ U{0 … T−1}. Sampling steps are timesteps of the chain (`schedules.
  spaced_timesteps`) and the grid is the respaced chain (`schedules.respace`). Heun and Euler
  integrate in EDM's variables for VP processes, x̃ = x/√ᾱ and σ̃ = √(1/ᾱ − 1)."""

  schedule: Schedule
  prediction: str = "eps"

  name = "ddpm"
  spacings = schedules.SPACINGS
  ode_slopes = (0.0, 1.0)
  continuous = False
  FIXED_FIELDS = ("num_timesteps", "schedule", "prediction")

  def __post_init__(self):
    diffusion.check_prediction(self.prediction)

  @property
  def num_timesteps(self) -> int:
    return self.schedule.num_timesteps

  def alpha_sigma(self, t):
    return self.schedule.sqrt_alpha_bars[t], self.schedule.sqrt_one_minus_alpha_bars[t]

  def q_sample(self, x0, t, noise):
    return diffusion.q_sample(self.schedule, x0, t, noise)

  def network_inputs(self, x_t, t):
    return x_t, t

  def eps_and_x0(self, x_t, t, output):
    return diffusion.eps_and_x0(self.schedule, self.prediction, x_t, t, output)

  def eps_and_x0_on_grid(self, grid: Grid, index, x, output):
    """`eps_and_x0` on the respaced chain at step `index` [B] (its coefficients as sampling has
    always used them)."""
    return diffusion.eps_and_x0(grid.schedule, self.prediction, x, index, output)

  def sample_time(self, key, num):
    return jax.random.randint(key, (num,), 0, self.num_timesteps)

  def time_bin(self, t, num_bins: int):
    """Which of `num_bins` equal bins of 0 … T−1 each t [B] falls in: ⌊t·bins/T⌋."""
    return t * num_bins // self.num_timesteps

  def training_target(self, x0, noise, x_t, t):
    del x_t
    return diffusion.training_target(self.schedule, self.prediction, x0, t, noise)

  def default_steps(self) -> int:
    """All T steps."""
    return self.num_timesteps

  def sampling_grid(self, num_steps: int, spacing: str) -> Grid:
    timesteps = schedules.spaced_timesteps(self.schedule, num_steps, spacing)
    return Grid(schedules.respace(self.schedule, timesteps), jnp.asarray(timesteps))

  def panel_times(self) -> tuple[int, ...]:
    """DDPM's t = 50, 250, 500, 750, 950 of T = 1000, scaled to the schedule's T."""
    return tuple(t * self.num_timesteps // 1000 for t in (50, 250, 500, 750, 950))


class _Continuous:
  """What EDM and Flow share: a continuous time, sampled on grids of their own."""

  continuous = True

  def default_steps(self) -> int:
    return self.DEFAULT_STEPS

  def time_bin(self, t, num_bins: int):
    """Which of `num_bins` bins of equal training probability each t [B] falls in:
    ⌊time_fraction(t)·bins⌋ (for logging the loss by noise level)."""
    bins = jnp.floor(self.time_fraction(t) * num_bins).astype(jnp.int32)
    return jnp.clip(bins, 0, num_bins - 1)

  def panel_times(self) -> tuple[float, ...]:
    return self.PANEL_TIMES

  def eps_and_x0_on_grid(self, grid: Grid, index, x, output):
    """`eps_and_x0` at grid step `index` [B], x being the step's VP variable."""
    return self.eps_and_x0(_expand(grid.scales[index], x) * x, grid.timesteps[index], output)


@dataclasses.dataclass(frozen=True, eq=False)
class EDM(_Continuous):
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
  ode_slopes = (0.0, 1.0)  # Heun and Euler in x and σ themselves (EDM's Algorithm 1)
  FIXED_FIELDS = ("sigma_data",)  # what the network learned depends on it
  PANEL_TIMES = (0.1, 0.5, 1.0, 3.0, 10.0)
  DEFAULT_STEPS = 18  # Heun: 35 network calls, EDM's CIFAR-10 setting

  def __post_init__(self):
    for name in ("sigma_data", "sigma_min", "sigma_max", "rho", "p_std"):
      validation.real(name, getattr(self, name), 0.0, low_included=False)
    validation.real("p_mean", self.p_mean, -math.inf)
    if self.sigma_min >= self.sigma_max:
      raise ArgumentError("sigma_min", self.sigma_min, f"must be below sigma_max = "
                          f"{self.sigma_max}")

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

  def time_fraction(self, sigma):
    """Where σ lies in the training distribution, in [0, 1]: Φ((ln σ − P_mean)/P_std)."""
    return jax.scipy.stats.norm.cdf((jnp.log(sigma) - self.p_mean) / self.p_std)

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
class Flow(_Continuous):
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
  ode_slopes = (-1.0, 1.0)  # Heun and Euler in x and t themselves: dx/dt = v = ε − x0
  FIXED_FIELDS = ()
  PANEL_TIMES = (0.05, 0.25, 0.5, 0.75, 0.95)
  DEFAULT_STEPS = 50
  TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
  NETWORK_TIME_SCALE = 1000.0

  def __post_init__(self):
    validation.one_of("time_distribution", self.time_distribution, self.TIME_DISTRIBUTIONS,
                      "time distribution")
    validation.real("logit_mean", self.logit_mean, -math.inf)
    validation.real("logit_std", self.logit_std, 0.0, low_included=False)
    validation.real("t_min", self.t_min, 0.0, 1.0, low_included=False)

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

  def time_fraction(self, t):
    """Where t lies in [0, 1]: t itself."""
    return t

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


Process = DDPM | EDM | Flow
PROCESSES = {"ddpm": DDPM, "edm": EDM, "flow": Flow}
DEFAULT_PROCESS = "ddpm"


def process_name(diffusion_config) -> str:
  """`config.diffusion.process`; configs and checkpoints without it are DDPM's."""
  return diffusion_config.get("process", DEFAULT_PROCESS)


def _own_fields(process_class) -> list[str]:
  return [field.name for field in dataclasses.fields(process_class)]


def from_config(diffusion_config):
  """The process `config.diffusion` describes: DDPM from its schedule fields and prediction,
  EDM and Flow from their own fields (class defaults for those the config leaves out)."""
  name = validation.one_of("process", process_name(diffusion_config), PROCESSES, "process")
  if name == "ddpm":
    return DDPM(schedules.from_config(diffusion_config), diffusion_config.prediction)
  process_class = PROCESSES[name]
  return process_class(**{field: diffusion_config[field] for field in _own_fields(process_class)
                          if field in diffusion_config})


def fixed_fields(diffusion_config) -> list[str]:
  """The `config.diffusion` fields a checkpoint fixes: the process and what its network learned
  depends on (DDPM: T, the schedule and the prediction target; EDM: σ_data)."""
  return ["process", *PROCESSES[process_name(diffusion_config)].FIXED_FIELDS]
