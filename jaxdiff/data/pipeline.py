"""The input pipeline: grain over a random-access split, one global batch per training step.

The training stream is the train split, shuffled with a new order each epoch, repeated forever,
preprocessed (optional random flip with a per-position seed). Global step s is stream
positions [s·B, (s+1)·B), B the global batch size; host h of P reads only its rows
[s·B + h·B/P, s·B + (h+1)·B/P), so the hosts of an epoch read disjoint shards that cover it,
and the batches do not depend on the number of hosts or devices. An iterator's state is the
number of batches it has yielded, so it restores onto any topology.
"""

import dataclasses
import queue
import threading
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh
from PIL import Image

from jaxdiff import parallel
from jaxdiff.data import sources

_READ_THREADS = 8
_READ_BUFFER_BATCHES = 8
IN_MEMORY_MAX_BYTES = 256 * 2**20  # a training split preprocessed up to this size is kept


def centre_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """float32 [H, W, C] -> the largest centred square, resized (bicubic) to [size, size, C]."""
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image = image[top:top + side, left:left + side]
  if side == size:
    return image
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., channel])).resize(
          (size, size), Image.Resampling.BICUBIC))
      for channel in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """A record -> {'image': float32 [size, size, C] in [-1, 1], 'label': int32}: the centred
  square, resized to `image_size`, pixel values v ↦ 2·v/max_pixel_value − 1."""

  image_size: int
  max_pixel_value: int
  labelled: bool

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(record["image"], np.float32) / self.max_pixel_value
    image = np.clip(centre_crop_resize(image, self.image_size), 0.0, 1.0)
    label = record["label"] if self.labelled else 0
    return {"image": image * 2.0 - 1.0, "label": np.int32(label)}


