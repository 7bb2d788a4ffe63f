"""Denoising panels of a model: held-out images noised to several t, and what it predicts."""

import functools

import jax
import numpy as np

from jaxdiff import data, visualize
from jaxdiff.denoiser import Denoiser


def panel_inputs(data_config, key, num_images: int = 4):
  """A few held-out images in [−1, 1] (the eval split, or train for datasets without one) and
  fixed noise for them, so panels from different steps are comparable."""
  split = data_config.eval_split
  if split not in data.dataset_info(data_config).num_examples:
    split = data_config.train_split
  pixels, _ = data.load_split_numpy(data_config, split, limit=num_images)
  x0 = pixels.astype(np.float32) / 127.5 - 1.0
  return x0, np.asarray(jax.random.normal(key, x0.shape))


@functools.lru_cache(maxsize=8)
def compiled_output(denoiser: Denoiser):
  """`denoiser.output` jitted once per denoiser, so a panel runs it as one program, not op by
  op (the params keep their layout)."""
  return jax.jit(denoiser.output)


def panel(denoiser: Denoiser, params, x0, noise) -> np.ndarray:
  """The uint8 panel of `visualize.denoising_rows` for `denoiser` with `params` (a conditional
  model shows its unconditional prediction)."""
  output = compiled_output(denoiser)
  predict_fn = lambda x_t, t: output(params, x_t, t)
  return visualize.denoising_panel(visualize.denoising_rows(
      denoiser.process, predict_fn, x0, noise, denoiser.process.panel_times()))
