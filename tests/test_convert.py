"""Tests for jaxdiff/convert/ and jaxdiff/jobs/convert.py: diffusers folders ↔ jaxdiff, without
torch.

The fixtures (tests/fixtures/diffusers/, written by make_diffusers_fixtures.py with torch and
diffusers) hold small random UNet2DModels laid out as the published DDPM models, their inputs and
diffusers' outputs, 50 DDPM steps of diffusers' DDPMScheduler, the images DDPMPipeline makes by
default, and diffusers' timesteps.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from jaxdiff import convert, models, parallel, processes, samplers, schedules
from jaxdiff import denoiser as denoiser_lib
from jaxdiff.errors import ArgumentError
from jaxdiff.jobs import cli
from jaxdiff.jobs import convert as convert_job
from jaxdiff.jobs import workdir as workdir_lib
from jaxdiff.models import count_params
from jaxdiff.models.unet import UNet
from tests.helpers import run_program

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "diffusers")
DDPM_FIELDS = dict(
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, out_channels=3,
    time_embedding_type="positional")
# The published configs (google/ddpm-ema-church-256 and ddpm-cat-256 have celebahq-256's) and
# diffusers' own parameter counts of them (make_diffusers_fixtures.py --counts).
PUBLISHED = {
    "google/ddpm-cifar10-32": (dict(
        DDPM_FIELDS, sample_size=32, block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]), 35_746_307),
    "google/ddpm-celebahq-256": (dict(
        DDPM_FIELDS, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
        down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4), 113_673_219),
}
CIFAR10 = PUBLISHED["google/ddpm-cifar10-32"][0]
# The parity tests compile at XLA's lowest backend optimisation level: in half the time (14 s
# against 23 s of CPU for the four fixtures), with the same parity (2.2e-6 against 2.1e-6 at
# most) since neither level may reorder float arithmetic.
QUICK_COMPILE = {"xla_backend_optimization_level": "0"}


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def from_diffusers(name: str) -> workdir_lib.TrainedModel:
  """The fixture `name` as `convert.from_diffusers` loads it, on one device."""
  return convert_job.from_diffusers(fixture(name), parallel.make_mesh(jax.local_devices()[:1]))


def relative_error(got, expected) -> float:
  """max |got − expected| / max |expected|."""
  return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def random_params(model_fields, image_shape, seed: int = 0):
  """Params of the U-Net's shapes, every one drawn from N(0, 1) (no init compiled)."""
  rng = np.random.default_rng(seed)
  shapes = convert.abstract_params(model_fields, image_shape)
  return jax.tree.map(lambda shape: rng.standard_normal(shape.shape).astype(np.float32), shapes)


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str, value) -> None:
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{name} = {value!r}: "), message


@pytest.mark.parametrize("name", ["cifar10", "church256", "class_conditional",
                                  "diffusers_defaults", "digits_ddpm"])
def test_outputs_equal_diffusers(name):
  """from_diffusers(path).network.apply({'params': params}, x_nhwc, t[, y]) = diffusers'
  unet(x_nchw, t[, y]).sample, transposed."""
  trained = from_diffusers(name)
  io = np.load(os.path.join(fixture(name), "io.npz"))
  assert trained.denoiser.image_shape == io["x"].shape[2:] + io["x"].shape[1:2]
  apply = jax.jit(trained.network.apply, compiler_options=QUICK_COMPILE)
  out = apply({"params": trained.params}, io["x"].transpose(0, 2, 3, 1), io["t"],
              io["y"] if "y" in io else None)
  assert relative_error(np.asarray(out).transpose(0, 3, 1, 2), io["out"]) <= 1e-5


def ddpm_draws(seed: int, shape_nhwc, num_steps: int):
  """x_T and every scan step's noise as `samplers.run` draws them from key(seed)."""
  init_key, noise_key = jax.random.split(jax.random.key(seed))
  step_noise = [jax.random.normal(key, shape_nhwc) for key in jax.random.split(noise_key,
                                                                               num_steps)]
  return jax.random.normal(init_key, shape_nhwc), np.stack(step_noise)


