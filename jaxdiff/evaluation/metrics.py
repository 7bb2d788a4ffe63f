"""Every metric of a model's EMA params in one registry, METRICS: bits/dim on held-out data, and
FID or the offline quality score of its samples. evaluate.py, the trainer (`training_scalars`)
and `config_check` all read it.

A metric is one `Metric` entry: how it is computed, whether it judges samples (then it draws
them as `Request.sampling` says), how many by default, and what it needs of the data and the
machine. Adding one is a module computing it and an entry here.
"""

import dataclasses
import math
import time
from typing import Callable, NamedTuple

import jax

from jaxdiff import data, errors, generate, images
from jaxdiff.denoiser import Denoiser
from jaxdiff.errors import ArgumentError
from jaxdiff.evaluation import fid, likelihood, quality
from jaxdiff.samplers import SamplingOptions


class Request(NamedTuple):
  """How much to evaluate and how: `sampling` (how sample metrics draw their samples; its
  batch size also batches bpd's images), `num_samples` (sample metrics; None: the metric's
  default), `num_images` (bpd's held-out images; None: all), and bpd's reverse-process
  `variance` (σ_t² = β_t or β̃_t) and `timestep_chunk` (network calls of the bound run at once).
  `should_stop`: asked before each batch of samples (`generate.generate`) or of bpd's images,
  which raises `generate.Stopped` where it answers yes."""

  sampling: SamplingOptions = SamplingOptions()
  num_samples: int | None = None
  num_images: int | None = None
  variance: str = "beta"
  timestep_chunk: int = 50
  should_stop: Callable[[], bool] | None = None

  @classmethod
  def from_config(cls, eval_config) -> "Request":
    """The trainer's request: `config.eval`."""
    return cls(sampling=SamplingOptions.from_config(eval_config),
               num_samples=eval_config.num_samples, num_images=eval_config.bpd_images,
               timestep_chunk=eval_config.timestep_chunk)


@dataclasses.dataclass(frozen=True)
class Metric:
  """`compute(denoiser, params, data_config, mesh, key, request)` → a dict of results;
  `judges_samples`: it scores `request.num_samples` (default `default_num_samples`) samples;
  `check(data_config)`: ValueError where it cannot run on this dataset or machine;
  `processes`: the noise processes it is defined for (None: every one)."""

  compute: Callable[..., dict]
  judges_samples: bool
  default_num_samples: int | None
  check: Callable = lambda data_config: None
  processes: tuple[str, ...] | None = None


def bits_per_dim(denoiser: Denoiser, params, data_config, mesh, key, request: Request) -> dict:
  """The bound in bits/dim on `data_config.eval_split` (its first `request.num_images`, default
  all), with the uniform baseline log2(levels) beside it."""
  levels = likelihood.pixel_levels(data.dataset_info(data_config), data_config.image_size)
  bound_fn = likelihood.make_bound_fn(
      denoiser, params, mesh, num_levels=levels, variance=request.variance,
      timestep_chunk=min(request.timestep_chunk, denoiser.process.num_timesteps))
  batch_size, num_images = request.sampling.batch_size, request.num_images
  if num_images is not None:
    batch_size = min(batch_size, math.ceil(num_images / mesh.size) * mesh.size)
  batches = data.make_eval_iterator(data_config, batch_size, mesh, limit=num_images)
  try:
    result = likelihood.bits_per_dim(bound_fn, params, _stoppable(batches, request.should_stop),
                                     key, denoiser.image_shape)
  finally:
    batches.close()
  return {"metric": f"NLL bound, bits/dim (DDPM L_vlb, {levels}-level discretised decoder, "
                    f"σ² = {request.variance})",
          **result, "uniform_bpd": math.log2(levels), "pixel_levels": levels}


def _stoppable(batches, should_stop: Callable[[], bool] | None):
  """`batches`, with `should_stop()` asked before each is computed (`generate.Stopped` where it
  answers yes)."""
  for done, batch in enumerate(batches):
    if should_stop is not None and should_stop():
      raise generate.Stopped(done, None, "bits/dim")
    yield batch


