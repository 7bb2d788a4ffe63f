"""Generating images: a sampler jitted once, run batch by batch, data-parallel over the mesh."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import checkpoint, images, parallel, samplers, schedules, training


def generate(model_apply, variables, schedule, key, *, num_samples: int, image_shape,
             batch_size: int, sampler: str = "ddpm", num_steps: int | None = None,
             spacing: str | None = None, prediction: str = "eps", clip_x0: bool | None = None,
             labels=None, num_classes: int = 0, guidance_scale: float = 0.0,
             trajectory_every: int | None = None, mesh=None, progress: bool = True,
             **sampler_options) -> dict:
  """`num_samples` images in [−1, 1], `batch_size` at a time, as numpy arrays:
  {'images': [N, H, W, C], 'labels': [N] or None, 'trajectory': [frames, N, H, W, C] or None}.

  `model_apply(variables, x_t, t[, labels])` is the network (e.g. `UNet.apply`). Batch b uses
  key fold_in(key, b) and draws its noise for the whole batch inside one jitted program whose
  batch axis is split over the mesh, so the images do not depend on the number of devices.
  The last partial batch is computed whole and cut.
  """
  sampler_fn = samplers.get_sampler(sampler)
  spacing = spacing or samplers.DEFAULT_SPACING[sampler]
  num_steps = schedule.num_timesteps if num_steps is None else num_steps
  timesteps = samplers.spaced_timesteps(schedule, num_steps, spacing)
  respaced = samplers.respace(schedule, timesteps)
  labels = _check_labels(labels, num_samples, num_classes, guidance_scale)
  mesh = mesh or parallel.make_mesh()
  parallel.check_divisible(batch_size, mesh)
  if clip_x0 is not None:
    sampler_options["clip_x0"] = clip_x0

  def sample_batch(variables, respaced, timesteps, key, batch_labels):
    apply_fn = (samplers.guided(model_apply, batch_labels, num_classes, guidance_scale)
                if num_classes else model_apply)
    return sampler_fn(apply_fn, variables, respaced, key, (batch_size, *image_shape),
                      timesteps=timesteps, prediction=prediction,
                      trajectory_every=trajectory_every, **sampler_options)

  replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  out_shardings = batch_sharded if trajectory_every is None else (
      batch_sharded, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))
  sample_batch = jax.jit(sample_batch, in_shardings=(replicated, replicated, replicated,
                                                     replicated, batch_sharded),
                         out_shardings=out_shardings)
  num_batches = -(-num_samples // batch_size)
  padded_labels = np.resize(labels if labels is not None else np.zeros(1, np.int32),
                            num_batches * batch_size).astype(np.int32)
  outputs = []
  for b in tqdm(range(num_batches), desc="sampling", unit="batch", disable=not progress):
    batch_labels = padded_labels[b * batch_size:(b + 1) * batch_size]
    outputs.append(jax.device_get(sample_batch(variables, respaced, jnp.asarray(timesteps),
                                               jax.random.fold_in(key, b), batch_labels)))
  if trajectory_every is None:
    return {"images": np.concatenate(outputs)[:num_samples], "labels": labels, "trajectory": None}
  return {"images": np.concatenate([o[0] for o in outputs])[:num_samples], "labels": labels,
          "trajectory": np.concatenate([o[1] for o in outputs], axis=1)[:, :num_samples]}


def _check_labels(labels, num_samples: int, num_classes: int, guidance_scale: float):
  if not num_classes:
    if labels is not None or guidance_scale:
      raise ValueError("this model is unconditional (model.num_classes = 0): class labels and "
                       "guidance need a model trained with labels")
    return None
  labels = (np.arange(num_samples) % num_classes if labels is None
            else np.broadcast_to(np.asarray(labels, np.int32), (num_samples,)))
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"class labels must be in [0, {num_classes}), "
                     f"got {sorted(set(labels.tolist()))}")
  return labels.astype(np.int32)


def sample_to_dir(workdir: str, output_dir: str, *, checkpoint_step: int | None = None,
                  sampler: str = "dpm_solver", num_steps: int = 20, num_samples: int = 64,
                  batch_size: int = 64, seed: int = 0, guidance_scale: float = 0.0,
                  class_label: int | None = None, eta: float = 0.0,
                  trajectory_every: int | None = None, progress: bool = True) -> list[str]:
  """What `sample.py` does: EMA params from `workdir` → images, written to `output_dir` as
  samples.png, samples.npz, settings.json (and trajectory.png). Returns the paths written."""
  samplers.get_sampler(sampler)
  ema_params, config, step = checkpoint.load_for_sampling(workdir, checkpoint_step)
  mesh = parallel.make_mesh(jax.local_devices())
  model = training.create_model(config)
  size, channels = config.data.image_size, config.data.num_channels
  options = {"eta": eta} if sampler == "ddim" else {}
  result = generate(
      model.apply, {"params": ema_params}, schedules.from_config(config.diffusion), jax.random.key(seed),
      num_samples=num_samples, image_shape=(size, size, channels), batch_size=batch_size,
      sampler=sampler, num_steps=num_steps, prediction=config.diffusion.prediction,
      labels=class_label, num_classes=config.model.num_classes,
      guidance_scale=guidance_scale, trajectory_every=trajectory_every, mesh=mesh,
      progress=progress, **options)
  os.makedirs(output_dir, exist_ok=True)
  pixels = images.to_uint8(result["images"])
  paths = {name: os.path.join(output_dir, name)
           for name in ("samples.png", "samples.npz", "settings.json", "trajectory.png")}
  scale = images.display_scale(size)
  images.save_png(paths["samples.png"], images.make_grid(pixels, scale=scale))
  np.savez_compressed(paths["samples.npz"], images=pixels,
                      labels=result["labels"] if result["labels"] is not None
                      else np.full(num_samples, -1, np.int32))
  settings = dict(workdir=os.path.abspath(workdir), checkpoint_step=step, sampler=sampler,
                  num_steps=num_steps, num_samples=num_samples, batch_size=batch_size, seed=seed,
                  guidance_scale=guidance_scale, class_label=class_label, eta=eta,
                  trajectory_every=trajectory_every, devices=len(mesh.devices.flat),
                  config=json.loads(config.to_json_best_effort()))
  with open(paths["settings.json"], "w") as f:
    json.dump(settings, f, indent=2)
  if trajectory_every is None:
    del paths["trajectory.png"]
  else:
    frames = images.to_uint8(result["trajectory"][:, :8])  # [frames, ≤8 samples, H, W, C]
    images.save_png(paths["trajectory.png"],
                    images.make_grid(frames.swapaxes(0, 1).reshape(-1, *frames.shape[2:]),
                                     num_columns=frames.shape[0], scale=scale))
  return list(paths.values())

