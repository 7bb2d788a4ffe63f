"""Evaluating a model's EMA params: bits/dim on held-out data, and FID or the offline quality
score of its samples. Used by `evaluate.py` and by the trainer every `train.eval_every` steps."""

import dataclasses
import math
import time

import jax

from jaxdiff import data, generate, images, schedules
from jaxdiff.evaluation import fid, likelihood, quality

METRICS = ("bpd", "fid", "quality")


def check_metric(metric: str, data_config) -> None:
  """A clear error, before any work, for a metric that cannot run on this dataset or machine."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
  if metric == "quality" and data.dataset_info(data_config).num_classes < 2:
    raise ValueError(f"the quality score judges digits with a classifier trained on labels; "
                     f"{data_config.dataset!r} has none: use metric fid or bpd")
  if metric == "fid":
    fid.check_available()


def generate_uint8(model, params, config, mesh, key, options: generate.SamplingOptions, *,
                   num_samples: int):
  """(samples as uint8 [N, H, W, C], the classes asked for (None when unconditional), the timing
  of `generate`); conditional models get the classes in turn, with `options.guidance_scale`."""
  size, channels = config.data.image_size, config.data.num_channels
  result = generate.generate(
      model.apply, {"params": params}, schedules.from_config(config.diffusion), key, options,
      num_samples=num_samples, image_shape=(size, size, channels),
      prediction=config.diffusion.prediction, num_classes=config.model.num_classes, mesh=mesh,
      progress=False)
  return images.to_uint8(result["images"]), result["labels"], result["timing"]


def bits_per_dim(model, params, config, mesh, key, *, num_images: int | None = None,
                 batch_size: int = 128, variance: str = "beta", timestep_chunk: int = 50) -> dict:
  """The bound in bits/dim on config.data.eval_split (its first `num_images`, default all),
  with the uniform baseline log2(levels) beside it."""
  schedule = schedules.from_config(config.diffusion)
  levels = likelihood.pixel_levels(data.dataset_info(config.data), config.data.image_size)
  bound_fn = likelihood.make_bound_fn(
      model.apply, schedule, mesh, num_levels=levels, num_classes=config.model.num_classes,
      prediction=config.diffusion.prediction, variance=variance,
      timestep_chunk=min(timestep_chunk, schedule.num_timesteps))
  if num_images is not None:
    batch_size = min(batch_size, math.ceil(num_images / mesh.size) * mesh.size)
  batches = data.make_eval_iterator(config.data, batch_size, mesh, limit=num_images)
  try:
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    result = likelihood.bits_per_dim(bound_fn, {"params": params}, batches, key, image_shape)
  finally:
    batches.close()
  return {"metric": f"NLL bound, bits/dim (DDPM L_vlb, {levels}-level discretised decoder, "
                    f"σ² = {variance})",
          **result, "uniform_bpd": math.log2(levels), "pixel_levels": levels}


def sample_metric(metric: str, model, params, config, mesh, key, *,
                  options: generate.SamplingOptions, num_samples: int) -> dict:
  """FID or the quality score of `num_samples` samples taken as `options` say; the result
  names the sampler and its step count, and keeps all the options under 'sampling'."""
  start = time.perf_counter()
  samples, labels, timing = generate_uint8(model, params, config, mesh, key, options,
                                           num_samples=num_samples)
  sampling_seconds = time.perf_counter() - start
  if metric == "quality":
    result = quality.quality_score(samples, config.data, labels=labels)
  else:
    result = fid.fid_of_samples(samples, config.data, mesh=mesh)
  return {**result, "sampler": options.sampler, "num_steps": options.num_steps,
          "sampling": dataclasses.asdict(options), "sampling_seconds": sampling_seconds,
          **timing}


def evaluate(metric: str, model, params, config, mesh, key, **options) -> dict:
  """`bits_per_dim` for 'bpd', else `sample_metric`; options go to the one chosen."""
  check_metric(metric, config.data)
  if metric == "bpd":
    return bits_per_dim(model, params, config, mesh, key, **options)
  return sample_metric(metric, model, params, config, mesh, key, **options)


def training_scalars(model, params, config, mesh, key) -> dict:
  """What the trainer logs every `train.eval_every` steps: the numbers of each metric in
  `config.eval.metrics`, named 'eval/<metric>/<number>'."""
  eval_config = config.eval
  scalars = {}
  for index, metric in enumerate(eval_config.metrics):
    metric_key = jax.random.fold_in(key, index)
    if metric == "bpd":
      result = bits_per_dim(model, params, config, mesh, metric_key,
                            num_images=eval_config.bpd_images,
                            batch_size=eval_config.batch_size,
                            timestep_chunk=eval_config.timestep_chunk)
    else:
      result = sample_metric(metric, model, params, config, mesh, metric_key,
                             options=generate.SamplingOptions.from_config(eval_config),
                             num_samples=eval_config.num_samples)
    scalars.update({f"eval/{metric}/{name}": value for name, value in result.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
  return scalars