def test_ddpm_sampler_equals_diffusers_ddpm_scheduler_over_50_steps():
  """From the same x_T and per-step noise, jaxdiff's DDPM sampler on 50 uniformly spaced steps
  and diffusers' DDPMScheduler (linspace spacing, fixed_large, clip_sample) give the same
  images; the fixture's noise is what jaxdiff draws from its key. The sampling settings are
  the model's own config.sample, which from_diffusers read from the scheduler."""
  trained = from_diffusers("cifar10")
  ddpm = np.load(os.path.join(fixture("cifar10"), "ddpm.npz"))
  num_steps, batch = ddpm["noise"].shape[:2]
  shape = (batch, *trained.denoiser.image_shape)
  x_T, noise = ddpm_draws(int(ddpm["seed"]), shape, num_steps)
  np.testing.assert_allclose(ddpm["x_T"].transpose(0, 2, 3, 1), x_T, atol=1e-6)
  np.testing.assert_allclose(ddpm["noise"].transpose(0, 1, 3, 4, 2), noise, atol=1e-6)
  own = samplers.SamplingOptions.from_config(trained.config.sample)
  assert own == samplers.SamplingOptions(sampler="ddpm", num_steps=1000, spacing="uniform",
                                         clip_x0=True, variance="beta")
  options = dataclasses.replace(own, num_steps=num_steps, batch_size=batch)
  np.testing.assert_array_equal(
      schedules.spaced_timesteps(trained.denoiser.process.schedule, num_steps,
                                 options.spacing),
      ddpm["timesteps"][::-1])
  sample = jax.jit(lambda params: samplers.sample(
      trained.denoiser, params, jax.random.key(int(ddpm["seed"])), options).images,
      compiler_options=QUICK_COMPILE)
  images = np.asarray(sample(trained.params)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(images, ddpm["images"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["cifar10", "church256", "class_conditional",
                                  "diffusers_defaults"])
def test_diffusers_to_jaxdiff_to_diffusers_is_exact(name):
  unet_folder = os.path.join(fixture(name), "unet" if name == "cifar10" else "")
  with open(os.path.join(unet_folder, convert.UNET_CONFIG_NAME)) as f:
    unet_config = json.load(f)
  model, image_shape = convert.from_unet_config(unet_config)
  del unet_config["_diffusers_version"]
  assert convert.to_unet_config(model, image_shape) == unet_config
  tensors = convert._read_weights(unet_folder)
  again = convert.params_to_tensors(convert.params_from_tensors(tensors, model, image_shape))
  assert again.keys() == tensors.keys()
  for tensor_name, tensor in tensors.items():
    np.testing.assert_array_equal(again[tensor_name], tensor, err_msg=tensor_name)


def test_the_published_cifar10_model_is_jaxdiffs_cifar10_config():
  from configs import cifar10
  model, image_shape = convert.from_unet_config(CIFAR10)
  config = cifar10.get_config()
  assert image_shape == (config.data.image_size,) * 2 + (config.data.num_channels,)
  fields = models.network_fields(config.model)
  assert {name: value for name, value in model.items() if name not in UNet.FREE_FIELDS} == \
      {name: value for name, value in fields.items() if name not in UNet.FREE_FIELDS}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_of_published_configs_equal_diffusers(name):
  unet_config, diffusers_count = PUBLISHED[name]
  model, image_shape = convert.from_unet_config(unet_config)
  assert count_params(convert.abstract_params(model, image_shape)) == diffusers_count


JAXDIFF_MODELS = [
    (dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), norm_groups=8),
     (16, 16, 3)),
    (dict(ch=8, ch_mult=(1, 1), level_channels=(8, 12), num_res_blocks=1,
          attn_resolutions=(8, 4), head_dim=4, norm_groups=4, norm_eps=1e-5,
          flip_sin_to_cos=True, freq_shift=0.0, downsample_padding=1, num_classes=10,
          out_channels=2), (8, 8, 1)),
    (dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.1),
     (16, 8, 4)),
]


@pytest.mark.parametrize("model, image_shape", JAXDIFF_MODELS)
def test_jaxdiff_to_diffusers_to_jaxdiff_is_exact(model, image_shape):
  fields = convert._unet_fields(model)
  params = random_params(fields, image_shape)
  unet_config = json.loads(json.dumps(convert.to_unet_config(fields, image_shape)))
  assert convert.from_unet_config(unet_config) == (fields, image_shape)
  tensors = convert.params_to_tensors(params)
  back = convert.params_from_tensors(tensors, fields, image_shape)
  jax.tree.map(np.testing.assert_array_equal, back, params)


