"""Images on disk: [−1, 1] floats to uint8, grids, PNGs. Pure NumPy and Pillow."""

import math
import os

import numpy as np
from PIL import Image

from jaxdiff import storage


def to_uint8(images) -> np.ndarray:
  """[−1, 1] floats → uint8 by round((x + 1) · 127.5), clipped to [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, num_columns: int | None = None, padding: int = 1,
              scale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] → one [rows·(H+p)+p, cols·(W+p)+p, C] image (C = 1 or 3), black padding,
  each image enlarged `scale`× (nearest neighbour). Default: a square-ish grid."""
  images = np.asarray(images)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  count, height, width, channels = images.shape
  num_columns = num_columns or math.ceil(math.sqrt(count))
  num_rows = math.ceil(count / num_columns)
  grid = np.zeros((num_rows * (height + padding) + padding,
                   num_columns * (width + padding) + padding, channels), np.uint8)
  for index, image in enumerate(images):
    row, column = divmod(index, num_columns)
    top, left = padding + row * (height + padding), padding + column * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def trajectory_strip(frames: np.ndarray, padding: int = 1, scale: int = 1) -> np.ndarray:
  """uint8 frames [F, N, H, W, C] (a sampler's trajectory) → one grid image with a row per
  sample and a column per saved step, x_T on the left and x0 on the right."""
  frames = np.asarray(frames)
  by_sample = frames.swapaxes(0, 1).reshape(-1, *frames.shape[2:])
  return make_grid(by_sample, num_columns=frames.shape[0], padding=padding, scale=scale)


def display_scale(image_size: int) -> int:
  """How much to enlarge small images (8×8 digits) in grids so a person can see them."""
  return max(1, 32 // image_size)


def save_png(path: str, image: np.ndarray) -> None:
  """Write an HWC uint8 image (C = 1 or 3) to a local or gs:// path, creating parent folders."""
  storage.makedirs(os.path.dirname(storage.resolve(path)))
  image = np.asarray(image)
  with storage.open_file(path, "wb") as f:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="png")
