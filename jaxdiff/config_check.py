"""The whole training config checked before anything touches the workdir.

`check_train_config(config, num_devices, num_processes)` raises `errors.UsageError` with one line
that names the field as the user sets it (`--config.train.batch_size=0`), its value and what to
do. Names are checked by the constructors that use them (`schedules.from_config`,
`train_step.learning_rate_schedule`, `diffusion.check_prediction`, `losses.check_loss_weighting`,
`samplers.get_sampler`, `samplers.spaced_timesteps`, `metrics.check_metric`, `data.dataset_info`,
`data.check_model_compatible`): their ValueErrors become UsageErrors that name the field.
`config.sample` is checked when the run draws sample grids (train.sample_every > 0) and
`config.eval` when it evaluates (train.eval_every > 0): a run is refused only for what it uses.
"""

import contextlib
import difflib
import math

from jaxdiff import data, diffusion, errors, losses, parallel, samplers, schedules, train_step
from jaxdiff.evaluation import metrics

# Whole-number fields and the smallest value each allows.
WHOLE_NUMBERS = {
    "data.image_size": 1, "data.num_channels": 1, "data.num_workers": 0, "data.prefetch": 0,
    "model.ch": 1, "model.num_res_blocks": 0, "model.num_classes": 0, "model.num_heads": 1,
    "diffusion.num_timesteps": 1,
    "train.num_steps": 1, "train.batch_size": 1, "train.warmup_steps": 0, "train.max_to_keep": 1,
    "train.max_nonfinite_steps": 1, "train.loss_bins": 1,
}
# Whole numbers a config may leave out; then their smallest value stands in (one micro-batch, one
# optimizer step per compiled call).
OPTIONAL_WHOLE_NUMBERS = {"train.grad_accum_steps": 1, "train.steps_per_call": 1}
SAMPLE_WHOLE_NUMBERS = {"sample.num_samples": 1, "sample.batch_size": 1}
EVAL_WHOLE_NUMBERS = {"eval.num_samples": 1, "eval.batch_size": 1}
BPD_WHOLE_NUMBERS = {"eval.bpd_images": 1, "eval.timestep_chunk": 1}
# Step intervals: log_every ≥ 1; the others ≥ 0, where 0 means never (checkpoint_every = 0: only
# at the end and on a stop signal). Configs without one get its smallest value.
INTERVALS = {"train.log_every": 1, "train.checkpoint_every": 0, "train.sample_every": 0,
             "train.eval_every": 0}
# Real-number fields: the interval each must lie in, as (low, high, low included, high included).
REAL_NUMBERS = {
    "model.dropout": (0.0, 1.0, True, False),
    "train.learning_rate": (0.0, math.inf, False, False),
    "train.grad_clip": (0.0, math.inf, False, False),
    "train.adam_b1": (0.0, 1.0, True, False),
    "train.adam_b2": (0.0, 1.0, True, False),
    "train.adam_eps": (0.0, math.inf, False, False),
    "train.weight_decay": (0.0, math.inf, True, False),
    "train.ema_decay": (0.0, 1.0, True, False),
    "train.p_uncond": (0.0, 1.0, True, True),
}
SAMPLE_REAL_NUMBERS = {"sample.guidance_scale": (0.0, math.inf, True, False)}
MIN_SNR_REAL_NUMBERS = {"diffusion.min_snr_gamma": (0.0, math.inf, False, False)}
_MISSING = object()


def flag(field: str, value) -> str:
  """How a user sets `field` to `value`: --config.train.batch_size=0."""
  return f"--config.{field}={value}"


def usage_error(field: str, value, problem) -> errors.UsageError:
  """'--config.FIELD=VALUE: PROBLEM' on one line."""
  return errors.UsageError(f"{flag(field, value)}: {one_line(problem)}")


def one_line(message) -> str:
  return " ".join(str(message).split())


def get(config, field: str, default=_MISSING):
  """config's value at the dotted `field`; `default` where it is absent (a UsageError when no
  default is given)."""
  value = config
  for part in field.split("."):
    if part not in value:
      if default is _MISSING:
        raise errors.UsageError(f"the config has no field {field}: add it to the config file "
                                f"(configs/default.py has every field)")
      return default
    value = value[part]
  return value


@contextlib.contextmanager
def refusing(field: str, value):
  """Turns a ValueError, TypeError or KeyError raised inside into a UsageError naming `field`."""
  try:
    yield
  except (ValueError, TypeError, KeyError) as error:
    if isinstance(error, errors.UsageError) and str(error).startswith("--config."):
      raise
    raise usage_error(field, value, error) from error