SCHEDULES = [
    (dict(schedule="linear", num_timesteps=1000, schedule_kwargs=dict(beta_start=1e-4,
                                                                     beta_end=0.02),
          prediction="eps", rescale_zero_terminal_snr=False),
     dict(sampler="ddpm", clip_x0=True, spacing="uniform", variance="beta")),
    (dict(schedule="scaled_linear", num_timesteps=500,
          schedule_kwargs=dict(beta_start=0.00085, beta_end=0.012), prediction="v",
          rescale_zero_terminal_snr=True),
     dict(sampler="ddpm", clip_x0=False, spacing="trailing", variance="beta_tilde")),
    (dict(schedule="cosine", num_timesteps=4000, schedule_kwargs={}, prediction="x0",
          rescale_zero_terminal_snr=False),
     dict(sampler="ddim", clip_x0=True, spacing="uniform")),
]


@pytest.mark.parametrize("diffusion, sampling", SCHEDULES)
def test_schedules_round_trip_and_give_diffusers_betas(diffusion, sampling):
  scheduler_config = json.loads(json.dumps(convert.to_scheduler_config(diffusion, sampling)))
  assert convert.from_scheduler_config(scheduler_config) == (diffusion, sampling)
  betas = schedules.from_config(ml_collections.ConfigDict(diffusion)).betas
  np.testing.assert_allclose(betas, diffusers_betas(scheduler_config), rtol=1e-5, atol=1e-9)


def test_sampling_settings_left_unset_are_the_samplers_defaults():
  diffusion = SCHEDULES[0][0]
  for sampling in ({}, dict(sampler="ddpm", clip_x0=None, spacing=None, variance=None)):
    scheduler_config = convert.to_scheduler_config(diffusion, sampling)
    assert (scheduler_config["clip_sample"], scheduler_config["timestep_spacing"],
            scheduler_config["variance_type"]) == (True, "linspace", "fixed_large")


def diffusers_betas(scheduler_config) -> np.ndarray:
  """The betas diffusers' schedulers make, written from their definitions in float64."""
  steps, start, end = (scheduler_config[name] for name in ("num_train_timesteps", "beta_start",
                                                            "beta_end"))
  kind = scheduler_config["beta_schedule"]
  if kind == "linear":
    betas = np.linspace(start, end, steps)
  elif kind == "scaled_linear":
    betas = np.linspace(start**0.5, end**0.5, steps) ** 2
  else:
    alpha_bar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    u = np.arange(steps + 1) / steps
    betas = np.minimum(1 - alpha_bar(u[1:]) / alpha_bar(u[:-1]), 0.999)
  if scheduler_config["rescale_betas_zero_snr"]:
    root = np.sqrt(np.cumprod(1 - betas))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alpha_bars = root**2
    betas = 1 - alpha_bars / np.append(1.0, alpha_bars[:-1])
  return betas


def test_a_written_pipeline_reads_back_exactly(tmp_path):
  model, image_shape = JAXDIFF_MODELS[1]
  fields = convert._unet_fields(model)
  diffusion, sampling = SCHEDULES[1]
  written = convert.Pipeline(fields, image_shape, diffusion, sampling,
                             random_params(fields, image_shape, seed=1))
  convert.write(str(tmp_path / "pipeline"), written)
  assert sorted(os.listdir(tmp_path / "pipeline")) == ["model_index.json", "scheduler", "unet"]
  read = convert.read(str(tmp_path / "pipeline"))
  assert read[:4] == written[:4]
  jax.tree.map(np.testing.assert_array_equal, read.params, written.params)
  with pytest.raises(ArgumentError, match="exists"):
    convert.write(str(tmp_path / "pipeline"), written)


def test_a_pipeline_with_its_components_beside_model_index_reads_alike(tmp_path):
  """The first published DDPM pipelines keep config.json and scheduler_config.json beside
  model_index.json, not in unet/ and scheduler/."""
  for name in ("model_index.json", "unet/config.json", f"unet/{convert.WEIGHTS_NAME}",
               "scheduler/scheduler_config.json"):
    shutil.copy(os.path.join(fixture("cifar10"), name), tmp_path)
  flat, nested = convert.read(str(tmp_path)), convert.read(fixture("cifar10"))
  assert flat[:4] == nested[:4]
  jax.tree.map(np.testing.assert_array_equal, flat.params, nested.params)


def test_a_unet_folder_alone_samples_as_ddpm_schedulers_defaults():
  pipeline = convert.read(fixture("church256"))
  assert pipeline.diffusion == dict(schedule="linear", num_timesteps=1000,
                                    schedule_kwargs=dict(beta_start=1e-4, beta_end=0.02),
                                    prediction="eps", rescale_zero_terminal_snr=False)
  assert pipeline.sampling == dict(sampler="ddpm", clip_x0=True, spacing="leading",
                                   variance="beta_tilde")


