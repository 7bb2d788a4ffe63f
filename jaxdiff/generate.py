"""Generating images: a sampler jitted once, run batch by batch, data-parallel over the mesh."""

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import images, parallel, samplers


def generate(model_apply, variables, schedule, key, *, num_samples: int, image_shape,
             batch_size: int, sampler: str = "ddpm", num_steps: int | None = None,
             spacing: str | None = None, prediction: str = "eps", clip_x0: bool | None = None,
             labels=None, num_classes: int = 0, guidance_scale: float = 0.0,
             trajectory_every: int | None = None, mesh=None, progress: bool = True,
             **sampler_options) -> dict:
  """`num_samples` images in [−1, 1], `batch_size` at a time, as numpy arrays:
  {'images': [N, H, W, C], 'labels': [N] or None, 'trajectory': [frames, N, H, W, C] or None}.

  `model_apply(variables, x_t, t[, labels])` is the network (e.g. `UNet.apply`); a conditional
  model (`num_classes` > 0) gets `labels` (default: the classes in turn) with classifier-free
  guidance `guidance_scale`. Batch b uses key fold_in(key, b) and draws its noise for the whole
  batch inside one jitted program whose batch axis is split over the mesh axis `data`, so the
  images do not depend on the number of devices (or hosts: every host gets every image). The
  last partial batch is computed whole and cut. `sampler_options` go to the sampler.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_divisible(batch_size, mesh)
  labels = _labels(labels, num_samples, num_classes, guidance_scale)
  if clip_x0 is not None:
    sampler_options["clip_x0"] = clip_x0
  batch_sharded = parallel.batch_sharding(mesh)
  frames_sharded = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

  def sample_batch(variables, batch_index, batch_labels):
    apply_fn = model_apply
    if num_classes:
      batch_labels = jax.lax.with_sharding_constraint(batch_labels, batch_sharded)
      apply_fn = samplers.guided(model_apply, batch_labels, num_classes, guidance_scale)
    result = samplers.sample(
        sampler, apply_fn, variables, schedule, jax.random.fold_in(key, batch_index),
        (batch_size, *image_shape), num_steps=num_steps, spacing=spacing, prediction=prediction,
        trajectory_every=trajectory_every, **sampler_options)
    if trajectory_every is None:
      return jax.lax.with_sharding_constraint(result, batch_sharded), None
    final, frames = result
    return (jax.lax.with_sharding_constraint(final, batch_sharded),
            jax.lax.with_sharding_constraint(frames, frames_sharded))

  # Inputs and outputs replicated: every host passes and receives whole batches.
  sample_batch = jax.jit(sample_batch, in_shardings=parallel.replicated(mesh),
                         out_shardings=parallel.replicated(mesh))
  num_batches = -(-num_samples // batch_size)
  padded_labels = np.resize(labels if labels is not None else np.zeros(1, np.int32),
                            num_batches * batch_size).astype(np.int32)
  batches = []
  for b in tqdm(range(num_batches), desc="sampling", unit="batch", disable=not progress):
    batch_labels = padded_labels[b * batch_size:(b + 1) * batch_size]
    batches.append(jax.device_get(sample_batch(variables, np.int32(b), batch_labels)))
  image_batches, frame_batches = zip(*batches)
  return {"images": np.concatenate(image_batches)[:num_samples], "labels": labels,
          "trajectory": None if trajectory_every is None
                        else np.concatenate(frame_batches, axis=1)[:, :num_samples]}


def _labels(labels, num_samples: int, num_classes: int, guidance_scale: float):
  """Every sample's class label (default: the classes in turn), or None when the model is
  unconditional and asked for neither labels nor guidance."""
  if num_classes == 0 and labels is None and guidance_scale == 0:
    return None
  samplers.check_labels([] if labels is None else labels, num_classes)
  if labels is None:
    return np.arange(num_samples, dtype=np.int32) % num_classes
  return np.broadcast_to(np.asarray(labels, np.int32), (num_samples,)).copy()


def sample_grid(model, ema_params, schedule, config, mesh, key) -> np.ndarray:
  """A uint8 grid of `config.sample.num_samples` images from the EMA params."""
  size, channels = config.data.image_size, config.data.num_channels
  labels = None
  if config.model.num_classes:
    labels = np.arange(config.sample.num_samples) % config.model.num_classes
  result = generate(
      model.apply, {"params": ema_params}, schedule, key,
      num_samples=config.sample.num_samples, image_shape=(size, size, channels),
      batch_size=config.sample.batch_size, sampler=config.sample.sampler,
      num_steps=config.sample.num_steps, prediction=config.diffusion.prediction,
      clip_x0=config.sample.clip_x0, labels=labels, num_classes=config.model.num_classes,
      guidance_scale=config.sample.guidance_scale, mesh=mesh, progress=False)
  return images.make_grid(images.to_uint8(result["images"]), scale=images.display_scale(size))
