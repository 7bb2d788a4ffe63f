"""Pixels: the [−1, 1] → uint8 mapping and grid layout, exactly."""

import numpy as np
from PIL import Image

from jaxdiff import images


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(images.to_uint8([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]),
                                [0, 0, 128, 191, 255, 255])


def test_grid_places_images_row_by_row_with_padding_and_scale(tmp_path):
  tiles = np.arange(1, 6, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones((5, 2, 2, 1), np.uint8)
  grid = images.make_grid(tiles, num_columns=3, padding=1)
  assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
  np.testing.assert_array_equal(grid[1:3, 1:3, 0], 1)
  np.testing.assert_array_equal(grid[1:3, 7:9, 0], 3)
  np.testing.assert_array_equal(grid[4:6, 4:6, 0], 5)
  np.testing.assert_array_equal(grid[4:6, 7:9, 0], 0)  # no sixth image
  assert grid[0].max() == 0 and grid[:, 0].max() == 0
  assert images.make_grid(tiles, num_columns=5, scale=3).shape == (1 * 7 + 1, 5 * 7 + 1, 1)
  images.save_png(str(tmp_path / "sub" / "grid.png"), grid)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "grid.png")), grid[..., 0])


def test_display_scale_enlarges_small_images_only():
  assert [images.display_scale(s) for s in (8, 28, 32, 64)] == [4, 1, 1, 1]


def test_trajectory_strip_has_a_row_per_sample_and_a_column_per_frame():
  # frames[f, n] is filled with 10·n + f, RGB.
  values = 10 * np.arange(2)[None, :] + np.arange(3)[:, None]
  frames = (values[:, :, None, None, None] * np.ones((3, 2, 2, 2, 3))).astype(np.uint8)
  strip = images.trajectory_strip(frames, padding=1)
  assert strip.shape == (2 * 3 + 1, 3 * 3 + 1, 3)
  for sample in range(2):
    for frame in range(3):
      top, left = 1 + 3 * sample, 1 + 3 * frame
      np.testing.assert_array_equal(strip[top:top + 2, left:left + 2], 10 * sample + frame)
  assert images.trajectory_strip(frames, scale=2).shape == (2 * 5 + 1, 3 * 5 + 1, 3)