def test_older_attention_names_are_read():
  tensors = convert._read_weights(fixture("class_conditional"))
  renamed = {name.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): tensor
             for name, tensor in tensors.items()}
  with open(os.path.join(fixture("class_conditional"), convert.UNET_CONFIG_NAME)) as f:
    model, image_shape = convert.from_unet_config(json.load(f))
  jax.tree.map(np.testing.assert_array_equal,
               convert.params_from_tensors(renamed, model, image_shape),
               convert.params_from_tensors(tensors, model, image_shape))


@pytest.mark.parametrize("field, value", [
    ("center_input_sample", True), ("act_fn", "gelu"), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
    ("mid_block_scale_factor", 2), ("add_attention", False), ("downsample_type", "resnet"),
    ("downsample_padding", 2), ("attention_head_dim", 48), ("norm_num_groups", 48),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("down_block_types", ["CrossAttnDownBlock2D"] * 4), ("sample_size", None),
    ("block_out_channels", [128, 0]), ("num_class_embeds", 1), ("cross_attention_dim", 768),
    ("layers_per_block", -1), ("freq_shift", 64), ("norm_eps", 0), ("dropout", 1.5),
    ("flip_sin_to_cos", "yes"),
])
def test_unsupported_unet_fields_are_refused_naming_them(field, value):
  with pytest.raises(ArgumentError) as error:
    convert.from_unet_config({**CIFAR10, field: value})
  assert_one_line_naming(error, field, value)


@pytest.mark.parametrize("field, value", [
    ("_class_name", "EulerDiscreteScheduler"), ("beta_schedule", "sigmoid"),
    ("prediction_type", "flow"), ("variance_type", "learned_range"), ("thresholding", True),
    ("clip_sample_range", 2.0), ("timestep_spacing", "karras"), ("use_karras_sigmas", True),
])
def test_unsupported_scheduler_fields_are_refused_naming_them(field, value):
  with pytest.raises(ArgumentError) as error:
    convert.from_scheduler_config({"_class_name": "DDPMScheduler", field: value})
  assert_one_line_naming(error, field, value)
  with pytest.raises(ArgumentError) as error:
    convert.from_scheduler_config({"_class_name": "DDIMScheduler", "set_alpha_to_one": False})
  assert_one_line_naming(error, "set_alpha_to_one", False)


@pytest.mark.parametrize("model, setting, value", [
    (dict(resamp_with_conv=False), "resamp_with_conv", False),
    (dict(ch_mult=(2, 2)), "ch_mult", (2, 2)),
    (dict(ch=16, ch_mult=(1, 2, 3)), "norm_groups", None),  # 16, 32, 48: 16, 32, 24 groups
    (dict(ch=32, ch_mult=(1, 2), attn_resolutions=(8, 4), num_heads=2), "num_heads", 2),
    (dict(name="dit"), "name", "dit"),
])
def test_what_diffusers_cannot_express_is_refused_naming_the_setting(model, setting, value):
  with pytest.raises(ArgumentError) as error:
    convert.to_unet_config({**dict(ch=32, ch_mult=(1, 2), attn_resolutions=(4,)), **model},
                           (8, 8, 3))
  assert_one_line_naming(error, setting, value)


@pytest.mark.parametrize("diffusion, sampling, setting, value", [
    (dict(schedule_kwargs=dict(s=0.01)), {}, "schedule_kwargs", dict(s=0.01)),
    (dict(schedule="linear", schedule_kwargs=dict(beta_start=1e-4, s=0.1)), {},
     "schedule_kwargs", dict(beta_start=1e-4, s=0.1)),
    ({}, dict(spacing="karras"), "spacing", "karras"),
    ({}, dict(sampler="dpm_solver"), "sampler", "dpm_solver"),
    ({}, dict(variance="learned"), "variance", "learned"),
    (dict(schedule="sigmoid"), {}, "schedule", "sigmoid"),
    (dict(process="edm"), {}, "process", "edm"),
    (dict(process="flow"), dict(sampler="ddim"), "process", "flow"),
])
def test_schedules_diffusers_cannot_express_are_refused(diffusion, sampling, setting, value):
  diffusion = {**dict(schedule="cosine", num_timesteps=1000, schedule_kwargs={}), **diffusion}
  with pytest.raises(ArgumentError) as error:
    convert.to_scheduler_config(diffusion, sampling)
  assert_one_line_naming(error, setting, value)