def is_whole(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_whole_numbers(config, minimum: dict) -> None:
  for field, low in minimum.items():
    optional = field in INTERVALS or field in OPTIONAL_WHOLE_NUMBERS
    value = get(config, field, low if optional else _MISSING)
    if not is_whole(value) or value < low:
      never = " (0 means never)" if field in INTERVALS and low == 0 else ""
      raise usage_error(field, value, f"expected a whole number ≥ {low}{never}")


def in_interval(value, low: float, high: float, low_included: bool, high_included: bool) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low <= value if low_included else low < value)
          and (value <= high if high_included else value < high))


def interval_text(low: float, high: float, low_included: bool, high_included: bool) -> str:
  """'a finite number > 0', 'a number in [0, 1)'."""
  if math.isinf(high):
    return f"a finite number {'≥' if low_included else '>'} {low:g}"
  opening, closing = "[" if low_included else "(", "]" if high_included else ")"
  return f"a number in {opening}{low:g}, {high:g}{closing}"


def check_real_numbers(config, intervals: dict) -> None:
  for field, interval in intervals.items():
    value = get(config, field)
    if not in_interval(value, *interval):
      raise usage_error(field, value, f"expected {interval_text(*interval)}")


def check_sizes(config) -> None:
  """Every whole number, interval and real number the run uses is of its type and range."""
  check_whole_numbers(config, {**WHOLE_NUMBERS, **INTERVALS, **OPTIONAL_WHOLE_NUMBERS})
  check_real_numbers(config, REAL_NUMBERS)
  resume_step = get(config, "train.resume_step", None)
  if resume_step is not None and (not is_whole(resume_step) or resume_step < 1):
    raise usage_error("train.resume_step", resume_step,
                      "expected the step number of a checkpoint in the workdir (≥ 1), or None "
                      "for the newest good one")
  if get(config, "train.sample_every", 0):
    check_whole_numbers(config, SAMPLE_WHOLE_NUMBERS)
    check_real_numbers(config, SAMPLE_REAL_NUMBERS)
  if get(config, "train.eval_every", 0):
    check_whole_numbers(config, EVAL_WHOLE_NUMBERS)
    if "bpd" in eval_metrics(config):
      check_whole_numbers(config, BPD_WHOLE_NUMBERS)


def eval_metrics(config) -> tuple[str, ...]:
  """config.eval.metrics, refused unless it is a tuple (or list) of names."""
  chosen = get(config, "eval.metrics")
  if not isinstance(chosen, (tuple, list)) or not all(isinstance(m, str) for m in chosen):
    raise usage_error("eval.metrics", chosen,
                      f"expected a tuple of metric names, e.g. \"('{metrics.METRICS[0]}',)\"")
  return tuple(chosen)


def check_sampler(config, section: str, schedule: schedules.Schedule) -> None:
  """config.<section>'s sampler, its spacing (unset: the sampler's) and its step count
  (1 … T), by the functions that use them."""
  name, num_steps = get(config, f"{section}.sampler"), get(config, f"{section}.num_steps")
  with refusing(f"{section}.sampler", name):
    samplers.get_sampler(name)
  spacing = get(config, f"{section}.spacing", None)
  with refusing(f"{section}.spacing", spacing):
    spacing = samplers.get_sampler(name).spacing if spacing is None else spacing
    samplers.spaced_timesteps(schedule, 1, spacing)
  if not is_whole(num_steps):
    raise usage_error(f"{section}.num_steps", num_steps, "expected a whole number of steps ≥ 1")
  with refusing(f"{section}.num_steps", num_steps):
    samplers.spaced_timesteps(schedule, num_steps, spacing)


def check_loss_and_terminal_snr(config) -> None:
  """The loss weighting (its γ when it is min_snr), and the zero-terminal-SNR rescale: a bool,
  and only with v-prediction (Lin et al. 2024)."""
  weighting = get(config, "diffusion.loss_weighting")
  with refusing("diffusion.loss_weighting", weighting):
    losses.check_loss_weighting(weighting)
  if weighting == "min_snr":
    check_real_numbers(config, MIN_SNR_REAL_NUMBERS)
  field = "diffusion.rescale_zero_terminal_snr"
  rescale = get(config, field)
  if not isinstance(rescale, bool):
    raise usage_error(field, rescale, "expected True or False")
  prediction = get(config, "diffusion.prediction")
  if rescale and prediction != "v":
    raise usage_error(field, rescale, f"not with prediction={prediction}: at zero terminal SNR "
                      f"x_T is pure noise and x̂0 = (x_T − √(1−ᾱ_T) ε̂)/√ᾱ_T divides by 0; set "
                      f"{flag('diffusion.prediction', 'v')} (Lin et al. 2024)")


