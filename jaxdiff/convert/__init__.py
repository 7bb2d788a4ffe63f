"""diffusers folders ↔ jaxdiff: `UNet2DModel` configs, DDPM/DDIM scheduler configs and
safetensors weights, read and written with the `safetensors` NumPy API (no torch).

jaxdiff's U-Net is the DDPM family of diffusers' `UNet2DModel` (as google/ddpm-cifar10-32 and
google/ddpm-ema-church-256 are laid out), with these correspondences:

  UNet2DModel                         jaxdiff (config.model unless said)
  block_out_channels                  ch = block_out_channels[0] and ch_mult (level_channels
                                      where a width is not a multiple of the first)
  AttnDownBlock2D/AttnUpBlock2D at l  attn_resolutions ∋ H / 2^l (H: sample_size)
  layers_per_block                    num_res_blocks
  attention_head_dim null | d         num_heads = 1 | head_dim = d
  norm_num_groups, norm_eps           norm_groups (None where it equals num_groups(C) in every
                                      layer), norm_eps
  flip_sin_to_cos, freq_shift         flip_sin_to_cos, freq_shift
  downsample_padding 0 | 1            downsample_padding
  num_class_embeds n                  num_classes = n − 1 (the last row is the null label)
  in_channels, sample_size            the image shape (config.data.num_channels, image_size)
  out_channels, dropout               out_channels, dropout

  DDPMScheduler / DDIMScheduler       config.diffusion, and the sampling settings
  beta_schedule linear | scaled_linear | squaredcos_cap_v2
                                      schedule linear | scaled_linear | cosine
  num_train_timesteps                 num_timesteps
  prediction_type epsilon | v_prediction | sample
                                      prediction eps | v | x0
  rescale_betas_zero_snr              rescale_zero_terminal_snr
  variance_type fixed_large | fixed_small
                                      the DDPM sampler's variance beta | beta_tilde
  clip_sample                         clip_x0
  timestep_spacing linspace | trailing | leading
                                      spacing uniform | trailing | leading
  DDPMPipeline: all T steps; DDIMPipeline: 50 steps, η = 0
                                      config.sample and config.eval (`to_config`)

diffusers' DDIMScheduler steps from t to t − ⌊T/K⌋ whatever its spacing, so its sampler is
jaxdiff's ddim step for step with leading spacing, and with trailing where K divides T; on
linspace it evaluates the network at other timesteps than it steps between, and jaxdiff's
uniform ddim is the consistent sampler of those timesteps. DDPMScheduler steps to the next
timestep it visits on every spacing.

Weights: torch's OIHW conv kernels are HWIO here, Linear weights [out, in] are Dense kernels
[in, out], and the 1×1 `conv_shortcut` is the Dense `nin_shortcut`. Any other value of a
diffusers field raises errors.ArgumentError naming the field and the value; so does a jaxdiff
setting diffusers cannot express, on the way out.

A whole folder is a `Pipeline` (`read`, `write`); `to_config` makes the complete jaxdiff config
of one, and `pipeline_of` the Pipeline of a jaxdiff config and its params. Loading a folder as
a trained model, and the programs, are in `jaxdiff.jobs.convert`.
"""

import copy
import functools
import inspect
import json
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy

from jaxdiff import models, processes, samplers, schedules, storage, validation
from jaxdiff.denoiser import image_shape as data_image_shape
from jaxdiff.errors import ArgumentError
from jaxdiff.models.unet import UNet, num_groups

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
UNET_CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PIPELINE_INDEX_NAME = "model_index.json"
PIPELINES = ("DDPMPipeline", "DDIMPipeline")

# ---------------------------------------------------------------------------------------------
# UNet2DModel config.json ↔ config.model fields and the image shape


DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# The UNet2DModel fields jaxdiff has no counterpart for, with the one value it can take.
_FIXED_UNET_FIELDS = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
}
_ALIASES = {"act_fn": {"swish": "silu"}}
# Every UNet2DModel field with its default, for configs that leave a field out. jaxdiff reads
# every one but num_train_timesteps, which only the learned time embedding uses.
_UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "downsample_padding": 1, "dropout": 0.0, "attention_head_dim": 8, "norm_num_groups": 32,
    "norm_eps": 1e-5, "num_class_embeds": None, "num_train_timesteps": None,
    **_FIXED_UNET_FIELDS,
}


