"""Negative log-likelihood in bits/dim through the DDPM variational bound, on held-out data.

bits/dim = (L_T + Σ_{t=1}^{T−1} L_{t−1} + L_0) / (D ln 2) per image (D pixels × channels),
averaged over the split; each term as in `jaxdiff.losses`. Every image gets all T terms, each
with its own noise; the T network calls run `timestep_chunk` at a time (one `lax.map` with
`batch_size`) inside one jitted program whose image axis is split over the mesh.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import losses, parallel
from jaxdiff.denoiser import Denoiser


def pixel_levels(info, image_size: int) -> int:
  """How many values a pixel takes as the model sees it: the stored range (17 for digits' 0–16)
  where images are used at their stored size, else 256 (resized images are 8-bit quantised)."""
  if info.image_shape[:2] == (image_size, image_size):
    return info.max_pixel_value + 1
  return 256


def quantize(x0, num_levels: int):
  """Images in [−1, 1] snapped onto the grid of `num_levels` values the likelihood is of."""
  steps = num_levels - 1
  return jnp.round((x0 + 1.0) * (steps / 2.0)) * (2.0 / steps) - 1.0


def make_bound_fn(denoiser: Denoiser, params, mesh, *, num_levels: int,
                  variance: str = "beta", clip_x0: bool = True, timestep_chunk: int = 50):
  """A jitted fn(params, batch, key) -> per-image terms in nats, masked sums over the batch:
  {'prior': [], 'terms': [T] (index 0 = L_0), 'total': [B] per image, 'mask': [B], 'count': []}.

  A class-conditional denoiser gives the bound of the model given each image's label. `batch`
  holds 'image' in [−1, 1] (snapped to the `num_levels` grid here), 'label' and 'mask' (False on
  padding). The params keep the train state's layout (`parallel.state_shardings` of `params`).
  """
  schedule, prediction = denoiser.process.schedule, denoiser.process.prediction
  num_timesteps = schedule.num_timesteps

  def bound(params, batch, key):
    x0 = quantize(batch["image"].astype(jnp.float32), num_levels)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"] if denoiser.num_classes else None
    network = lambda params, x, t: denoiser.output(params, x, t, labels)

    def term_at(t):
      noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)
      t_batch = jnp.full(x0.shape[:1], t, jnp.int32)
      return losses.vb_term(network, params, schedule, x0, t_batch, noise,
                            num_levels=num_levels, prediction=prediction,
                            variance=variance, clip_x0=clip_x0)

    terms = jax.lax.map(term_at, jnp.arange(num_timesteps), batch_size=timestep_chunk)
    prior = losses.prior_kl(schedule, x0)
    return {"prior": jnp.sum(prior * mask), "terms": terms @ mask,
            "total": prior + jnp.sum(terms, axis=0), "mask": batch["mask"],
            "count": jnp.sum(mask)}

  return jax.jit(bound, in_shardings=(parallel.state_shardings(params, mesh),
                                      parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh))


def bits_per_dim(bound_fn, params, batches, key, image_shape) -> dict:
  """Runs `make_bound_fn`'s program over `batches` (global batches with 'mask') and reports
  bits/dim: 'bpd' (total), 'prior_bpd' (L_T), 'diffusion_bpd' (Σ L_{t−1}, t ≥ 2, paper
  indices), 'decoder_bpd' (L_0), 'bpd_per_timestep' [T] (index 0 = L_0), 'bpd_stderr' (over
  images) and 'num_images'. Batch b uses key fold_in(key, b)."""
  nats_to_bpd = 1.0 / (math.prod(image_shape) * math.log(2.0))
  prior, terms, totals, count = 0.0, 0.0, [], 0.0
  for index, batch in enumerate(batches):
    result = jax.device_get(bound_fn(params, batch, jax.random.fold_in(key, index)))
    mask = np.asarray(result["mask"], bool)
    prior += float(result["prior"])
    terms = terms + np.asarray(result["terms"], np.float64)
    totals.append(np.asarray(result["total"], np.float64)[mask])
    count += float(result["count"])
  if not count:
    raise ValueError("no images to evaluate: the split is empty")
  per_timestep = terms / count * nats_to_bpd
  per_image = np.concatenate(totals) * nats_to_bpd
  return {
      "bpd": float(per_image.mean()),
      "prior_bpd": prior / count * nats_to_bpd,
      "diffusion_bpd": float(per_timestep[1:].sum()),
      "decoder_bpd": float(per_timestep[0]),
      "bpd_per_timestep": per_timestep.tolist(),
      "bpd_stderr": float(per_image.std(ddof=1) / math.sqrt(per_image.size))
                    if per_image.size > 1 else float("nan"),
      "num_images": int(count),
  }