def check_names(config) -> None:
  """Prediction, loss weighting, schedule, learning-rate decay, samplers and metrics, by their
  constructors."""
  prediction = get(config, "diffusion.prediction")
  with refusing("diffusion.prediction", prediction):
    diffusion.check_prediction(prediction)
  check_loss_and_terminal_snr(config)
  schedule_name = get(config, "diffusion.schedule")
  if schedule_name in schedules.SCHEDULES:
    field, value = "diffusion.schedule_kwargs", dict(config.diffusion.get("schedule_kwargs", {}))
  else:
    field, value = "diffusion.schedule", schedule_name
  with refusing(field, value):
    schedule = schedules.from_config(config.diffusion)
  lr_decay = get(config, "train.lr_decay")
  with refusing("train.lr_decay", lr_decay):
    train_step.learning_rate_schedule(config.train)
  if get(config, "train.sample_every", 0):
    check_sampler(config, "sample", schedule)
    guidance_scale = get(config, "sample.guidance_scale")
    if guidance_scale:
      with refusing("sample.guidance_scale", guidance_scale):
        samplers.check_labels([], get(config, "model.num_classes"))
  if get(config, "train.eval_every", 0):
    if any(metric != "bpd" for metric in eval_metrics(config)):
      check_sampler(config, "eval", schedule)


def check_batch_split(config, num_devices: int, num_processes: int) -> None:
  """Every global batch the run uses splits evenly over the devices and over the processes; the
  training batch's train.grad_accum_steps micro-batches each split over the devices."""
  micro_batches = get(config, "train.grad_accum_steps", 1)
  splits = {"train.batch_size": micro_batches}
  if get(config, "train.sample_every", 0):
    splits["sample.batch_size"] = 1
  if get(config, "train.eval_every", 0):
    splits["eval.batch_size"] = 1
  for field, num_micro_batches in splits.items():
    value = get(config, field)
    if value % (num_devices * num_micro_batches):
      split = (f"into {num_micro_batches} micro-batches (--config.train.grad_accum_steps), "
               f"each evenly over" if num_micro_batches > 1 else "evenly over")
      raise usage_error(field, value, f"the global batch must split {split} the {num_devices} "
                        f"devices: choose a multiple of {num_devices * num_micro_batches}")
    if value % num_processes:
      raise usage_error(field, value, f"the global batch must split evenly over the "
                        f"{num_processes} processes (hosts): choose a multiple of {num_processes}")


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
  if "mesh" in config:
    parallel.mesh_shape(config.mesh, num_devices)


def unknown_dataset_message(name, directory: str) -> str:
  """The datasets jaxdiff can read, and the nearest of them to `name`."""
  available = data.available_datasets(directory)
  prepared = [choice for choice in available if choice not in data.PACKAGED_DATASETS]
  close = difflib.get_close_matches(str(name), available, n=3)
  return (f"unknown dataset; choose {' or '.join(data.PACKAGED_DATASETS)} (packaged, offline), "
          f"{data.FOLDER_PREFIX}/path/to/images (a folder of your PNG/JPEG files), or a TFDS "
          f"dataset prepared as ArrayRecord in --config.data.data_dir={directory} (there now: "
          f"{', '.join(prepared) or 'none'})"
          + (f"; did you mean {' or '.join(close)}?" if close else ""))


def check_dataset(config) -> None:
  """The dataset is there (never downloaded; a packaged one is prepared on first use) and fits
  the model."""
  name = get(config, "data.dataset")
  directory = get(config, "data.data_dir")
  if not isinstance(name, str) or not name:
    raise usage_error("data.dataset", name, unknown_dataset_message(name, directory))
  try:
    data.dataset_info(config.data)
  except ImportError as error:  # a packaged dataset whose package is not installed
    raise usage_error("data.dataset", name, error) from error
  except FileNotFoundError as error:  # a missing folder or an unprepared TFDS dataset
    advice = (f"; give {data.FOLDER_PREFIX}PATH of an existing folder of PNG/JPEG images"
              if name.startswith(data.FOLDER_PREFIX) else "")
    raise usage_error("data.dataset", name, f"{error}{advice}") from error
  except (ValueError, TypeError) as error:
    base_name = name.split("/")[0].split(":")[0]
    if name.startswith(data.FOLDER_PREFIX) or base_name in data.available_datasets(directory):
      raise usage_error("data.dataset", name, error) from error
    raise usage_error("data.dataset", name,
                      unknown_dataset_message(name, directory)) from error
  try:
    data.check_model_compatible(config.data, config.model)
  except ValueError as error:  # its messages name the fields
    raise errors.UsageError(one_line(error)) from error


def check_metrics(config) -> None:
  """Each of config.eval.metrics runs on this dataset and machine (when the run evaluates)."""
  if not get(config, "train.eval_every", 0):
    return
  chosen = eval_metrics(config)
  for metric in chosen:
    with refusing("eval.metrics", chosen):
      metrics.check_metric(metric, config.data)


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
