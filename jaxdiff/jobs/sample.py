"""What `sample.py` does: a trained model's EMA params → images and settings in a folder."""

import json
import os

import jax
import numpy as np

from jaxdiff import generate, images, parallel, samplers
from jaxdiff.jobs import workdir as workdir_lib


def run(workdir: str, output_dir: str, *, checkpoint_step: int | None = None,
        sampler: str = "dpm_solver", num_steps: int = 20, num_samples: int = 64,
        batch_size: int = 64, seed: int = 0, guidance_scale: float = 0.0,
        class_label: int | None = None, eta: float = 0.0, trajectory_every: int | None = None,
        progress: bool = True) -> list[str]:
  """What `sample.py` does: EMA params from `workdir` → images, written to `output_dir` as
  samples.png, samples.npz, settings.json (and trajectory.png). Returns the paths written."""
  samplers.get_sampler(sampler)
  trained = workdir_lib.load_model(workdir, checkpoint_step)
  config, step = trained.config, trained.step
  mesh = parallel.make_mesh(jax.local_devices())
  size, channels = config.data.image_size, config.data.num_channels
  options = {"eta": eta} if sampler == "ddim" else {}
  result = generate.generate(
      trained.model.apply, {"params": trained.params}, trained.schedule, jax.random.key(seed),
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
    images.save_png(paths["trajectory.png"], images.trajectory_strip(frames, scale=scale))
  return list(paths.values())

