"""The training config is refused before anything is written, in one line naming the field."""

import importlib
import math
import random

import pytest

from configs import default
from jaxdiff import config_check, errors


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """A data_dir with digits prepared once (the default config's dataset)."""
  directory = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  config = default.get_config()
  config.data.data_dir = directory
  config_check.check_train_config(config, 1, 1)
  return directory


def config_with(data_dir: str, **overrides):
  """The default config with `overrides` ('train.batch_size': 0 as train__batch_size=0), set
  without ConfigDict's type checks, as a config file could."""
  config = default.get_config()
  config.data.data_dir = data_dir
  for name, value in overrides.items():
    section, field = name.split("__")
    with config.ignore_type():
      config[section][field] = value
  return config


def refusal(config, num_devices: int = 1, num_processes: int = 1) -> str:
  with pytest.raises(errors.UsageError) as caught:
    config_check.check_train_config(config, num_devices, num_processes)
  message = str(caught.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("name, num_devices", [
    ("default", 8), ("mnist5k", 8), ("mnist5k_cpu", 1), ("mnist5k_cpu_unconditional", 1)])
def test_the_shipped_configs_pass(data_dir, name, num_devices):
  """Every config whose data needs no download passes as shipped, on the devices it is for
  (the CPU recipes' 1,000 quality samples go in batches of 250)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  config.data.data_dir = data_dir
  config_check.check_train_config(config, num_devices, 1)


@pytest.mark.parametrize("overrides, expected", [
    (dict(train__batch_size=0), "--config.train.batch_size=0: expected a whole number ≥ 1"),
    (dict(train__num_steps=-1), "--config.train.num_steps=-1: expected a whole number ≥ 1"),
    (dict(train__num_steps=2.5), "--config.train.num_steps=2.5: expected a whole number ≥ 1"),
    (dict(train__max_to_keep=0), "--config.train.max_to_keep=0: expected a whole number ≥ 1"),
    (dict(train__log_every=0), "--config.train.log_every=0: expected a whole number ≥ 1"),
    (dict(train__checkpoint_every=-5),
     "--config.train.checkpoint_every=-5: expected a whole number ≥ 0 (0 means never)"),
    (dict(train__learning_rate=float("nan")),
     "--config.train.learning_rate=nan: expected a finite number > 0"),
    (dict(train__learning_rate=0.0),
     "--config.train.learning_rate=0.0: expected a finite number > 0"),
    (dict(train__ema_decay=1.0), "--config.train.ema_decay=1.0: expected a number in [0, 1)"),
    (dict(train__p_uncond=1.5), "--config.train.p_uncond=1.5: expected a number in [0, 1]"),
    (dict(diffusion__process="vdm"), "--config.diffusion.process=vdm: unknown process; choose "
     "one of ddpm, edm, flow"),
    (dict(diffusion__process="edm", diffusion__sigma_min=100.0),
     "--config.diffusion.sigma_min=100.0: must be below sigma_max = 80.0"),
    (dict(diffusion__process="flow", diffusion__time_distribution="beta"),
     "--config.diffusion.time_distribution=beta: unknown time distribution; choose one of "
     "uniform, logit_normal"),
    (dict(sample__sampler="edm_stochastic"), "--config.sample.sampler=edm_stochastic: defined "
     "for the process edm only; this model's is ddpm"),
    (dict(diffusion__process="flow", sample__spacing="trailing"),
     "--config.sample.spacing=trailing: unknown spacing for the flow process; choose one of "
     "uniform, logsnr, karras"),
    (dict(diffusion__process="edm", diffusion__loss_weighting="min_snr"),
     "--config.diffusion.loss_weighting=min_snr: DDPM's chain only, not the edm process"),
    (dict(train__profile_steps=(3, 2)), "--config.train.profile_steps=(3, 2): expected two steps "
     "FIRST,LAST with 1 ≤ FIRST ≤ LAST (or () for no trace)"),
    (dict(model__dropout=-0.1), "--config.model.dropout=-0.1: expected a number in [0, 1)"),
    (dict(data__image_size=0), "--config.data.image_size=0: expected a whole number ≥ 1"),
    (dict(data__num_channels=True), "--config.data.num_channels=True: expected a whole number ≥ 1"),
    (dict(sample__num_samples=0), "--config.sample.num_samples=0: expected a whole number ≥ 1"),
    (dict(eval__batch_size=-4), "--config.eval.batch_size=-4: expected a whole number ≥ 1"),
    (dict(diffusion__prediction="foo"),
     "--config.diffusion.prediction=foo: unknown prediction target; choose one of eps, x0, v"),
    (dict(diffusion__schedule="foo"),
     "--config.diffusion.schedule=foo: unknown schedule; choose one of linear, "
     "scaled_linear, cosine"),
    (dict(train__lr_decay="exp"), "--config.train.lr_decay=exp: unknown learning-rate decay; "
                                  "choose one of constant, cosine, linear"),
    (dict(sample__sampler="dpm"), "--config.sample.sampler=dpm: unknown sampler; choose one of "
                                  "ddpm, ddim, dpm_solver, dpm_solver_3m, dpm_solver_sde, unipc"),
    (dict(eval__sampler="eulr"), "--config.eval.sampler=eulr: unknown sampler"),
    (dict(sample__spacing="karas"), "--config.sample.spacing=karas: unknown spacing; choose one "
                                    "of uniform, trailing, leading, quadratic, logsnr, karras"),
    (dict(sample__num_steps=1001),
     "--config.sample.num_steps=1001: more than the model's T = 1000 diffusion steps; choose "
     "1 … 1000"),
    (dict(sample__threshold_percentile=1.5),
     "--config.sample.threshold_percentile=1.5: expected a number in (0, 1]"),
    (dict(sample__clip_x0="yes"), "--config.sample.clip_x0=yes: expected True or False (or unset)"),
    (dict(eval__clip_x0=2), "--config.eval.clip_x0=2: expected True or False (or unset)"),
    (dict(sample__eta=0.5), "--config.sample.eta=0.5: an option of sampler ddim, not of ddpm"),
    (dict(model__name="vit"), "--config.model.name=vit: unknown network; choose one of unet"),
    (dict(model__num_heads=3), "--config.model.num_heads=3: the middle attention's 64 "
                               "channels"),
    (dict(model__ch_mult=(1, 2, 2, 2, 2)), "--config.model.ch_mult=(1, 2, 2, 2, 2): 5 levels "
                                           "halve the image 4 times, which a 8×8 image cannot "
                                           "take"),
    (dict(train__metric_sinks=("wandb",)), "--config.train.metric_sinks=wandb: unknown metric "
                                           "sink; choose one of jsonl, tensorboard"),
    (dict(eval__metrics=("fud",)),
     "--config.eval.metrics=('fud',): fud: unknown metric; choose one of bpd, fid, quality"),
    (dict(eval__metrics="fid"),
     "--config.eval.metrics=fid: expected a tuple of metric names, e.g. \"('bpd',)\""),
    (dict(sample__guidance_scale=3.0), "--config.sample.guidance_scale=3.0: this model is "
                                       "unconditional"),
    (dict(diffusion__loss_weighting="p2"), "--config.diffusion.loss_weighting=p2: unknown loss "
                                           "weighting; choose one of none, min_snr"),
    (dict(diffusion__loss_weighting="min_snr", diffusion__min_snr_gamma=0.0),
     "--config.diffusion.min_snr_gamma=0.0: expected a finite number > 0"),
    (dict(diffusion__rescale_zero_terminal_snr="yes", diffusion__prediction="v"),
     "--config.diffusion.rescale_zero_terminal_snr=yes: expected True or False"),
    (dict(diffusion__rescale_zero_terminal_snr=True),
     "--config.diffusion.rescale_zero_terminal_snr=True: not with prediction=eps: at zero "
     "terminal SNR x_T is pure noise and x̂0 = (x_T − √(1−ᾱ_T) ε̂)/√ᾱ_T divides by 0; set "
     "--config.diffusion.prediction=v (Lin et al. 2024)"),
    (dict(diffusion__rescale_zero_terminal_snr=True, diffusion__prediction="x0"),
     "--config.diffusion.rescale_zero_terminal_snr=True: not with prediction=x0"),
    (dict(diffusion__schedule="cosine", diffusion__schedule_kwargs={"beta_end": 0.01}),
     "--config.diffusion.schedule_kwargs={'beta_end': 0.01}: cosine_betas() got an unexpected "
     "keyword argument 'beta_end'"),
    (dict(data__num_channels=3), "--config.data.num_channels=3: dataset 'digits' has 1-channel "
                                 "images; set 1"),
])
def test_a_bad_value_is_refused_naming_its_flag(data_dir, overrides, expected):
  assert refusal(config_with(data_dir, **overrides)).startswith(expected)


def test_every_valid_diffusion_combination_passes(data_dir):
  """Each prediction with each schedule and loss weighting; zero terminal SNR with v."""
  combinations = [dict(prediction=p, schedule=s, loss_weighting=w, rescale_zero_terminal_snr=r)
                  for p in ("eps", "x0", "v") for s in ("linear", "cosine")
                  for w in ("none", "min_snr") for r in ((False, True) if p == "v" else (False,))]
  assert len(combinations) == 16
  for diffusion in combinations:
    config = config_with(data_dir)
    config.diffusion.update(diffusion)
    config_check.check_train_config(config, 1, 1)


def test_unused_sections_are_not_judged(data_dir):
  """No sample grids, no evaluation: config.sample and config.eval do not matter."""
  config_check.check_train_config(
      config_with(data_dir, train__sample_every=0, train__eval_every=0, sample__sampler="dpm",
                  eval__metrics=("fud",), eval__batch_size=0), 1, 1)


def test_schedule_options_are_named_when_the_schedule_is_known(data_dir):
  config = config_with(data_dir)
  config.diffusion.schedule_kwargs.beta_end = 2.0
  assert refusal(config).startswith(
      "--config.diffusion.schedule_kwargs={'beta_end': 2.0, 'beta_start': 0.0001}: every beta")


def test_every_batch_must_split_over_devices_and_processes(data_dir):
  assert refusal(config_with(data_dir, train__batch_size=100), num_devices=8) == (
      "--config.train.batch_size=100: the global batch must split evenly over the 8 devices: "
      "choose a multiple of 8")
  assert refusal(config_with(data_dir, sample__batch_size=36), num_devices=8).startswith(
      "--config.sample.batch_size=36: the global batch must split evenly over the 8 devices")
  accumulating = config_with(data_dir, train__batch_size=96)
  accumulating.train.grad_accum_steps = 8
  assert refusal(accumulating, num_devices=8) == (
      "--config.train.batch_size=96: the global batch must split into 8 micro-batches "
      "(grad_accum_steps), each evenly over the 8 devices: choose a multiple of 64")
  assert refusal(config_with(data_dir), num_devices=4, num_processes=3) == (
      "--config.train.batch_size=128: the global batch must split evenly over the 3 processes "
      "(hosts): choose a multiple of 3")


def test_an_unknown_dataset_lists_jaxdiffs_own_choices(data_dir):
  message = refusal(config_with(data_dir, data__dataset="digitz"))
  assert message == (
      f"--config.data.dataset=digitz: unknown dataset; choose digits or mnist5k (packaged, "
      f"offline), folder:/path/to/images (a folder of your PNG/JPEG files), or a TFDS image "
      f"dataset prepared as ArrayRecord in the data_dir {data_dir} (there now: none), e.g. "
      f"cifar10, mnist, fashion_mnist, celeb_a; did you mean digits?")
  assert "did you mean" not in refusal(config_with(data_dir, data__dataset="imagenet_tiny_cats"))


def test_a_missing_folder_and_an_unprepared_tfds_dataset_are_usage_errors(data_dir, tmp_path):
  assert refusal(config_with(data_dir, data__dataset="folder:/no/such/dir")) == (
      "--config.data.dataset=folder:/no/such/dir: image folder /no/such/dir does not exist; give "
      "folder:PATH of an existing folder of PNG/JPEG images")
  message = refusal(config_with(str(tmp_path), data__dataset="cifar10"))
  assert message.startswith(f"--config.data.dataset=cifar10: TFDS dataset 'cifar10' is not "
                            f"prepared in {tmp_path}, and jaxdiff never downloads")


def test_resume_step_is_a_checkpoint_step_or_none(data_dir):
  config = config_with(data_dir)
  config.train.resume_step = None
  config_check.check_train_config(config, 1, 1)
  config.train.resume_step = 4000
  config_check.check_train_config(config, 1, 1)
  with config.ignore_type():
    config.train.resume_step = -2
  assert refusal(config) == (
      "--config.train.resume_step=-2: expected the step number of a checkpoint in the workdir "
      "(≥ 1), or None for the newest good one")


def test_a_missing_field_is_named(data_dir):
  config = config_with(data_dir)
  del config.train["batch_size"]
  assert refusal(config).startswith("the config has no field train.batch_size")


# Surely-invalid values for each field: wrong types, out of range, unknown names.
WRONG_VALUES = {
    "whole": [0.5, "12", None, True, -1, -(10**6), math.nan],
    "positive_real": [0.0, -1e-3, math.inf, math.nan, "1e-3", None],
    "unit_real": [-0.5, 1.0, 7.0, math.nan, "0.1", None],
    "name": ["", "foo", "EPS", 3, None, ("eps",)],
    "optional_name": ["", "foo", "LOGSNR", 3, ("logsnr",)],  # None: the default
}
FIELDS = {
    "train.num_steps": "whole", "train.batch_size": "whole", "train.max_to_keep": "whole",
    "train.log_every": "whole", "train.max_nonfinite_steps": "whole", "data.image_size": "whole",
    "data.num_channels": "whole", "diffusion.num_timesteps": "whole", "model.ch": "whole",
    "sample.num_samples": "whole", "sample.batch_size": "whole", "eval.num_samples": "whole",
    "sample.num_steps": "whole", "eval.num_steps": "whole", "eval.batch_size": "whole",
    "train.learning_rate": "positive_real", "train.grad_clip": "positive_real",
    "train.ema_decay": "unit_real", "model.dropout": "unit_real", "train.adam_b2": "unit_real",
    "diffusion.prediction": "name", "diffusion.schedule": "name", "train.lr_decay": "name",
    "sample.sampler": "name", "eval.sampler": "name", "data.dataset": "name",
    "eval.metrics": "name", "sample.spacing": "optional_name", "eval.spacing": "optional_name",
}


def test_random_invalid_overrides_always_give_a_one_line_usage_error(data_dir):
  """Property: one to three fields set to surely-invalid values (the rest valid) are refused
  with a one-line UsageError naming one of them, never any other exception."""
  rng = random.Random(15)
  for _ in range(60):
    fields = rng.sample(sorted(FIELDS), rng.randint(1, 3))
    overrides = {field.replace(".", "__"): rng.choice(WRONG_VALUES[FIELDS[field]])
                 for field in fields}
    message = refusal(config_with(data_dir, **overrides))
    assert any(f"config.{field}" in message for field in fields), (overrides, message)


@pytest.mark.parametrize("overrides, expected", [
    (dict(train__steps_per_call=5, train__num_steps=12),
     "--config.train.num_steps=12: a multiple of --config.train.steps_per_call=5 is needed"),
    (dict(train__steps_per_call=5, train__num_steps=10, train__checkpoint_every=3),
     "--config.train.checkpoint_every=3: a multiple of --config.train.steps_per_call=5"),
    (dict(mesh__data=3, mesh__fsdp=2), "--config.mesh.data=3 --config.mesh.fsdp=2: does not fit "
                                       "the 8 devices"),
])
def test_steps_per_call_and_mesh_are_refused_before_anything_is_written(data_dir, overrides,
                                                                      expected):
  assert refusal(config_with(data_dir, **overrides), num_devices=8).startswith(expected)