def _known_fields(config: Mapping, known, what: str) -> dict:
  """`config` without its private `_…` entries; ArgumentError for a field not in `known`."""
  fields = {name: value for name, value in config.items() if not name.startswith("_")}
  for name in fields:
    if name not in known:
      raise ArgumentError(name, fields[name], f"a {what} field jaxdiff does not know; it cannot "
                          "tell what the field changes, so it reads no such config")
  return fields


def _image_shape(sample_size, in_channels) -> tuple[int, int, int]:
  if isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:
    height, width = sample_size
  else:
    height = width = sample_size
  if not (validation.is_whole(height) and validation.is_whole(width) and height > 0 < width):
    raise ArgumentError("sample_size", sample_size, "expected the image size, a whole number or "
                        "[height, width]: jaxdiff places attention by feature-map size")
  return height, width, validation.whole("in_channels", in_channels, 1)


def _block_types(name: str, types, kinds: Mapping[str, bool], levels: int) -> list[bool]:
  """Whether each block of `types` (a down or up list) has attention."""
  if not isinstance(types, (list, tuple)) or len(types) != levels:
    raise ArgumentError(name, types, f"expected {levels} block types, one per "
                        "block_out_channels entry")
  attention = []
  for block in types:
    block = block.removeprefix("UNetRes") if isinstance(block, str) else block  # older name
    if block not in kinds:
      raise ArgumentError(name, types, f"block type {block!r} is not one jaxdiff has; it has "
                          f"{' and '.join(kinds)}")
    attention.append(kinds[block])
  return attention


def abstract_params(model_fields: Mapping, image_shape) -> dict:
  """The parameter shapes (`jax.ShapeDtypeStruct`s) of the U-Net `model_fields` builds for
  images of `image_shape` (H, W, C), computed without making an array."""
  return _abstract_params(UNet(**_unet_fields(model_fields)), tuple(image_shape))


@functools.lru_cache(maxsize=16)
def _abstract_params(model: UNet, image_shape: tuple[int, int, int]) -> dict:
  """`abstract_params`, traced once per U-Net and image shape (a conversion asks several
  times)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]


def _normalized_widths(params) -> set[int]:
  """The channel counts of every GroupNorm in a U-Net's params."""
  return {leaf.shape[0] for path, leaf in _leaves(params) if path[-1] == "scale"}


