"""Generating images: a sampler jitted once, run batch by batch, data-parallel over the mesh.

`SamplingOptions` is the one translation from flags or a config section (`config.sample`,
`config.eval`) to a sampler run; `generate` takes it."""

import dataclasses
import time

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import errors, images, parallel, samplers


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to sample: `sampler` on `num_steps` timesteps (None: all T) spaced by `spacing`, x̂0
  clipped to [−1, 1] by `clip_x0` and/or dynamically thresholded at `threshold_percentile`,
  DDIM's `eta`, classifier-free guidance `guidance_scale`, and `batch_size` images per compiled
  call. `spacing` and `clip_x0` None: the sampler's registered defaults. Checked on creation
  (errors.UsageError naming the field and its value)."""

  sampler: str = "ddpm"
  num_steps: int | None = None
  spacing: str | None = None
  clip_x0: bool | None = None
  threshold_percentile: float | None = None
  eta: float = 0.0
  guidance_scale: float = 0.0
  batch_size: int = 64

  def __post_init__(self):
    def refuse(name, what_to_do):
      raise errors.UsageError(f"{name} = {getattr(self, name)!r}: {what_to_do}")

    if self.sampler not in samplers.SAMPLERS:
      refuse("sampler", f"unknown sampler; choose one of {', '.join(sorted(samplers.SAMPLERS))}")
    if self.num_steps is not None and self.num_steps < 1:
      refuse("num_steps", "a sampler takes at least 1 step; choose 1 … T")
    if self.spacing is not None and self.spacing not in samplers.SPACINGS:
      refuse("spacing", f"unknown spacing; choose one of {', '.join(samplers.SPACINGS)}")
    if self.threshold_percentile is not None and not 0 < self.threshold_percentile <= 1:
      refuse("threshold_percentile", "a quantile of |x̂0| in (0, 1], e.g. 0.995")
    if self.eta and self.sampler != "ddim":
      refuse("eta", f"η is DDIM's noise scale; use it with sampler ddim, not {self.sampler}")
    if self.batch_size < 1:
      refuse("batch_size", "a batch holds at least 1 image; choose a positive batch size")

  @classmethod
  def from_config(cls, section) -> "SamplingOptions":
    """The options a config section (`config.sample`, `config.eval`) names; the defaults for
    those it does not."""
    names = [field.name for field in dataclasses.fields(cls)]
    return cls(**{name: section[name] for name in names if name in section})

  def check_num_steps(self, num_timesteps: int) -> None:
    """errors.UsageError unless num_steps fits a model of `num_timesteps` diffusion steps."""
    if self.num_steps is not None and self.num_steps > num_timesteps:
      raise errors.UsageError(
          f"num_steps = {self.num_steps}: more than the model's T = {num_timesteps} diffusion "
          f"steps; choose 1 … {num_timesteps}")

  def sampler_keywords(self) -> dict:
    """The keywords of `samplers.sample` for these options, but the batch size."""
    return dict(num_steps=self.num_steps, spacing=self.spacing, clip_x0=self.clip_x0,
                threshold_percentile=self.threshold_percentile,
                guidance_scale=self.guidance_scale,
                **({"eta": self.eta} if self.sampler == "ddim" else {}))


def generate(model_apply, variables, schedule, key, options: SamplingOptions, *,
             num_samples: int, image_shape, prediction: str = "eps", labels=None,
             num_classes: int = 0, trajectory_every: int | None = None, mesh=None,
             progress: bool = True) -> dict:
  """`num_samples` images in [−1, 1], `options.batch_size` at a time, as numpy arrays:
  {'images': [N, H, W, C], 'labels': [N] or None, 'trajectory': [frames, N, H, W, C] or None,
   'timing': {'first_batch_seconds', 'images_per_second'}}: the wall time of the first batch
  (compiling included) and the steady rate after it, images computed after the first batch
  over their time (whole batches; None when there is only one batch).

  `model_apply(variables, x_t, t[, labels])` is the network (e.g. `UNet.apply`); a conditional
  model (`num_classes` > 0) gets `labels` (default: the classes in turn) with classifier-free
  guidance `options.guidance_scale`. Batch b uses key fold_in(key, b) and draws its noise for
  the whole batch inside one jitted program whose batch axis is split over the mesh axis
  `data`, so the images do not depend on the number of devices (or hosts: every host gets
  every image). The last partial batch is computed whole and cut.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = options.batch_size
  parallel.check_divisible(batch_size, mesh)
  options.check_num_steps(schedule.num_timesteps)
  labels = _labels(labels, num_samples, num_classes, options.guidance_scale)
  batch_sharded = parallel.batch_sharding(mesh)
  frames_sharded = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))

  def sample_batch(variables, batch_index, batch_labels):
    if labels is None:
      batch_labels = None
    else:
      batch_labels = jax.lax.with_sharding_constraint(batch_labels, batch_sharded)
    result = samplers.sample(
        options.sampler, model_apply, variables, schedule, jax.random.fold_in(key, batch_index),
        (batch_size, *image_shape), prediction=prediction, labels=batch_labels,
        num_classes=num_classes, trajectory_every=trajectory_every,
        **options.sampler_keywords())
    return samplers.Samples(
        jax.lax.with_sharding_constraint(result.images, batch_sharded),
        None if result.trajectory is None
        else jax.lax.with_sharding_constraint(result.trajectory, frames_sharded))

  # The variables keep the train state's layout (`parallel.state_shardings`: whole or split over
  # fsdp); the rest in and out replicated: every host passes and receives whole batches.
  replicated = parallel.replicated(mesh)
  sample_batch = jax.jit(
      sample_batch, in_shardings=(parallel.state_shardings(variables, mesh), replicated,
                                  replicated), out_shardings=replicated)
  num_batches = -(-num_samples // batch_size)
  padded_labels = np.resize(labels if labels is not None else np.zeros(1, np.int32),
                            num_batches * batch_size).astype(np.int32)
  batches, seconds = [], []
  for b in tqdm(range(num_batches), desc="sampling", unit="batch", disable=not progress):
    batch_labels = padded_labels[b * batch_size:(b + 1) * batch_size]
    start = time.perf_counter()
    batches.append(jax.device_get(sample_batch(variables, np.int32(b), batch_labels)))
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
  """A uint8 grid of `config.sample.num_samples` images from the EMA params, sampled as
  `config.sample` says (conditional models: the classes in turn)."""
  size, channels = config.data.image_size, config.data.num_channels
  result = generate(
      model.apply, {"params": ema_params}, schedule, key,
      SamplingOptions.from_config(config.sample), num_samples=config.sample.num_samples,
      image_shape=(size, size, channels), prediction=config.diffusion.prediction,
      num_classes=config.model.num_classes, mesh=mesh, progress=False)
  return images.make_grid(images.to_uint8(result["images"]), scale=images.display_scale(size))
