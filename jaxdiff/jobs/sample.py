"""What `sample.py` does: a trained model's EMA params → images and settings in a folder."""

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import numpy as np

from jaxdiff import errors, generate, images, parallel, storage, validation
from jaxdiff.jobs import cli
from jaxdiff.jobs import workdir as workdir_lib


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
  """UsageError unless `dtype` (the --dtype flag) is None or a compute dtype."""
  if dtype is not None:
    with cli.naming_flags():
      validation.one_of("dtype", dtype, validation.COMPUTE_DTYPES, "compute dtype")


def run(workdir: str, output_dir: str, sampling: dict | None = None, *,
        checkpoint_step: int | None = None, num_samples: int = 64, seed: int = 0,
        class_label: int | None = None, trajectory_every: int | None = None,
        dtype: str | None = None, progress: bool = True) -> Written:
  """What `sample.py` does: EMA params from `workdir` → images sampled as the model's own
  `config.sample` says, overridden by `sampling` (the flags given: SamplingOptions fields), by
  the network computing in `dtype` (None: as trained), written to `output_dir` as samples.png,
  samples.npz, settings.json (everything used) and trajectory.png. Refuses bad requests
  (UsageError naming the flag) before loading the model where it can, else before sampling.
  SIGTERM or Ctrl-C stops it before its next batch, writing nothing (`cli.stoppable`). Returns
  the paths written and the sampling's timing."""
  check_positive(num_samples=num_samples, trajectory_every=trajectory_every)
  check_folder("output_dir", output_dir)
  check_dtype(dtype)
  cli.check_sampling_flags(sampling or {})
  with cli.stoppable() as stop:  # nothing is written until every batch is drawn
    trained = workdir_lib.load_model(workdir, checkpoint_step)
    step = trained.step
    with cli.naming_flags(labels="class_label"):
      denoiser = trained.denoiser.computing_in(dtype)
      options = cli.sampling_options(trained.config.sample, sampling or {})
      mesh = parallel.make_mesh(jax.local_devices())
      result = generate.generate(denoiser, trained.params, jax.random.key(seed), options,
                                 num_samples=num_samples, labels=class_label,
                                 trajectory_every=trajectory_every, mesh=mesh, progress=progress,
                                 should_stop=stop.should_stop)
    storage.makedirs(output_dir)
    pixels = images.to_uint8(result["images"])
    paths = {name: storage.join(output_dir, name)
             for name in ("samples.png", "samples.npz", "settings.json", "trajectory.png")}
    scale = images.display_scale(denoiser.image_shape[0])
    images.save_png(paths["samples.png"], images.make_grid(pixels, scale=scale))
    with storage.open_file(paths["samples.npz"], "wb") as f:
      np.savez_compressed(f, images=pixels,
                          labels=result["labels"] if result["labels"] is not None
                          else np.full(num_samples, -1, np.int32))
    settings = dict(workdir=storage.resolve(workdir), checkpoint_step=step,
                    **dataclasses.asdict(options.resolved(denoiser.process)),
                    num_samples=num_samples, seed=seed,
                    class_label=class_label, trajectory_every=trajectory_every,
                    dtype=denoiser.dtype, **result["timing"], devices=len(mesh.devices.flat),
                    config=json.loads(trained.config.to_json_best_effort()))
    storage.write_text(paths["settings.json"], json.dumps(settings, indent=2))
    if trajectory_every is None:
      del paths["trajectory.png"]
    else:
      frames = images.to_uint8(result["trajectory"][:, :8])  # [frames, ≤8 samples, H, W, C]
      images.save_png(paths["trajectory.png"], images.trajectory_strip(frames, scale=scale))
    return Written(list(paths.values()), result["timing"])