def random_flip(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  """The example with its image mirrored left-right when one draw of `rng` is below 1/2."""
  if rng.random() < 0.5:
    return {**example, "image": example["image"][:, ::-1]}
  return example


@dataclasses.dataclass(frozen=True)
class InMemoryExamples:
  """Preprocessed examples held as arrays: index i is {'image': images[i], 'label': labels[i]}."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}


def preprocessed_examples(source: sources.Split, preprocess: Preprocess) -> grain.MapDataset:
  """The split's records, preprocessed: all of them once, into memory, when the split is
  keepable and their float32 images take at most IN_MEMORY_MAX_BYTES (decoding a record costs
  more CPU than a small model's step can spare, every step); else each record on every access."""
  num_examples = len(source.records)
  num_bytes = num_examples * preprocess.image_size**2 * source.info.num_channels * 4
  if not source.keepable or num_bytes > IN_MEMORY_MAX_BYTES:
    return grain.MapDataset.source(source.records).map(preprocess)
  examples = [preprocess(source.records[index]) for index in range(num_examples)]
  return grain.MapDataset.source(InMemoryExamples(
      np.stack([example["image"] for example in examples]),
      np.stack([example["label"] for example in examples])))


def _stream_seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit seeds for shuffling and flipping, derived from `seed`."""
  shuffle_seed, flip_seed = np.random.SeedSequence(seed).generate_state(2)
  return int(shuffle_seed), int(flip_seed)


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} does not split evenly over {process_count} hosts")
  return global_batch_size // process_count


def _host_rows(examples: grain.MapDataset, global_batch_size: int, process_index: int,
               process_count: int) -> grain.MapDataset:
  """Batches of this host's rows of each global batch of `examples`."""
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  return examples.batch(local_batch_size, drop_remainder=True)[process_index::process_count]


def _prefetched(batches: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  """Read ahead in threads, and in `num_workers` processes when > 0 (order unchanged)."""
  dataset = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_READ_BUFFER_BATCHES))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; programs without absl
      flags.FLAGS.mark_as_parsed()  # (tests, notebooks) get the defaults
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def _preprocess(data_config: ml_collections.ConfigDict, source: sources.Split) -> Preprocess:
  return Preprocess(data_config.image_size, source.info.max_pixel_value,
                    source.info.num_classes > 0)


def _host_train_batches(
    data_config: ml_collections.ConfigDict, global_batch_size: int, seed: int,
    process_index: int | None, process_count: int | None,
) -> grain.MapDataset:
  """This host's batches of the whole training stream, one a global step (host_train_batches
  reads them from a step on)."""
  process_index, process_count = _hosts(process_index, process_count)
  source = sources.open_split(data_config, data_config.train_split)
  shuffle_seed, flip_seed = _stream_seeds(seed)
  examples = (preprocessed_examples(source, _preprocess(data_config, source))
              .shuffle(seed=shuffle_seed)
              .repeat())
  if data_config.random_flip:
    examples = examples.random_map(random_flip, seed=flip_seed)
  return _host_rows(examples, global_batch_size, process_index, process_count)


def _read_from(batches: grain.MapDataset, start_batch: int, steps_per_call: int,
               num_workers: int) -> grain.IterDataset:
  """`batches` from `start_batch` on, K = `steps_per_call` > 1 consecutive ones stacked."""
  batches = batches[start_batch:]
  if steps_per_call > 1:
    batches = batches.batch(steps_per_call)
  return _prefetched(batches, num_workers)


def host_train_batches(
    data_config: ml_collections.ConfigDict, global_batch_size: int, seed: int, *,
    start_batch: int = 0, steps_per_call: int = 1, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
  """This host's numpy batches of the training stream from global step `start_batch` on.

  Infinite; each batch is {'image': float32 [B/P, H, W, C], 'label': int32 [B/P]}, or with
  `steps_per_call` = K > 1 the batches of K consecutive steps stacked: [K, B/P, ...].
  """
  batches = _host_train_batches(data_config, global_batch_size, seed, process_index,
                                process_count)
  return _read_from(batches, start_batch, steps_per_call, data_config.num_workers)


def host_eval_batches(
    data_config: ml_collections.ConfigDict, global_batch_size: int, split: str | None = None, *,
    limit: int | None = None, start_batch: int = 0, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
  """This host's numpy batches of one pass over an eval split (or its first `limit` examples),
  in order, not flipped.

  The pass is padded with repeats of its first examples to a whole number of global batches;
  each batch also has 'mask': bool [B/P], False on padding.
  """
  process_index, process_count = _hosts(process_index, process_count)
  source = sources.open_split(data_config, split or data_config.eval_split)
  num_examples = len(source.records) if limit is None else min(limit, len(source.records))
  num_batches = -(-num_examples // global_batch_size)
  padded_length = num_batches * global_batch_size
  examples = (grain.MapDataset.source(source.records)[:num_examples]
              .repeat(-(-padded_length // num_examples))[:padded_length]
              .map(_preprocess(data_config, source))
              .map_with_index(_MaskPadding(num_examples)))
  batches = _host_rows(examples, global_batch_size, process_index, process_count)
  return _prefetched(batches[start_batch:], data_config.num_workers)


@dataclasses.dataclass(frozen=True)
class _MaskPadding:
  """Adds 'mask': False from position `num_examples` on (picklable for grain workers)."""

  num_examples: int

  def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, "mask": np.bool_(index < self.num_examples)}


_END = object()


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


class _ReadAhead:
  """Pulls `items` in a background thread, keeping up to `size` of them ready."""

  def __init__(self, items: Iterator[Any], size: int):
    self._items = items
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True, name="jaxdiff-prefetch")
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for item in self._items:
        if not self._put(item):
          return
      self._put(_END)
    except BaseException as error:  # pylint: disable=broad-exception-caught
      self._put(_Failure(error))

  def __next__(self) -> Any:
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)
      raise StopIteration
    if isinstance(item, _Failure):
      self._queue.put(item)
      raise item.error
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


class GlobalBatchIterator:
  """Global batches (jax.Arrays split over the mesh), read ahead in a thread; with
  `steps_per_call` = K > 1, K consecutive batches stacked [K, B, ...] at a time.

  `get_state()` is the position after the last batch *yielded* (not the last one read ahead),
  counted in single batches whatever K, plus what must match for `set_state` to give the same
  batches.
  """

  def __init__(self, host_batches: Callable[[int], grain.IterDataset], mesh: Mesh,
               prefetch: int, identity: dict[str, Any], steps_per_call: int = 1):
    self._host_batches = host_batches
    self._mesh = mesh
    self._prefetch = prefetch
    self._identity = identity
    self._steps_per_call = steps_per_call
    self._start(0)

  def _start(self, next_batch: int) -> None:
    self._next_batch = next_batch
    self._grain_iterator = iter(self._host_batches(next_batch))
    stacked = self._steps_per_call > 1
    global_batches = (parallel.global_batch(batch, self._mesh, stacked)
                      for batch in self._grain_iterator)
    self._batches = _ReadAhead(global_batches, self._prefetch) if self._prefetch else global_batches

  def __iter__(self) -> "GlobalBatchIterator":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self._batches)
    self._next_batch += self._steps_per_call
    return batch

  def get_state(self) -> dict[str, Any]:
    return {**self._identity, "next_batch": self._next_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    mismatches = [f"{key}: saved {state.get(key)!r}, now {value!r}"
                  for key, value in self._identity.items() if state.get(key) != value]
    if mismatches:
      raise ValueError(
          "the saved data iterator state is for another input stream (" + "; ".join(mismatches)
          + "); restoring it would not reproduce the saved run's batches")
    self.close()
    self._start(int(state["next_batch"]))

  def close(self) -> None:
    """Stop reading ahead and release grain's threads and worker processes."""
    if isinstance(self._batches, _ReadAhead):
      self._batches.close()
    self._grain_iterator.close()

  def __del__(self):
    if hasattr(self, "_batches"):
      self.close()


def _identity(data_config: ml_collections.ConfigDict, split: str, global_batch_size: int,
              **extra: Any) -> dict[str, Any]:
  return {"dataset": data_config.dataset, "split": split,
          "num_examples": len(sources.open_split(data_config, split).records),
          "global_batch_size": global_batch_size, **extra}


def make_train_iterator(data_config: ml_collections.ConfigDict, global_batch_size: int,
                        seed: int, mesh: Mesh, steps_per_call: int = 1) -> GlobalBatchIterator:
  """Infinite training batches {'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]},
  or with `steps_per_call` = K > 1 those of K consecutive steps stacked [K, B, ...] for a train
  step that runs K steps a call. The state counts steps, so it restores with any K."""
  parallel.check_divisible(global_batch_size, mesh)
  batches = _host_train_batches(data_config, global_batch_size, seed, None, None)
  return GlobalBatchIterator(
      lambda start: _read_from(batches, start, steps_per_call, data_config.num_workers),
      mesh, data_config.prefetch,
      _identity(data_config, data_config.train_split, global_batch_size, seed=int(seed)),
      steps_per_call)


def make_eval_iterator(data_config: ml_collections.ConfigDict, global_batch_size: int,
                       mesh: Mesh, split: str | None = None,
                       limit: int | None = None) -> GlobalBatchIterator:
  """One ordered pass over `split` (default eval_split), or its first `limit` examples, padded;
  'mask' marks real examples."""
  parallel.check_divisible(global_batch_size, mesh)
  split = split or data_config.eval_split
  return GlobalBatchIterator(
      lambda start: host_eval_batches(data_config, global_batch_size, split, limit=limit,
                                      start_batch=start),
      mesh, data_config.prefetch, _identity(data_config, split, global_batch_size, limit=limit))


def load_split_numpy(data_config: ml_collections.ConfigDict, split: str | None = None, *,
                     source_pixels: bool = False,
                     limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A split in memory: (uint8 images [N, H, W, C], int32 labels [N]); small data only, or the
  first `limit` examples.

  By default images are as the model sees them (centre-cropped, resized to image_size) on the
  scale 0–255; with `source_pixels` they are the stored records, unchanged (source size and
  value range, e.g. 0–16 for digits).
  """
  source = sources.open_split(data_config, split or data_config.eval_split)
  preprocess = _preprocess(data_config, source)
  count = len(source.records) if limit is None else min(limit, len(source.records))
  records = [source.records[index] for index in range(count)]
  labels = np.asarray([record["label"] if preprocess.labelled else 0 for record in records],
                      np.int32)
  if source_pixels:
    shapes = {np.shape(record["image"]) for record in records}
    if len(shapes) > 1:
      raise ValueError(f"{source.info.name} has images of {len(shapes)} different shapes; "
                       "load them with source_pixels=False")
    return np.stack([record["image"] for record in records]).astype(np.uint8), labels
  images = np.stack([preprocess(record)["image"] for record in records])
  return np.round((images + 1.0) * 127.5).astype(np.uint8), labels
