"""Networks whose optimal output is known in closed form, for testing samplers, losses and the
bound, and the `Denoiser`s built on them: on DDPM's chain (`gaussian_network`) and on any noise
process (`gaussian_process_network`)."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, processes, samplers
from jaxdiff.denoiser import Denoiser
from jaxdiff.schedules import Schedule


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """A stand-in for a Flax network: `apply(variables, x_t, t, y=None, ...)` is
  `predict(x_t, t, y)` whatever the variables, with the attributes a `Denoiser` reads."""

  predict: Callable
  num_classes: int = 0
  dtype: str = "float32"

  def apply(self, variables, x_t, t, y=None, train=False, rngs=None):
    del variables, train, rngs
    return self.predict(x_t, t, y)


def gaussian_network(schedule: Schedule, mean, std: float, prediction: str = "eps",
                     num_classes: int = 0) -> Network:
  """The network for data x0 ~ N(mean, std² I): the MMSE prediction of ε (or of x0 or v).

  x_t = √ᾱ x0 + √(1−ᾱ) ε is Gaussian with mean √ᾱ·mean and variance ᾱ std² + 1 − ᾱ, so with
  u = (x_t − √ᾱ·mean) / (ᾱ std² + 1 − ᾱ), E[ε | x_t] = √(1−ᾱ) u and E[x0 | x_t] = mean + √ᾱ std² u,
  each finite also at ᾱ = 0 (zero terminal SNR). `mean` may depend on the class: pass a function
  of the labels and `num_classes` > 0 (the network then needs labels).
  """

  def predict(x_t, t, labels):
    data_mean = mean
    if callable(mean):
      data_mean = mean(labels).reshape(labels.shape + (1,) * (x_t.ndim - 1))
    alpha_bar = schedule.alpha_bars[t].reshape(t.shape + (1,) * (x_t.ndim - 1))
    u = (x_t - jnp.sqrt(alpha_bar) * data_mean) / (alpha_bar * std**2 + 1 - alpha_bar)
    eps, x0 = jnp.sqrt(1 - alpha_bar) * u, data_mean + jnp.sqrt(alpha_bar) * std**2 * u
    return {"eps": eps, "x0": x0, "v": diffusion.v_target(schedule, x0, t, eps)}[prediction]

  return Network(predict, num_classes=num_classes)


def denoiser(network: Network, schedule: Schedule, image_shape=(2, 2, 1),
             prediction: str = "eps") -> Denoiser:
  """The Denoiser of `network` (its classes) on DDPM's chain of `schedule`, for images of
  `image_shape`."""
  return process_denoiser(network, processes.DDPM(schedule, prediction), image_shape)


def process_denoiser(network: Network, process, image_shape=(2, 2, 1)) -> Denoiser:
  """The Denoiser of `network` (its classes) on `process`, for images of `image_shape`."""
  return Denoiser(network=network, process=process, num_classes=network.num_classes,
                  image_shape=tuple(image_shape))


def gaussian_denoiser(schedule: Schedule, mean, std: float, prediction: str = "eps",
                      image_shape=(2, 2, 1), num_classes: int = 0) -> Denoiser:
  """`denoiser` of `gaussian_network`: the MMSE denoiser of data N(mean, std² I)."""
  return denoiser(gaussian_network(schedule, mean, std, prediction, num_classes), schedule,
                  image_shape, prediction)


def gaussian_flow_map(schedule: Schedule, mean: float, std: float, x_T, t_last: int):
  """Where sampling along the exact probability-flow ODE takes x_T for data N(mean, std² I),
  ending with the MMSE denoiser at timestep t_last, in float64 NumPy.

  The ODE keeps z = (x_t − √ᾱ_t mean)/√(ᾱ_t std² + 1 − ᾱ_t) fixed, and with ᾱ = ᾱ_{t_last}
  E[x0 | x_t] = mean + √ᾱ std² z / √(ᾱ std² + 1 − ᾱ).
  """
  alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
  scale = lambda a: np.sqrt(a * std**2 + 1 - a)
  z = (np.asarray(x_T, np.float64) - np.sqrt(alpha_bars[-1]) * mean) / scale(alpha_bars[-1])
  return mean + np.sqrt(alpha_bars[t_last]) * std**2 * z / scale(alpha_bars[t_last])


def _time_and_state(process, network_input, c_noise):
  """(t [B], x_t) from what `process.network_inputs` shows the network, undone by the papers'
  formulas: DDPM shows (x_t, t); EDM (x_t/√(σ² + σ_d²), ¼ ln σ); flow (x_t, 1000 t)."""
  if process.name == "ddpm":
    return c_noise, network_input
  if process.name == "edm":
    sigma = jnp.exp(4 * c_noise)
    scale = jnp.sqrt(sigma**2 + process.sigma_data**2)
    return sigma, scale.reshape(sigma.shape + (1,) * (network_input.ndim - 1)) * network_input
  return c_noise / 1000, network_input


def gaussian_process_network(process, mean: float, std: float) -> Network:
  """The network of `process` for data x0 ~ N(mean, std² I): the output F whose meaning is the
  MMSE pair (E[ε | x_t], E[x0 | x_t]), F written from the papers, not from `process`.

  x_t = α x0 + σ ε is Gaussian with mean α·mean and variance α² std² + σ², so with u = (x_t −
  α·mean)/(α² std² + σ²), E[ε | x_t] = σ u and E[x0 | x_t] = mean + α std² u. F is ε, x0 or v =
  α ε − σ x0 on DDPM's chain (by its prediction target), (x0 − c_skip x_t)/c_out on EDM
  (Karras et al. 2022, Table 1) and the velocity ε − x0 on the flow.
  """

  def predict(network_input, c_noise, labels):
    del labels
    t, x_t = _time_and_state(process, network_input, c_noise)
    shaped = lambda a: jnp.asarray(a).reshape(t.shape + (1,) * (x_t.ndim - 1))
    if process.name == "ddpm":
      alpha = shaped(process.schedule.sqrt_alpha_bars[t])
      sigma = shaped(process.schedule.sqrt_one_minus_alpha_bars[t])
    else:
      alpha, sigma = (shaped(1.0 - t), shaped(t)) if process.name == "flow" else (1.0, shaped(t))
    u = (x_t - alpha * mean) / (alpha**2 * std**2 + sigma**2)
    eps, x0 = sigma * u, mean + alpha * std**2 * u
    if process.name == "edm":
      sigma_data = process.sigma_data
      c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
      c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
      return (x0 - c_skip * x_t) / c_out
    if process.name == "flow":
      return eps - x0
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[process.prediction]

  return Network(predict)


def gaussian_process_denoiser(process, mean: float, std: float,
                              image_shape=(1, 1, 1)) -> Denoiser:
  """`process_denoiser` of `gaussian_process_network`: the MMSE denoiser of data N(mean, std² I)
  on `process`. The exact end of sampling on a grid of the process is `gaussian_flow_map(
  grid.schedule, mean, std, x_T, 0)`, x_T being the grid's variance-preserving variable."""
  return process_denoiser(gaussian_process_network(process, mean, std), process, image_shape)