def test_a_folder_with_pickled_weights_only_says_how_to_write_safetensors(tmp_path):
  folder = tmp_path / "unet"
  folder.mkdir()
  shutil.copy(os.path.join(fixture("church256"), "config.json"), folder)
  (folder / convert.PICKLED_WEIGHTS_NAME).write_bytes(b"")
  with pytest.raises(ArgumentError, match=r"save_pretrained\(d, safe_serialization=True\)") \
      as error:
    convert.read(str(folder))
  assert "\n" not in str(error.value)
  with pytest.raises(ArgumentError, match="neither model_index.json"):
    convert.read(str(tmp_path))


@pytest.mark.parametrize("field, value", [
    ("level_channels", (16, 0)), ("head_dim", 3), ("norm_groups", 3), ("norm_eps", 0.0),
    ("flip_sin_to_cos", 1), ("freq_shift", 8), ("downsample_padding", 2),
])
def test_unet_refuses_bad_new_fields_naming_them(field, value):
  fields = convert._unet_fields({**dict(ch=16, ch_mult=(1, 2), attn_resolutions=(8,),
                                       level_channels=(16, 32)), field: value})
  with pytest.raises(ArgumentError) as error:
    UNet.check_fields(fields, (16, 16, 3))
  assert_one_line_naming(error, field, value)


def test_scaled_linear_betas_are_squares_of_evenly_spaced_roots():
  betas = schedules.SCHEDULES["scaled_linear"](7, beta_start=0.00085, beta_end=0.012)
  roots = np.sqrt(betas)
  np.testing.assert_allclose(np.diff(roots), (np.sqrt(0.012) - np.sqrt(0.00085)) / 6, rtol=1e-12)
  np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)


def test_timestep_embedding_flip_and_shift_match_float64():
  t = np.array([0, 3, 500, 999])
  half = 8
  freqs = np.exp(-np.log(10_000.0) * np.arange(half) / half)  # freq_shift 0
  args = t[:, None] * freqs
  expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)  # flipped
  from jaxdiff.models import timestep_embedding
  got = timestep_embedding(jnp.asarray(t), 2 * half, flip_sin_to_cos=True, freq_shift=0)
  np.testing.assert_allclose(got, expected, atol=3e-4)


# ---------------------------------------------------------------------------------------------
# Pipelines ↔ complete jaxdiff configs, the spacing diffusers uses by default


def dotted_fields(config, prefix=""):
  return {name for key, value in config.items()
          for name in ([f"{prefix}{key}"] + sorted(dotted_fields(value, f"{prefix}{key}."))
                       if hasattr(value, "items") else [f"{prefix}{key}"])}


@pytest.mark.parametrize("spacing, jaxdiff_spacing", [
    ("leading", "leading"), ("linspace", "uniform"), ("trailing", "trailing")])
def test_spaced_timesteps_are_diffusers_timesteps(spacing, jaxdiff_spacing):
  """timesteps.json: DDPMScheduler's (and DDIMScheduler's) timesteps at several T and K."""
  with open(os.path.join(FIXTURES, "timesteps.json")) as f:
    expected = json.load(f)[spacing]
  for steps, diffusers_timesteps in expected.items():
    num_timesteps, num_steps = map(int, steps.split("/"))
    schedule = schedules.from_config(ml_collections.ConfigDict(dict(
        schedule="linear", num_timesteps=num_timesteps)))
    np.testing.assert_array_equal(
        schedules.spaced_timesteps(schedule, num_steps, jaxdiff_spacing)[::-1],
        diffusers_timesteps, err_msg=steps)
  assert convert.TIMESTEP_SPACINGS[spacing] == jaxdiff_spacing


