"""A folder of the user's own PNG/JPEG images as a random-access data source.

Layout: either every image anywhere under the root (one class, no labels), or one sub-folder per
class (`root/cat/*.png`, `root/dog/**/*.jpg`; labels are the sorted sub-folder names' indices),
in which case no image may lie directly in the root. The whole folder is the split `train`.
The root may be local or in a bucket (`gs://bucket/images`; see `jaxdiff.storage`).
"""

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from jaxdiff import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT = "train"
_PIL_MODES = {1: "L", 3: "RGB"}


@dataclasses.dataclass(frozen=True)
class FolderImages:
  """Images read and converted to `num_channels` on access: {'image': uint8 [H, W, C], 'label'}."""

  paths: tuple[str, ...]
  labels: tuple[int, ...]
  num_channels: int

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    try:
      with storage.open_file(path, "rb") as file, Image.open(file) as image:
        pixels = np.asarray(image.convert(_PIL_MODES[self.num_channels]))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
      raise ValueError(f"cannot read image file {path}: {error}") from error
    return {"image": pixels.reshape(*pixels.shape[:2], self.num_channels),
            "label": self.labels[index]}


def scan(root: str, num_channels: int) -> tuple[FolderImages, tuple[str, ...]]:
  """All images under `root` (sorted) and the class names (empty when unlabelled)."""
  if num_channels not in _PIL_MODES:
    raise ValueError(
        f"image folders are read as 1-channel (grayscale) or 3-channel (RGB) images, but "
        f"config.data.num_channels is {num_channels}")
  root = storage.resolve(root)
  if not storage.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist")
  relative_paths = [path for path in storage.files_under(root)
                    if path.lower().endswith(IMAGE_EXTENSIONS)]
  if not relative_paths:
    raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
  top_level = [path for path in relative_paths if "/" not in path]
  class_names = tuple(sorted({path.split("/")[0] for path in relative_paths} - set(top_level)))
  if class_names and top_level:
    raise ValueError(
        f"image folder {root} has class sub-folders ({', '.join(class_names)}) and also images "
        f"directly inside it, e.g. {top_level[0]}: put every image into a class sub-folder, or "
        f"none")
  class_index = {name: index for index, name in enumerate(class_names)}
  labels = tuple(class_index[path.split("/")[0]] if class_names else 0
                 for path in relative_paths)
  paths = tuple(storage.join(root, path) for path in relative_paths)
  return FolderImages(paths, labels, num_channels), class_names
