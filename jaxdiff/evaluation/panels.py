"""Denoising panels of a model: held-out images noised to several t, and what it predicts."""

import os

import jax
import numpy as np

from jaxdiff import checkpoint, data, images, schedules, training, visualize


def panel_inputs(config, key, num_images: int = 4):
  """A few held-out images in [−1, 1] (the eval split, or train for datasets without one) and
  fixed noise for them, so panels from different steps are comparable."""
  split = config.data.eval_split
  if split not in data.dataset_info(config.data).num_examples:
    split = config.data.train_split
  pixels, _ = data.load_split_numpy(config.data, split, limit=num_images)
  x0 = pixels.astype(np.float32) / 127.5 - 1.0
  return x0, np.asarray(jax.random.normal(key, x0.shape))


def panel_timesteps(schedule) -> tuple[int, ...]:
  """DDPM's t = 50, 250, 500, 750, 950 of T = 1000, scaled to the schedule's T."""
  return tuple(t * schedule.num_timesteps // 1000 for t in visualize.PANEL_TIMESTEPS)


def panel(model, params, schedule, config, x0, noise) -> np.ndarray:
  """The uint8 panel of `visualize.denoising_rows` for the network `model` with `params`."""
  predict_fn = lambda x_t, t: model.apply({"params": params}, x_t, t)
  return visualize.denoising_panel(visualize.denoising_rows(
      predict_fn, schedule, x0, noise, panel_timesteps(schedule), config.diffusion.prediction))


def write_panel(workdir: str, output_path: str, checkpoint_step: int | None = None,
                seed: int = 0) -> str:
  """The panel of a trained workdir's EMA params, as a PNG (needs the dataset for x0)."""
  ema_params, config, _ = checkpoint.load_for_sampling(workdir, checkpoint_step)
  x0, noise = panel_inputs(config, jax.random.key(seed))
  image = panel(training.create_model(config), ema_params, schedules.from_config(config.diffusion),
                config, x0, noise)
  images.save_png(output_path, image)
  return os.path.abspath(output_path)