def _sample_metric(judge: Callable) -> Callable[..., dict]:
  """compute() of a metric that judges samples: `request.num_samples` samples drawn as
  `request.sampling` says (conditional models: the classes in turn), as uint8, then
  `judge(samples, labels, data_config, mesh)`; the result names the sampler and its step count,
  keeps all the sampling options under 'sampling', and the sampling's time."""

  def compute(denoiser, params, data_config, mesh, key, request: Request) -> dict:
    start = time.perf_counter()
    result = generate.generate(denoiser, params, key, request.sampling,
                               num_samples=request.num_samples, mesh=mesh, progress=False,
                               should_stop=request.should_stop)
    sampling_seconds = time.perf_counter() - start
    scores = judge(images.to_uint8(result["images"]), result["labels"], data_config, mesh)
    options = request.sampling.resolved(denoiser.process)
    return {**scores, "sampler": options.sampler, "num_steps": options.num_steps,
            "sampling": dataclasses.asdict(options), "sampling_seconds": sampling_seconds,
            **result["timing"]}

  return compute


def _check_labelled(data_config) -> None:
  if data.dataset_info(data_config).num_classes < 2:
    raise ValueError(f"the quality score judges digits with a classifier trained on labels; "
                     f"{data_config.dataset!r} has none: use metric fid or bpd")


METRICS = {
    "bpd": Metric(bits_per_dim, judges_samples=False, default_num_samples=None,
                  processes=("ddpm",)),
    "fid": Metric(
        _sample_metric(lambda samples, labels, data_config, mesh:
                       fid.fid_of_samples(samples, data_config, mesh=mesh)),
        judges_samples=True, default_num_samples=10_000,
        check=lambda data_config: fid.check_available()),
    "quality": Metric(
        _sample_metric(lambda samples, labels, data_config, mesh:
                       quality.quality_score(samples, data_config, labels=labels)),
        judges_samples=True, default_num_samples=1000, check=_check_labelled),
}


def check_metric(name: str, data_config, process: str = "ddpm") -> Metric:
  """The metric `name`, once it is known to run on this dataset, machine and noise process
  (ArgumentError naming 'metric' otherwise)."""
  if name not in METRICS:
    raise ArgumentError("metric", name, f"unknown metric; choose one of {', '.join(METRICS)}")
  if METRICS[name].processes is not None and process not in METRICS[name].processes:
    raise ArgumentError("metric", name, f"defined for the process "
                        f"{' or '.join(METRICS[name].processes)} only (the bound of its "
                        f"discrete chain); this model's is {process}")
  try:
    METRICS[name].check(data_config)
  except (ValueError, FileNotFoundError) as error:
    raise ArgumentError("metric", name, errors.one_line(error)) from error
  return METRICS[name]


def evaluate(name: str, denoiser: Denoiser, params, data_config, mesh, key,
             request: Request = Request()) -> dict:
  """Metric `name` of `params`, as `request` says (its defaults: the metric's)."""
  metric = check_metric(name, data_config, denoiser.process.name)
  if metric.judges_samples and request.num_samples is None:
    request = request._replace(num_samples=metric.default_num_samples)
  return metric.compute(denoiser, params, data_config, mesh, key, request)


def training_scalars(denoiser: Denoiser, params, data_config, metric_names, request: Request,
                     mesh, key) -> dict:
  """What the trainer logs every `train.eval_every` steps: the numbers of each of
  `metric_names` (`config.eval.metrics`), named 'eval/<metric>/<number>'."""
  scalars = {}
  for index, name in enumerate(metric_names):
    result = evaluate(name, denoiser, params, data_config, mesh, jax.random.fold_in(key, index),
                      request)
    scalars.update(scalars_of(name, result))
  return scalars


def scalars_of(name: str, result: dict) -> dict:
  """The numbers of metric `name`'s result, as the rows of metric sinks name them:
  'eval/<metric>/<number>'."""
  return {f"eval/{name}/{number}": value for number, value in result.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool)}

