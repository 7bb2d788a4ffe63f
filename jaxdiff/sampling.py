"""Data-parallel image generation: batches of a jitted sampler over the `data` mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import parallel, samplers


def generate(apply_fn, variables, schedule, key, *, num_samples: int, image_shape, batch_size: int,
             sampler: str = "ddpm", num_steps: int | None = None, prediction: str = "eps",
             clip_x0: bool = True, labels=None, num_classes: int = 0, guidance_scale: float = 0.0,
             mesh=None, progress: bool = True):
  """`num_samples` images [N, H, W, C] in [−1, 1] from `sampler`, `batch_size` at a time.

  Batch b uses key fold_in(key, b); its noise is drawn for the whole batch inside one jitted
  program whose batch axis is split over the mesh, so the images do not depend on the number
  of devices.
  """
  mesh = mesh or parallel.make_mesh()
  parallel.check_divisible(batch_size, mesh)
  del labels, num_classes, guidance_scale, num_steps
  sample_fn = jax.jit(
      functools.partial(getattr(samplers, sampler), apply_fn, shape=(batch_size, *image_shape),
                        prediction=prediction, clip_x0=clip_x0),
      in_shardings=(parallel.replicated(mesh), None, None),
      out_shardings=parallel.batch_sharding(mesh))
  batches = []
  for index in tqdm(range(-(-num_samples // batch_size)), desc="sampling", disable=not progress):
    batches.append(np.asarray(sample_fn(variables, schedule, jax.random.fold_in(key, index))))
  return {"images": np.concatenate(batches)[:num_samples]}