@pytest.mark.parametrize("sampler_settings, own", [
    (dict(sampler="ddpm", clip_x0=True, spacing="leading", variance="beta_tilde"),
     samplers.SamplingOptions(sampler="ddpm", num_steps=1000, spacing="leading", clip_x0=True,
                              variance="beta_tilde")),
    (dict(sampler="ddim", clip_x0=False, spacing="trailing"),
     samplers.SamplingOptions(sampler="ddim", num_steps=50, spacing="trailing", clip_x0=False)),
])
def test_a_pipelines_config_is_complete_and_samples_as_the_pipeline(sampler_settings, own):
  """to_config: every field of the base config, the model's U-Net fields, the scheduler's
  process, the image's size and channels, and config.sample and config.eval as the pipeline
  samples by default (DDPMPipeline: all T steps; DDIMPipeline: 50, η = 0). A locked base (as
  a --config flag gives) is not changed."""
  model, image_shape = convert.from_unet_config(CIFAR10)
  diffusion = SCHEDULES[0][0]
  base = default.get_config()
  base.lock()
  config = convert.to_config(convert.Pipeline(model, image_shape, diffusion, sampler_settings,
                                               None), base)
  assert dotted_fields(config) >= dotted_fields(default.get_config())
  assert base.to_dict() == default.get_config().to_dict()
  assert models.network_fields(config.model) == convert._unet_fields(model)
  assert {name: config.diffusion.to_dict()[name] for name in diffusion} == diffusion
  assert (config.data.image_size, config.data.num_channels) == (32, 3)
  assert config.data.dataset == base.data.dataset
  assert config.train.to_dict() == base.train.to_dict()
  for section in (config.sample, config.eval):
    assert samplers.SamplingOptions.from_config(section) == dataclasses.replace(
        own, batch_size=section.batch_size)
  with pytest.raises(ArgumentError) as error:
    convert.to_config(convert.Pipeline(model, (32, 16, 3), diffusion, sampler_settings, None),
                      base)
  assert_one_line_naming(error, "sample_size", [32, 16])


def test_a_pipelines_config_is_ddpm_on_the_unet_whatever_the_base():
  """A base config of another process and network (--config) still gives DDPM's chain on the
  U-Net, as the folder holds: its Denoiser (`denoiser.from_config`) is that."""
  model, image_shape = convert.from_unet_config(CIFAR10)
  base = default.get_config()
  base.diffusion.process, base.model.name = "edm", "dit"
  config = convert.to_config(convert.Pipeline(model, image_shape, SCHEDULES[0][0],
                                               dict(sampler="ddpm"), None), base)
  assert (config.diffusion.process, config.model.name) == ("ddpm", "unet")
  built = denoiser_lib.from_config(config)
  assert isinstance(built.process, processes.DDPM) and isinstance(built.network, UNet)


