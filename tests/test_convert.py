"""Tests for jaxdiff/convert.py: diffusers UNet2DModel folders ↔ jaxdiff, without torch.

The fixtures (tests/fixtures/diffusers/, written by make_diffusers_fixtures.py with torch and
diffusers) hold small random UNet2DModels laid out as the published DDPM models, their inputs and
diffusers' outputs, and 50 DDPM steps of diffusers' DDPMScheduler.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import convert, models, processes, samplers, schedules
from jaxdiff.denoiser import Denoiser
from jaxdiff.errors import ArgumentError
from jaxdiff.models import count_params
from jaxdiff.models.unet import UNet

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
                                  "diffusers_defaults"])
def test_outputs_equal_diffusers(name):
  """network.apply on the converted params = diffusers' unet(x, t[, y]).sample, transposed."""
  pipeline = convert.read(fixture(name))
  io = np.load(os.path.join(fixture(name), "io.npz"))
  assert pipeline.image_shape == io["x"].shape[2:] + io["x"].shape[1:2]
  apply = jax.jit(UNet(**pipeline.model).apply, compiler_options=QUICK_COMPILE)
  out = apply({"params": pipeline.params}, io["x"].transpose(0, 2, 3, 1), io["t"],
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
  images; the fixture's noise is what jaxdiff draws from its key."""
  pipeline = convert.read(fixture("cifar10"))
  ddpm = np.load(os.path.join(fixture("cifar10"), "ddpm.npz"))
  num_steps, batch = ddpm["noise"].shape[:2]
  shape = (batch, *pipeline.image_shape)
  x_T, noise = ddpm_draws(int(ddpm["seed"]), shape, num_steps)
  np.testing.assert_allclose(ddpm["x_T"].transpose(0, 2, 3, 1), x_T, atol=1e-6)
  np.testing.assert_allclose(ddpm["noise"].transpose(0, 1, 3, 4, 2), noise, atol=1e-6)
  assert pipeline.sampling == dict(sampler="ddpm", clip_x0=True, spacing="uniform",
                                   variance="beta")
  schedule = schedules.from_config(ml_collections.ConfigDict(pipeline.diffusion))
  np.testing.assert_array_equal(
      schedules.spaced_timesteps(schedule, num_steps, pipeline.sampling["spacing"]),
      ddpm["timesteps"][::-1])
  network = UNet(**pipeline.model)
  ddpm_denoiser = Denoiser(network=network,
                           process=processes.DDPM(schedule, pipeline.diffusion["prediction"]),
                           num_classes=network.num_classes, image_shape=pipeline.image_shape)
  options = samplers.SamplingOptions(num_steps=num_steps, batch_size=batch, **pipeline.sampling)
  sample = jax.jit(lambda params: samplers.sample(
      ddpm_denoiser, params, jax.random.key(int(ddpm["seed"])), options).images,
      compiler_options=QUICK_COMPILE)
  images = np.asarray(sample(pipeline.params)).transpose(0, 3, 1, 2)
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
  assert pipeline.sampling == dict(sampler="ddpm", clip_x0=True, spacing=None,
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
