"""Datasets by name, as random-access sources of {'image': uint8 [H, W, C], 'label'} records.

`config.data.dataset` is one of
* a packaged dataset (`digits`, `mnist5k`; see `builders`): prepared into `data_dir` on first
  use, offline;
* `folder:/path/to/images` (see `folder`);
* any TFDS image dataset (`cifar10`, `mnist`, `fashion_mnist`, `celeb_a`, `name/config:version`)
  already prepared as ArrayRecord in `data_dir`. Nothing is ever downloaded here.
"""

import dataclasses
import difflib
import os
from typing import Any, Mapping, Sequence

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from jaxdiff.errors import ArgumentError
from jaxdiff.data import builders
from jaxdiff.data import folder

FOLDER_PREFIX = "folder:"
PACKAGED_DATASETS = tuple(builders.PACKAGED_BUILDERS)
TFDS_EXAMPLES = ("cifar10", "mnist", "fashion_mnist", "celeb_a")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about a dataset."""

  name: str
  num_examples: Mapping[str, int]  # per split
  image_shape: tuple[int | None, int | None, int]  # of the source; None where sizes vary
  num_classes: int  # 0: no labels (every label is 0)
  max_pixel_value: int  # stored pixel values span [0, max_pixel_value]

  @property
  def num_channels(self) -> int:
    return self.image_shape[-1]


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: records (`len()`, `[index]`, picklable) and the dataset's info. `keepable`:
  whether the records may be read once and kept in memory (not a folder's files: they are read,
  and a broken one reported by name, when the stream reaches them)."""

  records: Sequence[Mapping[str, Any]]
  info: DatasetInfo
  keepable: bool = True


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not in `data_dir` as ArrayRecord, and nothing will download it."""


def data_dir(data_config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(data_config.data_dir)


def prepared_tfds_datasets(directory: str) -> list[str]:
  """Names of the TFDS datasets prepared in `directory` (any file format)."""
  root = epath.Path(directory)
  if not root.is_dir():
    return []
  return sorted(
      path.name for path in root.iterdir()
      if path.is_dir() and path.name not in PACKAGED_DATASETS
      and (any(path.glob("*/dataset_info.json")) or any(path.glob("*/*/dataset_info.json"))))


def available_datasets(directory: str) -> list[str]:
  """Dataset names that work offline with this `data_dir` (besides `folder:<path>`)."""
  return list(PACKAGED_DATASETS) + prepared_tfds_datasets(directory)


def unknown_dataset_error(name, directory: str) -> ArgumentError:
  """ArgumentError naming 'dataset': the datasets jaxdiff can read, and the nearest of them to
  `name`."""
  available = available_datasets(directory)
  prepared = [choice for choice in available if choice not in PACKAGED_DATASETS]
  close = difflib.get_close_matches(str(name), available, n=3)
  return ArgumentError(
      "dataset", name,
      f"unknown dataset; choose {' or '.join(PACKAGED_DATASETS)} (packaged, offline), "
      f"{FOLDER_PREFIX}/path/to/images (a folder of your PNG/JPEG files), or a TFDS image dataset "
      f"prepared as ArrayRecord in the data_dir {directory} (there now: "
      f"{', '.join(prepared) or 'none'}), e.g. {', '.join(TFDS_EXAMPLES)}"
      + (f"; did you mean {' or '.join(close)}?" if close else ""))


def _not_prepared_error(name: str, directory: str, problem: str) -> DatasetNotPreparedError:
  return DatasetNotPreparedError(
      f"TFDS dataset {name!r} {problem}, and jaxdiff never downloads. Prepare it on a machine "
      f"with network access and TensorFlow (TFDS encodes images with it; pip install tensorflow) "
      f"with `tfds build {name} --data_dir={directory} --file_format=array_record`, or convert "
      f"an existing TFRecord copy with `tfds convert_format --dataset_dir={directory}/{name} "
      f"--out_file_format=array_record`; then copy that data_dir here, or point "
      f"--config.data.data_dir at a shared one (gs:// paths need pip install 'jaxdiff[gcs]'). Datasets "
      f"that need no preparation: {', '.join(PACKAGED_DATASETS)}.")


def _tfds_builder(name: str, directory: str) -> tfds.core.DatasetBuilder:
  """The builder of a TFDS dataset prepared as ArrayRecord (or Parquet) in `directory`."""
  if name in PACKAGED_DATASETS:
    return builders.prepared_builder(name, directory)
  base_name = name.split("/")[0].split(":")[0]
  if (base_name not in tfds.list_builders(with_community_datasets=False)
      and base_name not in prepared_tfds_datasets(directory)):  # read-only: known from its files
    raise unknown_dataset_error(name, directory)
  builder = tfds.builder(name, data_dir=directory)
  if not builder.is_prepared():
    raise _not_prepared_error(name, directory, f"is not prepared in {directory}")
  if builder.info.file_format not in tfds.core.FileFormat.with_random_access():
    raise _not_prepared_error(
        name, directory,
        f"is prepared in {directory} as {builder.info.file_format.value}, which has no random "
        f"access")
  return builder


def _tfds_info(name: str, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"TFDS dataset {name!r} has no 'image' feature: {features}")
  label = features["label"] if "label" in features else None
  return DatasetInfo(
      name=name,
      num_examples={split: info.num_examples for split, info in builder.info.splits.items()},
      image_shape=tuple(features["image"].shape),
      num_classes=label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0,
      max_pixel_value=getattr(builder, "MAX_PIXEL_VALUE", 255))


def _folder_split(data_config: ml_collections.ConfigDict, split: str | None) -> Split:
  root = data_config.dataset[len(FOLDER_PREFIX):]
  images, class_names = folder.scan(root, data_config.num_channels)
  if split not in (None, folder.SPLIT):
    raise ValueError(
        f"an image folder has one split, {folder.SPLIT!r}, not {split!r}: set "
        f"--config.data.train_split={folder.SPLIT} and --config.data.eval_split={folder.SPLIT}")
  info = DatasetInfo(
      name=data_config.dataset,
      num_examples={folder.SPLIT: len(images)},
      image_shape=(None, None, data_config.num_channels),
      num_classes=len(class_names),
      max_pixel_value=255)
  return Split(images, info, keepable=False)


def _open(data_config: ml_collections.ConfigDict, split: str | None) -> Split:
  """The dataset's info, and the records of `split` unless it is None."""
  if data_config.dataset.startswith(FOLDER_PREFIX):
    return _folder_split(data_config, split)
  builder = _tfds_builder(data_config.dataset, data_dir(data_config))
  records = None if split is None else builder.as_data_source(split=split)
  return Split(records, _tfds_info(data_config.dataset, builder))


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """The dataset's info; prepares a packaged dataset on first use, never downloads."""
  return _open(data_config, None).info


def open_split(data_config: ml_collections.ConfigDict, split: str) -> Split:
  """Random-access records of one split (a TFDS split spec such as 'train[:90%]' works too)."""
  return _open(data_config, split)


def check_model_compatible(data_config: ml_collections.ConfigDict, num_classes: int,
                           out_channels: int) -> None:
  """ArgumentError (named by config field: 'data.num_channels', 'model.out_channels',
  'model.num_classes') where the dataset and a model of `num_classes` classes that predicts
  `out_channels` channels cannot work together."""
  info = dataset_info(data_config)
  channels = data_config.num_channels
  if info.num_channels != channels:
    raise ArgumentError("data.num_channels", channels, f"dataset {info.name!r} has "
                        f"{info.num_channels}-channel images; set {info.num_channels}")
  if out_channels != channels:
    raise ArgumentError("model.out_channels", out_channels, f"the model predicts images of the "
                        f"data's channels, config.data.num_channels = {channels}")
  if num_classes and not 0 < info.num_classes <= num_classes:
    raise ArgumentError("model.num_classes", num_classes, f"dataset {info.name!r} has "
                        f"{info.num_classes} classes"
                        + (" (no labels): set 0" if not info.num_classes else ""))