def test_to_diffusers_refuses_another_process_before_writing(tmp_path):
  """An export of the U-Net whose config.diffusion.process is EDM: one line naming the process,
  and no folder."""
  export = convert_job.export_diffusers(fixture("digits_ddpm"), str(tmp_path / "export"))
  with open(os.path.join(export, "config.json")) as f:
    config = json.load(f)
  config["diffusion"]["process"] = "edm"
  with open(os.path.join(export, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ArgumentError) as error:
    convert_job.to_diffusers(export, str(tmp_path / "pipeline"))
  assert_one_line_naming(error, "process", "edm")
  assert not os.path.exists(tmp_path / "pipeline")


@pytest.mark.parametrize("sample, scheduler", [
    (dict(), dict(_class_name="DDPMScheduler", timestep_spacing="linspace", clip_sample=True,
                  variance_type="fixed_large")),
    (dict(sampler="ddim", spacing="leading", clip_x0=False),
     dict(_class_name="DDIMScheduler", timestep_spacing="leading", clip_sample=False)),
    (dict(sampler="ddpm", variance="beta_tilde", spacing="trailing"),
     dict(_class_name="DDPMScheduler", timestep_spacing="trailing",
          variance_type="fixed_small")),
    (dict(sampler="dpm_solver", spacing="karras", clip_x0=False),  # not a scheduler's: DDPM's
     dict(_class_name="DDPMScheduler", timestep_spacing="linspace", clip_sample=True,
          variance_type="fixed_large")),
])
def test_a_configs_scheduler_samples_as_its_config_sample(sample, scheduler):
  config = default.get_config()
  config.sample.update(sample)
  pipeline = convert.pipeline_of(config, None)
  assert (pipeline.model, pipeline.image_shape) == (config.model.to_dict(), (8, 8, 1))
  written = convert.to_scheduler_config(pipeline.diffusion, pipeline.sampling)
  assert {name: written[name] for name in scheduler} == scheduler


def test_what_a_scheduler_cannot_hold_is_refused():
  config = default.get_config()
  config.sample.threshold_percentile = 0.995
  with pytest.raises(ArgumentError) as error:
    convert.pipeline_of(config, None)
  assert_one_line_naming(error, "threshold_percentile", 0.995)
  with pytest.raises(ArgumentError) as error:  # leading from t = 1: not jaxdiff's leading
    convert.from_scheduler_config({"_class_name": "DDIMScheduler", "steps_offset": 1})
  assert_one_line_naming(error, "steps_offset", 1)
  with pytest.raises(ArgumentError, match="^timestep_values = '\\[…\\]': "):
    convert.from_scheduler_config({"_class_name": "DDPMScheduler", "timestep_values": [3, 1]})
  # Fields the published DDPM pipelines' diffusers (0.1) wrote, that diffusers ignores since.
  assert convert.from_scheduler_config(
      {"_class_name": "DDPMScheduler", "tensor_format": "pt", "timestep_values": None,
       "steps_offset": 1, "timestep_spacing": "linspace"}) == \
      convert.from_scheduler_config({"_class_name": "DDPMScheduler",
                                     "timestep_spacing": "linspace"})


def test_only_diffusers_folders_are_diffusers_folders():
  assert all(convert.is_folder(fixture(name)) for name in ("cifar10", "church256"))
  assert not convert.is_folder(FIXTURES) and not convert.is_folder(fixture("missing"))


# ---------------------------------------------------------------------------------------------
# The programs: python -m jaxdiff.convert, sample.py and evaluate.py on diffusers folders

CONVERT_PROGRAM = os.path.join("jaxdiff", "convert", "__main__.py")
TWO_DEVICES = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")


def sampled(folder) -> np.ndarray:
  return np.load(os.path.join(folder, "samples.npz"))["images"]


def assert_pipeline_images(images_uint8, name: str) -> None:
  """`images_uint8` are, to the rounding of a pixel, those the fixture's DDPMPipeline made."""
  expected = np.round(np.load(os.path.join(fixture(name), "pipeline.npz"))["images"] * 255)
  difference = np.abs(images_uint8.astype(np.int64) - expected)
  assert difference.max() <= 1 and np.mean(difference > 0) < 0.02, np.mean(difference > 0)


def regrouped_export(trained_workdir, folder) -> str:
  """An export of the trained workdir with 16 groups in every GroupNorm: its params, in a U-Net
  diffusers can express (the workdir's own has 16 and 32, as num_groups(C) gives)."""
  workdir_lib.export_ema(trained_workdir, folder)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  config["model"]["norm_groups"] = 16
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  return folder


@pytest.mark.slow
def test_the_cli_round_trip(trained_workdir, tmp_path):
  """From the real programs, one process each: a trained model → a diffusers pipeline → an
  export, with the params bit for bit and the model as they were, and sample.py's images the
  same from all three; a pipeline diffusers wrote → an export with its params, and sample.py on
  the pipeline itself samples as DDPMPipeline does by default; bad flags, paths and configs
  (the trained workdir's per-layer GroupNorm groups among them): exit 2, one line."""
  source = regrouped_export(trained_workdir, str(tmp_path / "source"))
  pipeline, export, fixture_export, unwritten = (
      str(tmp_path / name) for name in ("pipeline", "export", "fixture_export", "unwritten"))
  os.mkdir(tmp_path / "empty")
  karras = shutil.copytree(fixture("digits_ddpm"), tmp_path / "karras")
  with open(karras / "scheduler" / "scheduler_config.json", "r+") as f:
    scheduler_config = dict(json.load(f), timestep_spacing="karras")
    f.seek(0), f.truncate(), json.dump(scheduler_config, f)
  refused = {
      "give --from_diffusers=DIR --output=EXPORT_DIR": [],
      f"--from_diffusers={tmp_path}/missing: no such folder": [
          f"--from_diffusers={tmp_path}/missing", f"--output={unwritten}"],
      f"--output={export}: exists; choose a new folder": [
          f"--from_diffusers={pipeline}", f"--output={export}"],
      f"--to_diffusers={unwritten}: not a flag of --from_diffusers; it goes with --workdir": [
          f"--from_diffusers={pipeline}", f"--to_diffusers={unwritten}"],
      "--workdir needs --to_diffusers": [f"--workdir={source}"],
      "holds neither model_index.json": [f"--from_diffusers={tmp_path}/empty",
                                         f"--output={unwritten}"],
      "timestep_spacing = 'karras': jaxdiff has linspace, trailing, leading": [
          f"--from_diffusers={karras}", f"--output={unwritten}"],
      "norm_groups = None: its GroupNorms have [16, 32] groups": [
          f"--workdir={trained_workdir}", f"--to_diffusers={unwritten}"]}
  base_config = tmp_path / "base.py"  # what the export keeps of --config
  base_config.write_text("from configs import default\n\n\ndef get_config():\n"
                         "  config = default.get_config()\n"
                         "  config.data.data_dir = '/data/tensorflow_datasets'\n"
                         "  return config\n")
  written, exported, fixture_exported, *refusals = run_program(CONVERT_PROGRAM, [
      [f"--workdir={source}", f"--to_diffusers={pipeline}"],
      [f"--from_diffusers={pipeline}", f"--output={export}"],
      [f"--from_diffusers={fixture('digits_ddpm')}", f"--output={fixture_export}",
       f"--config={base_config}"],
      *refused.values()])
  for exit_code, stdout, stderr in (written, exported, fixture_exported):
    assert exit_code == 0 and stdout.startswith("wrote "), stderr
  for (exit_code, _, stderr), message in zip(refusals, refused):
    assert exit_code == 2 and message in stderr and stderr.count("\n") == 1, stderr
  assert not os.path.exists(unwritten)
  assert sorted(os.path.relpath(os.path.join(root, name), pipeline)
                for root, _, names in os.walk(pipeline) for name in names) == [
      "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
      f"unet/{convert.WEIGHTS_NAME}"]
  one_device = parallel.make_mesh(jax.local_devices()[:1])
  for original, converted in ((source, export), (fixture("digits_ddpm"), fixture_export)):
    trained, back = (workdir_lib.load_model(path, mesh=one_device)
                     for path in (original, converted))
    jax.tree.map(np.testing.assert_array_equal, back.params, trained.params)
    assert models.network_fields(back.config.model) == \
        models.network_fields(trained.config.model)
    for name in ("schedule", "num_timesteps", "prediction", "rescale_zero_terminal_snr"):
      assert back.config.diffusion[name] == trained.config.diffusion[name]
    assert back.denoiser.image_shape == trained.denoiser.image_shape
  assert back.config.data.data_dir == "/data/tensorflow_datasets"

  outputs = {name: str(tmp_path / "samples" / name)
             for name in ("source", "pipeline", "export", "diffusers")}
  options = ["--sampler=dpm_solver", "--num_steps=4", "--num_samples=4", "--batch_size=4"]
  *results, stepped = run_program("sample.py", [
      *([f"--workdir={path}", *options, f"--output_dir={outputs[name]}"]
        for name, path in (("source", source), ("pipeline", pipeline), ("export", export))),
      [f"--workdir={fixture('digits_ddpm')}", "--num_samples=8", "--batch_size=8",
       f"--output_dir={outputs['diffusers']}"],
      [f"--workdir={fixture('digits_ddpm')}", "--checkpoint_step=3"]], TWO_DEVICES)
  for exit_code, stdout, stderr in results:
    assert exit_code == 0, stdout + stderr
  np.testing.assert_array_equal(sampled(outputs["pipeline"]), sampled(outputs["source"]))
  np.testing.assert_array_equal(sampled(outputs["export"]), sampled(outputs["source"]))
  assert_pipeline_images(sampled(outputs["diffusers"]), "digits_ddpm")
  with open(os.path.join(outputs["diffusers"], "settings.json")) as f:
    settings = json.load(f)
  assert {name: settings[name] for name in PIPELINE_SAMPLING} == PIPELINE_SAMPLING
  assert stepped[0] == 2 and "is a diffusers folder, which holds one set of weights" in stepped[2]


# How DDPMPipeline samples by default with DDPMScheduler's defaults, in SamplingOptions fields.
PIPELINE_SAMPLING = dict(sampler="ddpm", num_steps=1000, spacing="leading", clip_x0=True,
                         variance="beta_tilde", eta=0.0, guidance_scale=0.0,
                         threshold_percentile=None)


@pytest.mark.slow
def test_evaluate_py_reads_a_diffusers_folder(judged_data_dir, tmp_path):
  """evaluate.py on the pipeline folder diffusers wrote samples as the pipeline does (config.eval
  from its scheduler). The folder has no data set: its config is configs/default.py's (the
  digits in ~/tensorflow_datasets, here a home whose tensorflow_datasets are the session's)."""
  home = tmp_path / "home"
  home.mkdir()
  os.symlink(judged_data_dir, home / "tensorflow_datasets")
  (exit_code, stdout, stderr), = run_program("evaluate.py", [
      [f"--workdir={fixture('digits_ddpm')}", "--metric=quality", "--num_samples=8",
       "--batch_size=8", f"--output={tmp_path}/quality.json"]], dict(TWO_DEVICES, HOME=str(home)))
  assert exit_code == 0, stdout + stderr
  with open(tmp_path / "quality.json") as f:
    result = json.load(f)
  assert {name: result["sampling"][name] for name in PIPELINE_SAMPLING} == PIPELINE_SAMPLING
  assert result["checkpoint_step"] == 0 and result["dataset"] == "digits"
  assert np.isfinite(result["frechet"])
