"""Generating images: a sampler jitted once, run batch by batch, data-parallel over the mesh,
as `samplers.SamplingOptions` say."""

import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import images, parallel, samplers
from jaxdiff.denoiser import Denoiser
from jaxdiff.samplers import SamplingOptions


class Stopped(Exception):
  """Work in batches (sampling, an evaluation) was asked to stop (`should_stop`) before its last
  batch; `done` batches were, of `total` (None: not known)."""

  def __init__(self, done: int, total: int | None, what: str = "sampling"):
    of_total = "" if total is None else f" of {total}"
    super().__init__(f"stopped after {done}{of_total} {what} batches")
    self.done, self.total = done, total


def generate(denoiser: Denoiser, params, key, options: SamplingOptions, *, num_samples: int,
             labels=None, trajectory_every: int | None = None, mesh=None,
             progress: bool = True, should_stop: Callable[[], bool] | None = None) -> dict:
  """`num_samples` images in [−1, 1], `options.batch_size` at a time, as numpy arrays:
  {'images': [N, H, W, C], 'labels': [N] or None, 'trajectory': [frames, N, H, W, C] or None,
   'timing': {'first_batch_seconds', 'images_per_second'}}: the wall time of the first batch
  (compiling included) and the steady rate after it, images computed after the first batch
  over their time (whole batches; None when there is only one batch).

  A conditional model (`denoiser.num_classes` > 0) gets `labels` (default: the classes in
  turn) with classifier-free guidance `options.guidance_scale`. Batch b uses key
  fold_in(key, b) and draws its noise for the whole batch inside one jitted program whose batch
  axis is split over the mesh, so the images do not depend on the number of devices (or hosts:
  every host gets every image). The params keep the train state's layout
  (`parallel.state_shardings`). The last partial batch is computed whole and cut.
  `should_stop()` is asked before each batch; where it answers yes, `Stopped` is raised (on
  several processes it must answer alike on all, as `cli.StopSignal` does).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = options.batch_size
  parallel.check_divisible(batch_size, mesh)
  options.check_model(denoiser)
  labels = _labels(denoiser, labels, num_samples, options.guidance_scale)
  batch_sharded = parallel.batch_sharding(mesh)
  frames_sharded = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))

  def sample_batch(params, batch_index, batch_labels):
    if labels is None:
      batch_labels = None
    else:
      batch_labels = jax.lax.with_sharding_constraint(batch_labels, batch_sharded)
    result = samplers.sample(denoiser, params, jax.random.fold_in(key, batch_index), options,
                             labels=batch_labels, trajectory_every=trajectory_every)
    return samplers.Samples(
        jax.lax.with_sharding_constraint(result.images, batch_sharded),
        None if result.trajectory is None
        else jax.lax.with_sharding_constraint(result.trajectory, frames_sharded))

  # The params keep the train state's layout (whole or split over fsdp); the rest in and out
  # replicated: every host passes and receives whole batches.
  replicated = parallel.replicated(mesh)
  sample_batch = jax.jit(
      sample_batch, in_shardings=(parallel.state_shardings(params, mesh), replicated,
                                  replicated), out_shardings=replicated)
  num_batches = -(-num_samples // batch_size)
  padded_labels = np.resize(labels if labels is not None else np.zeros(1, np.int32),
                            num_batches * batch_size).astype(np.int32)
  batches, seconds = [], []
  for b in tqdm(range(num_batches), desc="sampling", unit="batch", disable=not progress):
    if should_stop is not None and should_stop():
      raise Stopped(b, num_batches)
    batch_labels = padded_labels[b * batch_size:(b + 1) * batch_size]
    start = time.perf_counter()
    batches.append(jax.device_get(sample_batch(params, np.int32(b), batch_labels)))
    seconds.append(time.perf_counter() - start)
  image_batches, frame_batches = zip(*batches)
  steady_seconds = sum(seconds[1:])
  timing = {"first_batch_seconds": seconds[0],
            "images_per_second": (num_batches - 1) * batch_size / steady_seconds
                                 if num_batches > 1 else None}
  return {"images": np.concatenate(image_batches)[:num_samples], "labels": labels,
          "trajectory": None if trajectory_every is None
                        else np.concatenate(frame_batches, axis=1)[:, :num_samples],
          "timing": timing}


def timing_line(first_batch_seconds: float, images_per_second: float | None) -> str:
  """`generate`'s timing as one line: the first (compiling) batch, then the steady rate."""
  rate = ("one batch only, no steady rate" if images_per_second is None
          else f"then {images_per_second:.4g} images/s")
  return f"sampling: first batch (compile and run) {first_batch_seconds:.3g} s, {rate}"


def _labels(denoiser: Denoiser, labels, num_samples: int, guidance_scale: float):
  """Every sample's class label (default: the classes in turn), or None when the model is
  unconditional and asked for neither labels nor guidance."""
  if denoiser.num_classes == 0 and labels is None and guidance_scale == 0:
    return None
  denoiser.check_labels([] if labels is None else labels)
  if labels is None:
    return np.arange(num_samples, dtype=np.int32) % denoiser.num_classes
  return np.broadcast_to(np.asarray(labels, np.int32), (num_samples,)).copy()


def sample_grid(denoiser: Denoiser, params, options: SamplingOptions, num_samples: int, mesh,
                key, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
  """A uint8 grid of `num_samples` images sampled as `options` say (conditional models: the
  classes in turn); `Stopped` where `should_stop()` answers yes before a batch."""
  result = generate(denoiser, params, key, options, num_samples=num_samples, mesh=mesh,
                    progress=False, should_stop=should_stop)
  size = denoiser.image_shape[0]
  return images.make_grid(images.to_uint8(result["images"]), scale=images.display_scale(size))