def from_unet_config(unet_config: Mapping) -> tuple[dict, tuple[int, int, int]]:
  """A UNet2DModel config.json (as a dict) → (config.model fields, image shape (H, W, C)).

  Fields left out take UNet2DModel's defaults. ArgumentError naming the diffusers field for
  any value jaxdiff's U-Net cannot build.
  """
  class_name = unet_config.get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    raise ArgumentError("_class_name", class_name, "jaxdiff reads UNet2DModel configs only")
  given = _known_fields(unet_config, _UNET_DEFAULTS, "UNet2DModel")
  config = {**_UNET_DEFAULTS, **given}
  for name, value in _FIXED_UNET_FIELDS.items():
    if _ALIASES.get(name, {}).get(config[name], config[name]) != value:
      raise ArgumentError(name, config[name], f"jaxdiff's U-Net has only {name} = "
                          f"{json.dumps(value)}")
  image_shape = _image_shape(config["sample_size"], config["in_channels"])
  widths = validation.whole_tuple("block_out_channels", config["block_out_channels"], 1)
  levels = len(widths)
  down = _block_types("down_block_types", config["down_block_types"], DOWN_BLOCKS, levels)
  up = _block_types("up_block_types", config["up_block_types"], UP_BLOCKS, levels)
  if up != down[::-1]:
    raise ArgumentError("up_block_types", config["up_block_types"], "jaxdiff's U-Net has "
                        "attention at the same levels going down and up: up_block_types must "
                        "mirror down_block_types")
  height = image_shape[0]
  if height % 2**(levels - 1):
    raise ArgumentError("sample_size", config["sample_size"], f"{levels} levels halve the image "
                        f"{levels - 1} times: the size must be a multiple of {2**(levels - 1)}")
  ch = widths[0]
  multiples = all(width % ch == 0 for width in widths)
  num_class_embeds = config["num_class_embeds"]
  if num_class_embeds is not None:
    validation.whole("num_class_embeds", num_class_embeds, 2)
  fields = dict(
      ch=ch,
      ch_mult=tuple(width // ch for width in widths) if multiples else (1,) * levels,
      level_channels=None if multiples else widths,
      num_res_blocks=config["layers_per_block"],
      attn_resolutions=tuple(height // 2**level for level in range(levels) if down[level]),
      dropout=config["dropout"],
      out_channels=config["out_channels"],
      num_classes=0 if num_class_embeds is None else num_class_embeds - 1,
      dtype="float32",
      resamp_with_conv=True,
      num_heads=1,
      remat=False,
      head_dim=config["attention_head_dim"],
      norm_groups=validation.whole("norm_num_groups", config["norm_num_groups"], 1),
      norm_eps=config["norm_eps"],
      flip_sin_to_cos=config["flip_sin_to_cos"],
      freq_shift=config["freq_shift"],
      downsample_padding=config["downsample_padding"],
  )
  _check_fields(fields, image_shape)
  fields.update(dropout=float(fields["dropout"]), norm_eps=float(fields["norm_eps"]),
                freq_shift=float(fields["freq_shift"]))
  norm_widths = _normalized_widths(abstract_params(fields, image_shape))
  if all(num_groups(width) == fields["norm_groups"] for width in norm_widths):
    fields["norm_groups"] = None  # the same groups as jaxdiff's own rule
  return fields, image_shape


# The U-Net fields that take a diffusers field's value as it is, under another name.
_SAME_VALUE_FIELDS = {"head_dim": "attention_head_dim", "norm_groups": "norm_num_groups",
                      "num_res_blocks": "layers_per_block"}


def _check_fields(fields, image_shape) -> None:
  """The U-Net's own check of fields made from a diffusers config: its errors name the diffusers
  field."""
  try:
    UNet.check_fields(fields, image_shape)
  except ArgumentError as error:
    raise ArgumentError(_SAME_VALUE_FIELDS.get(error.name, error.name), error.value,
                        error.problem) from None


def to_unet_config(model_fields: Mapping, image_shape) -> dict:
  """config.model fields and the image shape (H, W, C) → a UNet2DModel config.json (a dict).

  ArgumentError naming the jaxdiff field for a U-Net diffusers cannot express.
  """
  fields = _unet_fields(model_fields)
  UNet.check_fields(fields, tuple(image_shape))
  widths = UNet.level_widths(fields)
  if widths[0] != fields["ch"]:
    name = "ch_mult" if fields["level_channels"] is None else "level_channels"
    raise ArgumentError(name, tuple(fields[name]), "diffusers' first level is as wide as its "
                        f"input conv (ch = {fields['ch']}); the first level's width must be ch")
  if not fields["resamp_with_conv"]:
    raise ArgumentError("resamp_with_conv", False, "diffusers' UNet2DModel always resamples "
                        "with a conv")
  height, width, channels = image_shape
  attention = UNet.attention_levels(fields, height)
  params = abstract_params(fields, image_shape)
  groups = fields["norm_groups"]
  if groups is None:
    rule_groups = {num_groups(width) for width in _normalized_widths(params)}
    if len(rule_groups) != 1:
      raise ArgumentError("norm_groups", None, f"its GroupNorms have {sorted(rule_groups)} "
                          "groups (num_groups(C)), diffusers one count for all: set norm_groups")
    (groups,) = rule_groups
  head_dim = fields["head_dim"]
  if head_dim is None and fields["num_heads"] > 1:
    head_widths = {width // fields["num_heads"]
                   for width in UNet.attention_widths(fields, image_shape)}
    if len(head_widths) != 1:
      raise ArgumentError("num_heads", fields["num_heads"], f"its attention heads are "
                          f"{sorted(head_widths)} channels wide, diffusers' all one width: set "
                          "head_dim instead")
    (head_dim,) = head_widths
  return {
      "_class_name": "UNet2DModel",
      "sample_size": height if height == width else [height, width],
      "in_channels": channels,
      "out_channels": fields["out_channels"],
      "freq_shift": fields["freq_shift"],
      "flip_sin_to_cos": fields["flip_sin_to_cos"],
      "down_block_types": [("AttnDownBlock2D" if a else "DownBlock2D") for a in attention],
      "up_block_types": [("AttnUpBlock2D" if a else "UpBlock2D") for a in attention[::-1]],
      "block_out_channels": list(widths),
      "layers_per_block": fields["num_res_blocks"],
      "downsample_padding": fields["downsample_padding"],
      "dropout": fields["dropout"],
      "attention_head_dim": head_dim,
      "norm_num_groups": groups,
      "norm_eps": fields["norm_eps"],
      "num_class_embeds": fields["num_classes"] + 1 if fields["num_classes"] else None,
      "num_train_timesteps": None,
      **_FIXED_UNET_FIELDS,
  }


def _unet_fields(model_fields: Mapping) -> dict:
  """Every U-Net field, `model_fields`' values over the class defaults (`models.network_fields`);
  ArgumentError for a network other than the U-Net."""
  if models.network_class(model_fields) is not UNet:
    raise ArgumentError("name", models.network_name(model_fields), "diffusers' UNet2DModel "
                        "holds jaxdiff's U-Net only (config.model.name = 'unet')")
  return {name: tuple(value) if isinstance(value, list) else value
          for name, value in models.network_fields(model_fields).items()}


# ---------------------------------------------------------------------------------------------
# scheduler_config.json ↔ config.diffusion fields and the sampling settings

SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCE_TYPES = {"fixed_large": "beta", "fixed_small": "beta_tilde"}
TIMESTEP_SPACINGS = {"linspace": "uniform", "trailing": "trailing", "leading": "leading"}
# The cosine schedule's options as squaredcos_cap_v2 fixes them.
_SQUAREDCOS_OPTIONS = {"s": 0.008, "max_beta": 0.999}

# Both schedulers' fields and defaults (variance_type is DDPM's, set_alpha_to_one DDIM's).
_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    # Written by diffusers 0.1-0.2 (the published DDPM pipelines'), ignored by diffusers since:
    # which arrays the scheduler returned, and a list of timesteps that was never read.
    "tensor_format": "pt", "timestep_values": None,
}


def _mapped(name: str, value, mapping: Mapping):
  if value not in mapping:
    raise ArgumentError(name, value, f"jaxdiff has {', '.join(map(str, mapping))}")
  return mapping[value]


def from_scheduler_config(scheduler_config: Mapping) -> tuple[dict, dict]:
  """A DDPMScheduler or DDIMScheduler scheduler_config.json (a dict) → (config.diffusion
  fields, sampling settings {sampler, clip_x0, spacing, and the DDPM sampler's variance}).

  Fields left out take the scheduler's defaults. ArgumentError naming the diffusers field for
  any value jaxdiff cannot sample as diffusers would.
  """
  class_name = scheduler_config.get("_class_name")
  sampler = _mapped("_class_name", class_name, SCHEDULERS)
  config = {**_SCHEDULER_DEFAULTS,
            **_known_fields(scheduler_config, _SCHEDULER_DEFAULTS, class_name)}
  if config["trained_betas"] is not None:
    raise ArgumentError("trained_betas", "[…]", "jaxdiff makes its betas from a named schedule; "
                        "it has no field for a list of betas")
  if config["timestep_values"] is not None:
    raise ArgumentError("timestep_values", "[…]", "jaxdiff samples on spaced timesteps only")
  if config["thresholding"]:
    raise ArgumentError("thresholding", True, "diffusers caps the threshold at "
                        "sample_max_value, jaxdiff's dynamic thresholding does not")
  if config["clip_sample"] and config["clip_sample_range"] != 1.0:
    raise ArgumentError("clip_sample_range", config["clip_sample_range"], "jaxdiff clips x̂0 to "
                        "[−1, 1] only")
  if sampler == "ddim" and not config["set_alpha_to_one"]:
    raise ArgumentError("set_alpha_to_one", False, "jaxdiff's DDIM ends at ᾱ = 1 (True) only")
  if config["timestep_spacing"] == "leading" and config["steps_offset"] != 0:
    raise ArgumentError("steps_offset", config["steps_offset"], "jaxdiff's leading spacing "
                        "starts at t = 0 (steps_offset 0)")
  schedule = _mapped("beta_schedule", config["beta_schedule"], BETA_SCHEDULES)
  options = ({} if schedule == "cosine" else
             {"beta_start": float(config["beta_start"]), "beta_end": float(config["beta_end"])})
  diffusion = dict(
      schedule=schedule,
      num_timesteps=validation.whole("num_train_timesteps", config["num_train_timesteps"], 1),
      schedule_kwargs=options,
      prediction=_mapped("prediction_type", config["prediction_type"], PREDICTION_TYPES),
      rescale_zero_terminal_snr=validation.boolean("rescale_betas_zero_snr",
                                                   config["rescale_betas_zero_snr"]),
  )
  sampling = dict(sampler=sampler,
                  clip_x0=validation.boolean("clip_sample", config["clip_sample"]),
                  spacing=_mapped("timestep_spacing", config["timestep_spacing"],
                                  TIMESTEP_SPACINGS))
  if sampler == "ddpm":
    sampling["variance"] = _mapped("variance_type", config["variance_type"], VARIANCE_TYPES)
  return diffusion, sampling


def _inverse(mapping: Mapping) -> dict:
  return {value: key for key, value in mapping.items()}


def to_scheduler_config(diffusion: Mapping, sampling: Mapping) -> dict:
  """config.diffusion fields and sampling settings {sampler: ddpm | ddim, clip_x0, spacing,
  variance (ddpm)} → a DDPMScheduler or DDIMScheduler scheduler_config.json (a dict).

  Settings left out or None take the sampler's defaults (`samplers.SAMPLERS`, `samplers.ddpm`).
  ArgumentError naming the jaxdiff setting for what diffusers cannot express.
  """
  process = processes.process_name(diffusion)
  if process != "ddpm":
    raise ArgumentError("process", process, "diffusers' DDPMScheduler and DDIMScheduler hold "
                        "DDPM's discrete chain only (config.diffusion.process = 'ddpm')")
  sampler = sampling.get("sampler", "ddpm")
  class_name = _mapped("sampler", sampler, _inverse(SCHEDULERS))
  registered = samplers.SAMPLERS[sampler]
  setting = lambda name, default: default if sampling.get(name) is None else sampling[name]
  schedule = diffusion["schedule"]
  beta_schedule = _mapped("schedule", schedule, _inverse(BETA_SCHEDULES))
  options = schedules.schedule_options(schedule, diffusion.get("schedule_kwargs", {}))
  fixed = _SQUAREDCOS_OPTIONS if schedule == "cosine" else {}
  beta_start = options.pop("beta_start", _SCHEDULER_DEFAULTS["beta_start"])
  beta_end = options.pop("beta_end", _SCHEDULER_DEFAULTS["beta_end"])
  if any(name not in fixed or value != fixed[name] for name, value in options.items()):
    problem = (f"diffusers' {beta_schedule} is jaxdiff's cosine at {fixed} only" if fixed
               else f"diffusers' {beta_schedule} has the options beta_start and beta_end only")
    raise ArgumentError("schedule_kwargs", dict(diffusion["schedule_kwargs"]), problem)
  config = {
      "_class_name": class_name,
      "num_train_timesteps": diffusion["num_timesteps"],
      "beta_start": beta_start,
      "beta_end": beta_end,
      "beta_schedule": beta_schedule,
      "trained_betas": None,
      "clip_sample": bool(setting("clip_x0", registered.clip_x0)),
      "clip_sample_range": 1.0,
      "prediction_type": _mapped("prediction", diffusion.get("prediction", "eps"),
                                 _inverse(PREDICTION_TYPES)),
      "thresholding": False,
      "timestep_spacing": _mapped("spacing", setting("spacing", registered.spacing),
                                  _inverse(TIMESTEP_SPACINGS)),
      "steps_offset": 0,
      "rescale_betas_zero_snr": bool(diffusion.get("rescale_zero_terminal_snr", False)),
  }
  if sampler == "ddpm":
    default = inspect.signature(samplers.ddpm).parameters["variance"].default
    config["variance_type"] = _mapped("variance", setting("variance", default),
                                      _inverse(VARIANCE_TYPES))
  else:
    config["set_alpha_to_one"] = True
  return config


# ---------------------------------------------------------------------------------------------
# safetensors tensors ↔ params

# jaxdiff's module names inside a block → diffusers'.
_RES_BLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
                    "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                    "proj_out": "to_out.0"}
_TOP_NAMES = {"conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1",
              "temb_dense1": "time_embedding.linear_2", "class_embed": "class_embedding",
              "norm_out": "conv_norm_out", "conv_out": "conv_out",
              "mid_block_1": "mid_block.resnets.0", "mid_attn_1": "mid_block.attentions.0",
              "mid_block_2": "mid_block.resnets.1"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Older diffusers checkpoints name the attention's projections so (diffusers still reads them).
_DEPRECATED_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value",
                               "to_out.0": "proj_attn"}
_LEVEL_MODULE = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?$")


def _leaves(tree, prefix=()):
  """(path of keys, leaf) for every leaf of a nested dict, in sorted key order."""
  if isinstance(tree, Mapping):
    for key in sorted(tree):
      yield from _leaves(tree[key], prefix + (key,))
  else:
    yield prefix, tree


def _num_levels(params) -> int:
  return 1 + max(int(_LEVEL_MODULE.match(name).group(2)) for name in params
                 if name.startswith("down_"))


def tensor_name(path: tuple[str, ...], num_levels: int) -> str:
  """The diffusers state-dict name of the jaxdiff param at `path` (e.g. ('down_1_attn_0', 'q',
  'kernel') → 'down_blocks.1.attentions.0.to_q.weight') in a U-Net of `num_levels` levels."""
  top, *inner, leaf = path
  level_module = _LEVEL_MODULE.match(top)
  if level_module:
    direction, level, kind, block = level_module.groups()
    index = int(level) if direction == "down" else num_levels - 1 - int(level)
    where = {"block": f"resnets.{block}", "attn": f"attentions.{block}",
             "downsample": "downsamplers.0", "upsample": "upsamplers.0"}[kind]
    module = f"{direction}_blocks.{index}.{where}"
  else:
    module = _TOP_NAMES[top]
  names = _ATTENTION_NAMES if top.startswith("mid_attn") or "_attn_" in top else _RES_BLOCK_NAMES
  inner_names = [names.get(name, name) for name in inner]
  return ".".join([module, *inner_names, _LEAF_NAMES[leaf]])


def _to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return array
  if array.ndim == 4:  # conv HWIO → OIHW
    return array.transpose(3, 2, 0, 1)
  if path[-2] == "nin_shortcut":  # Dense [in, out] → 1×1 conv [out, in, 1, 1]
    return array.T[:, :, None, None]
  return array.T  # Dense [in, out] → Linear [out, in]


def _from_torch_layout(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return tensor
  if tensor.ndim == 4 and path[-2] == "nin_shortcut":
    return tensor[:, :, 0, 0].T
  if tensor.ndim == 4:
    return tensor.transpose(2, 3, 1, 0)
  return tensor.T


def params_to_tensors(params) -> dict[str, np.ndarray]:
  """jaxdiff U-Net params → diffusers' UNet2DModel state dict, as float32 NumPy arrays in
  torch's layouts."""
  num_levels = _num_levels(params)
  return {tensor_name(path, num_levels):
          np.ascontiguousarray(_to_torch_layout(path, np.asarray(leaf, np.float32)))
          for path, leaf in _leaves(params)}


def params_from_tensors(tensors: Mapping[str, np.ndarray], model_fields: Mapping,
                        image_shape) -> dict:
  """A UNet2DModel state dict (NumPy arrays) → the params of the U-Net `model_fields` builds
  for `image_shape`, float32. ArgumentError for a missing, misshapen or unexpected tensor."""
  shapes = abstract_params(model_fields, image_shape)
  num_levels = _num_levels(shapes)
  unused = set(tensors)
  params: dict = {}
  for path, shape in _leaves(shapes):
    name = tensor_name(path, num_levels)
    deprecated = next((name.replace(f".{new}.", f".{old}.")
                       for new, old in _DEPRECATED_ATTENTION_NAMES.items()
                       if f".{new}." in name), name)
    source = name if name in tensors else deprecated
    if source not in tensors:
      raise ArgumentError("tensors", name, "missing from the checkpoint, which the config's "
                          "U-Net has; is config.json the one the weights were saved with?")
    array = _from_torch_layout(path, np.asarray(tensors[source]))
    if array.shape != shape.shape:
      expected = _to_torch_layout(path, np.empty(shape.shape)).shape
      raise ArgumentError(source, tuple(tensors[source].shape), f"the config's U-Net has shape "
                          f"{tuple(expected)} here; is config.json the one the weights were "
                          "saved with?")
    unused.discard(source)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.asarray(array, np.float32)
  if unused:
    raise ArgumentError("tensors", sorted(unused)[0], f"{len(unused)} tensor(s) of the checkpoint "
                        "have no place in the config's U-Net; is config.json the one the weights "
                        "were saved with?")
  return params


# ---------------------------------------------------------------------------------------------
# Folders


class Pipeline(NamedTuple):
  """What a diffusers folder holds, in jaxdiff's terms: config.model fields, the image shape
  (H, W, C), config.diffusion fields, the sampling settings (see `from_scheduler_config`) and
  the U-Net's params."""

  model: dict
  image_shape: tuple[int, int, int]
  diffusion: dict
  sampling: dict
  params: Any


def _read_json(path: str) -> dict:
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as error:
    raise ArgumentError("path", path, f"not JSON: {error}") from None


def _component_folder(path: str, component: str, file_name: str) -> str:
  """Where a pipeline keeps a component: its subfolder, or the pipeline's own folder (as the
  first published DDPM pipelines do)."""
  folder = storage.join(path, component)
  return folder if storage.exists(storage.join(folder, file_name)) else path


def _read_weights(unet_folder: str) -> dict[str, np.ndarray]:
  weights = storage.join(unet_folder, WEIGHTS_NAME)
  if storage.exists(weights):
    with storage.open_file(weights, "rb") as f:
      return safetensors.numpy.load(f.read())
  if storage.exists(storage.join(unet_folder, PICKLED_WEIGHTS_NAME)):
    raise ArgumentError("path", unet_folder, f"holds {PICKLED_WEIGHTS_NAME} (pickled torch) but "
                        f"no {WEIGHTS_NAME}, and jaxdiff reads safetensors only; write it where "
                        "torch and diffusers are installed: python -c \"from diffusers import "
                        f"UNet2DModel as U; d='{unet_folder}'; U.from_pretrained(d)"
                        ".save_pretrained(d, safe_serialization=True)\"")
  raise ArgumentError("path", unet_folder, f"holds no {WEIGHTS_NAME}")


def read(path: str) -> Pipeline:
  """A diffusers UNet2DModel folder (config.json and diffusion_pytorch_model.safetensors; its
  schedule: DDPMScheduler's defaults, or a scheduler_config.json beside them) or a DDPM or DDIM
  pipeline folder (model_index.json, unet/, scheduler/) → its `Pipeline`.

  ArgumentError naming the path or the diffusers field that jaxdiff cannot read.
  """
  index_path = storage.join(path, PIPELINE_INDEX_NAME)
  if storage.exists(index_path):
    index = _read_json(index_path)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
      raise ArgumentError("_class_name", pipeline, f"jaxdiff reads {' and '.join(PIPELINES)} "
                          "folders (a U-Net and a scheduler) only")
    components = {name for name in index if not name.startswith("_")}
    if components != {"unet", "scheduler"}:
      raise ArgumentError("model_index.json", sorted(components), "a DDPM pipeline holds a unet "
                          "and a scheduler only")
    unet_folder = _component_folder(path, "unet", UNET_CONFIG_NAME)
    scheduler_folder = _component_folder(path, "scheduler", SCHEDULER_CONFIG_NAME)
  elif storage.exists(storage.join(path, UNET_CONFIG_NAME)):
    unet_folder = scheduler_folder = path
  else:
    raise ArgumentError("path", path, f"holds neither {PIPELINE_INDEX_NAME} (a diffusers "
                        f"pipeline) nor {UNET_CONFIG_NAME} (a UNet2DModel)")
  model, image_shape = from_unet_config(_read_json(storage.join(unet_folder, UNET_CONFIG_NAME)))
  scheduler_path = storage.join(scheduler_folder, SCHEDULER_CONFIG_NAME)
  scheduler_config = (_read_json(scheduler_path) if storage.exists(scheduler_path)
                      else {"_class_name": "DDPMScheduler"})
  diffusion, sampling = from_scheduler_config(scheduler_config)
  params = params_from_tensors(_read_weights(unet_folder), model, image_shape)
  return Pipeline(model, image_shape, diffusion, sampling, params)


def write(path: str, pipeline: Pipeline) -> None:
  """Write `pipeline` as a diffusers DDPM (or DDIM) pipeline folder `path`, which must not
  exist: model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors and
  scheduler/scheduler_config.json, in one piece (`storage.staged`). ArgumentError naming the
  jaxdiff setting diffusers cannot express (nothing is written then)."""
  if storage.exists(path):
    raise ArgumentError("path", path, "exists; choose a new folder for the diffusers pipeline")
  unet_config = to_unet_config(pipeline.model, pipeline.image_shape)
  scheduler_config = to_scheduler_config(pipeline.diffusion, pipeline.sampling)
  tensors = params_to_tensors(pipeline.params)
  pipeline_class = "DDPMPipeline" if scheduler_config["_class_name"] == "DDPMScheduler" \
      else "DDIMPipeline"
  index = {"_class_name": pipeline_class, "unet": ["diffusers", "UNet2DModel"],
           "scheduler": ["diffusers", scheduler_config["_class_name"]]}
  with storage.staged(path) as staging:
    storage.write_text(storage.join(staging, "unet", UNET_CONFIG_NAME), _json(unet_config))
    with storage.open_file(storage.join(staging, "unet", WEIGHTS_NAME), "wb") as f:
      f.write(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    storage.write_text(storage.join(staging, "scheduler", SCHEDULER_CONFIG_NAME),
                       _json(scheduler_config))
    storage.write_text(storage.join(staging, PIPELINE_INDEX_NAME), _json(index))


def _json(config: Mapping) -> str:
  return json.dumps(config, indent=2, sort_keys=True) + "\n"


def is_folder(path: str) -> bool:
  """Whether `path` holds a diffusers pipeline (model_index.json) or UNet2DModel (its weights),
  which a jaxdiff workdir or export never does."""
  return any(storage.exists(storage.join(path, name))
             for name in (PIPELINE_INDEX_NAME, WEIGHTS_NAME, PICKLED_WEIGHTS_NAME))


# ---------------------------------------------------------------------------------------------
# Pipelines ↔ jaxdiff configs

# The steps each pipeline samples on by default (None: all T); DDIMPipeline's η is 0.
PIPELINE_STEPS = {"ddpm": None, "ddim": 50}
# The sampling settings a scheduler holds (`from_scheduler_config`).
_SCHEDULER_SETTINGS = ("sampler", "clip_x0", "spacing", "variance")


def sampling_fields(sampling: Mapping, num_timesteps: int) -> dict:
  """The config.sample / config.eval fields (`samplers.SamplingOptions`) that sample as a
  pipeline does by default: its scheduler's settings `sampling` on `PIPELINE_STEPS` (at most T),
  η = 0, no thresholding and no guidance."""
  steps = PIPELINE_STEPS[sampling["sampler"]]
  return {"threshold_percentile": None, "guidance_scale": 0.0, "eta": 0.0, "variance": "beta",
          **sampling, "num_steps": num_timesteps if steps is None else min(steps, num_timesteps)}


def to_config(pipeline: Pipeline, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The complete jaxdiff config of `pipeline`: a copy of `base` (every field a folder does not
  set: the data set, training, evaluation) with config.model the U-Net's fields (name
  'unet'), config.diffusion DDPM's chain (process 'ddpm') on the scheduler's schedule and
  prediction, config.data.image_size and num_channels the
  image's, and config.sample and config.eval sampling as the pipeline does by default
  (`sampling_fields`). ArgumentError for images that are not square."""
  height, width, channels = pipeline.image_shape
  if height != width:
    raise ArgumentError("sample_size", [height, width], "jaxdiff's images are square "
                        "(config.data.image_size)")
  config = copy.deepcopy(base)
  with config.unlocked():  # a config from a flag is locked: no new fields
    config.model.update(name="unet", **pipeline.model)
    config.diffusion.update(process="ddpm", **{name: value for name, value
                                               in pipeline.diffusion.items()
                                               if name != "schedule_kwargs"})
    config.diffusion.schedule_kwargs = ml_collections.ConfigDict(
        pipeline.diffusion["schedule_kwargs"])
    config.data.update(image_size=height, num_channels=channels)
    fields = sampling_fields(pipeline.sampling, pipeline.diffusion["num_timesteps"])
    for section in (config.sample, config.eval):
      section.update(fields)
  return config


def pipeline_of(config: ml_collections.ConfigDict, params) -> Pipeline:
  """The `Pipeline` of a jaxdiff config and its params: its model, image shape and process, and
  config.sample's sampler settings where that sampler is one a scheduler holds (ddpm, ddim;
  another sampler: DDPMScheduler's jaxdiff defaults). ArgumentError naming config.sample's
  threshold_percentile, which diffusers' thresholding does not express."""
  sample = config.sample
  sampling = {}
  if sample.sampler in SCHEDULERS.values():
    if sample.get("threshold_percentile") is not None:
      raise ArgumentError("threshold_percentile", sample.threshold_percentile, "diffusers caps "
                          "its threshold at sample_max_value, jaxdiff's dynamic thresholding "
                          "does not; unset it to write a diffusers scheduler")
    sampling = {name: sample[name] for name in _SCHEDULER_SETTINGS if name in sample}
  return Pipeline(config.model.to_dict(), data_image_shape(config.data),
                  config.diffusion.to_dict(), sampling, params)
