"""The model as one value: a network and what its output means.

A `Denoiser` holds the network (a Flax module from `models`), the noise process (`processes`:
DDPM's chain with its schedule and prediction target, EDM or flow matching), the number of
classes (0: unconditional; the label `num_classes` means "no label") and the image shape
(H, W, C); the compute dtype is the network's. Its methods are pure functions of the params:

  output(params, x_t, t, y, w)      the network's raw output F on what the process shows it,
                                    F(c_in(t) x_t, c_noise(t)[, y]); with classifier-free
                                    guidance w ≠ 0, (1 + w) F(…, y) − w F(…, ∅)
  eps_and_x0(params, x_t, t, y, w)  the (ε̂, x̂0) that output means at time t

Samplers, generation, likelihood, metrics, panels and the programs take a Denoiser and params;
`from_config` is the one place that reads the model's meaning out of a config.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import models, processes, validation
from jaxdiff.errors import ArgumentError


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
  """A network and the meaning of its output (see the module doc). Immutable."""

  network: nn.Module
  process: processes.Process
  num_classes: int
  image_shape: tuple[int, int, int]

  @property
  def dtype(self) -> str:
    """The network's compute dtype (its params are float32 whatever it is)."""
    return str(self.network.dtype)

  def computing_in(self, dtype: str | None) -> "Denoiser":
    """This denoiser with its network computing in `dtype` (None: as it is). Params fit
    either; time, the schedule and the samplers stay float32."""
    if dtype is None or dtype == self.dtype:
      return self
    validation.one_of("dtype", dtype, validation.COMPUTE_DTYPES, "compute dtype")
    return dataclasses.replace(self, network=self.network.clone(dtype=dtype))

  def init(self, key):
    """Fresh params for the network, from `key`."""
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    return self.network.init({"params": key}, x, jnp.zeros((1,), jnp.int32), labels)["params"]

  def check_labels(self, labels) -> None:
    """ArgumentError unless the model is class-conditional and every label is one of its
    classes, 0 ≤ y < num_classes. Traced labels (inside `jax.jit`) are not checked."""
    if self.num_classes < 1:
      raise ArgumentError("labels", labels, "this model is unconditional (num_classes = 0): "
                          "class labels and guidance need a class-conditional model")
    if isinstance(labels, jax.core.Tracer):
      return
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() >= self.num_classes):
      shown = labels if values.ndim == 0 else sorted(set(values.ravel().tolist()))
      raise ArgumentError("labels", shown, f"class labels must be in [0, {self.num_classes})")

  def output(self, params, x_t, t, labels=None, guidance_scale: float = 0.0, *,
             train: bool = False, rngs=None) -> jax.Array:
    """F [B, H, W, C] float32 at x_t and t [B] (the process's inputs to the network); with
    `guidance_scale` w ≠ 0 (labels needed) classifier-free guidance (Ho & Salimans 2022)
    F̃ = (1 + w) F(·, y) − w F(·, ∅), both branches one network call on a batch twice the size.
    (ε̂, x̂0) are affine in F at fixed (x_t, t), so mixing outputs equals mixing ε̂ (or x̂0)."""
    x_t, t = self.process.network_inputs(x_t, t)
    apply = lambda x, t, y: self.network.apply({"params": params}, x, t, y, train=train,
                                               rngs=rngs)
    if guidance_scale == 0:
      return apply(x_t, t, labels)
    if labels is None:
      raise ArgumentError("guidance_scale", guidance_scale,
                          "classifier-free guidance needs the class labels to guide towards")
    null = jnp.full_like(labels, self.num_classes)
    both = apply(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                 jnp.concatenate([labels, null]))
    conditional, unconditional = jnp.split(both, 2)
    return (1 + guidance_scale) * conditional - guidance_scale * unconditional

  def eps_and_x0(self, params, x_t, t, labels=None, guidance_scale: float = 0.0):
    """(ε̂, x̂0) of `output` at times t [B] (`process.eps_and_x0`)."""
    return self.process.eps_and_x0(x_t, t, self.output(params, x_t, t, labels, guidance_scale))


def image_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of the images `config.data` describes."""
  return (data_config.image_size, data_config.image_size, data_config.num_channels)


def from_config(config) -> Denoiser:
  """The Denoiser a config describes: `config.model` (network by name), `config.diffusion`
  (the process) and `config.data` (image shape)."""
  network = models.create(config.model)
  return Denoiser(network=network, process=processes.from_config(config.diffusion),
                  num_classes=network.num_classes, image_shape=image_shape(config.data))
