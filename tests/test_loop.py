"""The training loop's input: a small split decoded once into memory gives exactly the batches
of decoding every record on each read."""

import grain
import ml_collections
import numpy as np
import pytest

from configs import default
from jaxdiff.data import pipeline


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory) -> ml_collections.ConfigDict:
  config = default.get_config().data
  config.data_dir = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  config.image_size = 12  # a resize, so the kept images are preprocessed ones, not the records
  config.random_flip = True
  return config


def host_batches(config, limit_bytes: int, monkeypatch, **kwargs) -> list[dict[str, np.ndarray]]:
  monkeypatch.setattr(pipeline, "IN_MEMORY_MAX_BYTES", limit_bytes)
  batches = pipeline.host_train_batches(config, 16, seed=5, **kwargs)
  return [batch for batch, _ in zip(batches, range(4))]


@pytest.mark.parametrize("kwargs", [
    {},
    {"start_batch": 89, "steps_per_call": 2},  # 1,442 train digits: epoch 2 starts in batch 90
    {"process_index": 1, "process_count": 2},
])
def test_in_memory_batches_equal_streamed_ones(digits_config, monkeypatch, kwargs):
  in_memory = host_batches(digits_config, pipeline.IN_MEMORY_MAX_BYTES, monkeypatch, **kwargs)
  streamed = host_batches(digits_config, 0, monkeypatch, **kwargs)
  for kept, read in zip(in_memory, streamed, strict=True):
    assert kept.keys() == read.keys() == {"image", "label"}
    for name in kept:
      assert kept[name].dtype == read[name].dtype
      np.testing.assert_array_equal(kept[name], read[name])


def test_a_split_over_the_limit_is_read_record_by_record(digits_config, monkeypatch):
  source = pipeline.sources.open_split(digits_config, "train")
  preprocess = pipeline.Preprocess(digits_config.image_size, 16, labelled=True)
  size = len(source.records) * 12 * 12 * 1 * 4
  monkeypatch.setattr(pipeline, "IN_MEMORY_MAX_BYTES", size)
  kept = pipeline.preprocessed_examples(source, preprocess)
  monkeypatch.setattr(pipeline, "IN_MEMORY_MAX_BYTES", size - 1)
  read = pipeline.preprocessed_examples(source, preprocess)
  assert len(kept) == len(read) == 1442
  for index in (0, 777, 1441):
    np.testing.assert_array_equal(kept[index]["image"], read[index]["image"])
    assert kept[index]["label"] == read[index]["label"]
  assert isinstance(kept._source, pipeline.InMemoryExamples)  # pylint: disable=protected-access
  assert not isinstance(getattr(read, "_source", None), pipeline.InMemoryExamples)


def test_batches_are_those_of_runs_before_the_split_was_kept(digits_config):
  """The stream as it was built before (flip drawn inside the preprocessing of each record), so
  a checkpoint's data position resumes onto the same batches."""
  source = pipeline.sources.open_split(digits_config, "train")
  preprocess = pipeline.Preprocess(digits_config.image_size, 16, labelled=True)

  def preprocess_and_flip(record, rng):
    return pipeline.random_flip(preprocess(record), rng)

  shuffle_seed, flip_seed = (int(seed) for seed in np.random.SeedSequence(5).generate_state(2))
  before = (grain.MapDataset.source(source.records).shuffle(seed=shuffle_seed).repeat()
            .random_map(preprocess_and_flip, seed=flip_seed).batch(16, drop_remainder=True))
  now = pipeline.host_train_batches(digits_config, 16, seed=5, start_batch=88)
  for index, batch in zip(range(88, 92), now):
    for name in ("image", "label"):
      np.testing.assert_array_equal(batch[name], before[index][name])
