"""Networks whose optimal output is known in closed form, for testing samplers, losses and the
bound, and the `Denoiser`s built on them."""

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion
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
  """The Denoiser of `network` (its classes) on `schedule`, for images of `image_shape`."""
  return Denoiser(network=network, schedule=schedule, prediction=prediction,
                  num_classes=network.num_classes, image_shape=tuple(image_shape))


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