def sampling_errors(denoiser: Denoiser, options, mean: float, std: float) -> tuple[float, float]:
  """(W2 from the samples' distribution to the data's N(mean, std²), RMS distance per pixel to
  the exact probability-flow ODE end from the same x_T) of a deterministic sampler on
  `gaussian_process_denoiser(process, mean, std)`, in float64 from two runs.

  The denoiser is affine in x and so is every deterministic sampler: x0 = a x_T + b, found from
  x_T = 0 and 1, while the exact map is x0 = a* x_T + b* (`gaussian_flow_map` on the options'
  grid). x_T ~ N(0, v) with v = 1 − ᾱ_{K−1} of the grid (1 on DDPM's chain), so the samples are
  N(b, v a²) and the RMS distance is √((b − b*)² + v (a − a*)²)."""
  options = options.resolved(denoiser.process)
  grid = denoiser.process.sampling_grid(options.num_steps, options.spacing)
  x_init = np.array([0.0, 1.0], np.float32).reshape(2, 1, 1, 1)
  options = dataclasses.replace(options, batch_size=2)
  denoiser = dataclasses.replace(denoiser, image_shape=(1, 1, 1))
  images = jax.jit(lambda x: samplers.sample(denoiser, None, jax.random.key(0), options,
                                              x_init=x).images)(x_init)
  b, a = np.asarray(images, np.float64).ravel()
  b_exact, a_exact = gaussian_flow_map(grid.schedule, mean, std, x_init, 0).ravel()
  a, a_exact = a - b, a_exact - b_exact
  variance = 1.0 if grid.scales is None else 1 - float(np.asarray(grid.schedule.alpha_bars,
                                                                   np.float64)[-1])
  return (float(np.hypot(b - mean, np.sqrt(variance) * abs(a) - std)),
          float(np.hypot(b - b_exact, np.sqrt(variance) * (a - a_exact))))
