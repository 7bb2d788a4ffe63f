"""What `sample.py` does: a trained model's EMA params → images and settings in a folder."""

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import numpy as np

from jaxdiff import errors, generate, images, parallel, storage
from jaxdiff.jobs import workdir as workdir_lib

DTYPES = ("float32", "bfloat16")


class Written(NamedTuple):
  """What `run` wrote (paths) and how fast it sampled (`generate.generate`'s timing)."""

  paths: list[str]
  timing: dict


def check_positive(**counts) -> None:
  """errors.UsageError naming the first flag `--name=value` that is set (not None) and < 1."""
  for name, value in counts.items():
    if value is not None and value < 1:
      raise errors.UsageError(f"--{name}={value}: must be at least 1; pass a positive number "
                              f"or leave the flag out for its default")


def check_folder(flag: str, value: str, folder: str | None = None) -> None:
  """errors.UsageError when `folder` (default: `value`, the flag's), a folder to write into, or
  a folder above it is an existing file."""
  existing = storage.resolve(value if folder is None else folder)
  while not storage.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if storage.exists(existing) and not storage.isdir(existing):
    raise errors.UsageError(f"--{flag}={value}: {existing} is a file, not a folder; choose a "
                            f"path with no file in the way")


def check_dtype(dtype: str | None) -> None:
  """errors.UsageError unless `dtype` (the --dtype flag) is None or one of DTYPES."""
  if dtype is not None and dtype not in DTYPES:
    raise errors.UsageError(f"--dtype={dtype}: not a compute dtype; choose one of "
                            f"{', '.join(DTYPES)} (or leave it out for the model's own)")


def computing_in(model, dtype: str | None):
  """`model` (a UNet) computing in `dtype`, None: in its config.model.dtype. Its float32 params
  fit either; time and its embedding stay float32 inside (models/unet.py), and the samplers'
  x and schedule coefficients are float32 outside."""
  return model if dtype is None else model.clone(dtype=dtype)


def run(workdir: str, output_dir: str, options: generate.SamplingOptions, *,
        checkpoint_step: int | None = None, num_samples: int = 64, seed: int = 0,
        class_label: int | None = None, trajectory_every: int | None = None,
        dtype: str | None = None, progress: bool = True) -> Written:
  """What `sample.py` does: EMA params from `workdir` → images sampled as `options` say, by
  the network computing in `dtype` (None: as trained), written to `output_dir` as
  samples.png, samples.npz, settings.json (and trajectory.png). Refuses bad requests
  (errors.UsageError) before loading the model, and a step count beyond the model's T
  (`generate`) before sampling. Returns the paths written and the sampling's timing."""
  check_positive(num_samples=num_samples, trajectory_every=trajectory_every)
  check_dtype(dtype)
  check_folder("output_dir", output_dir)
  trained = workdir_lib.load_model(workdir, checkpoint_step)
  config, step = trained.config, trained.step
  model = computing_in(trained.model, dtype)
  mesh = parallel.make_mesh(jax.local_devices())
  size, channels = config.data.image_size, config.data.num_channels
  result = generate.generate(
      model.apply, {"params": trained.params}, trained.schedule, jax.random.key(seed),
      options, num_samples=num_samples, image_shape=(size, size, channels),
      prediction=config.diffusion.prediction, labels=class_label,
      num_classes=config.model.num_classes, trajectory_every=trajectory_every, mesh=mesh,
      progress=progress)
  storage.makedirs(output_dir)
  pixels = images.to_uint8(result["images"])
  paths = {name: storage.join(output_dir, name)
           for name in ("samples.png", "samples.npz", "settings.json", "trajectory.png")}
  scale = images.display_scale(size)
  images.save_png(paths["samples.png"], images.make_grid(pixels, scale=scale))
  with storage.open_file(paths["samples.npz"], "wb") as f:
    np.savez_compressed(f, images=pixels,
                        labels=result["labels"] if result["labels"] is not None
                        else np.full(num_samples, -1, np.int32))
  settings = dict(workdir=storage.resolve(workdir), checkpoint_step=step,
                  **dataclasses.asdict(options), num_samples=num_samples, seed=seed,
                  class_label=class_label, trajectory_every=trajectory_every,
                  dtype=model.dtype, **result["timing"], devices=len(mesh.devices.flat),
                  config=json.loads(config.to_json_best_effort()))
  storage.write_text(paths["settings.json"], json.dumps(settings, indent=2))
  if trajectory_every is None:
    del paths["trajectory.png"]
  else:
    frames = images.to_uint8(result["trajectory"][:, :8])  # [frames, ≤8 samples, H, W, C]
    images.save_png(paths["trajectory.png"], images.trajectory_strip(frames, scale=scale))
  return Written(list(paths.values()), result["timing"])
