"""Configs as JSON, and whether a config can continue what another one trained.

`config_to_json` / `config_from_json` round-trip a resolved ConfigDict through the JSON kept
with every checkpoint and export (JSON lists become the tuples configs use again).
`check_config_compatible` names every field in which a new config would change the parameter
shapes or the meaning of what the network learned.
"""

import json

import ml_collections

from jaxdiff import errors

# Model fields that may change between runs; every other model field fixes parameter shapes.
_MODEL_FIELDS_FREE_TO_CHANGE = ("dropout", "remat", "dtype")
# Other fields that fix the shapes or the meaning of what the network learned.
_OTHER_FIXED_FIELDS = ("data.image_size", "data.num_channels", "diffusion.num_timesteps",
                       "diffusion.schedule", "diffusion.prediction")
_ABSENT = "(absent)"


class ConfigMismatchError(errors.UsageError):
  """The config cannot continue a checkpoint's config; the message names every field."""


def _as_tuples(value):
  """JSON lists back to the tuples configs use (`ch_mult`, `attn_resolutions`)."""
  if isinstance(value, dict):
    return {key: _as_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(item) for item in value)
  return value


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def config_from_json(config_json: dict) -> ml_collections.ConfigDict:
  """The ConfigDict that `config_to_json` came from (lists become tuples again)."""
  return ml_collections.ConfigDict(_as_tuples(config_json))


def _lookup(config_json: dict, dotted_name: str):
  for part in dotted_name.split("."):
    if not isinstance(config_json, dict) or part not in config_json:
      return _ABSENT
    config_json = config_json[part]
  return _as_tuples(config_json)


def config_differences(saved_config, config) -> list[str]:
  """'FIELD NEW (config) vs OLD (checkpoint)' for every field in which `config` cannot continue
  `saved_config`: `model.*` (but dropout, remat, dtype), the image size and channels, and the
  diffusion's schedule, step count and prediction target. Empty when compatible."""
  saved, current = config_to_json(saved_config), config_to_json(config)
  model_fields = sorted((set(saved.get("model", {})) | set(current.get("model", {})))
                        - set(_MODEL_FIELDS_FREE_TO_CHANGE))
  fields = [f"model.{name}" for name in model_fields] + list(_OTHER_FIXED_FIELDS)
  return [f"{field} {_lookup(current, field)!r} (config) vs {_lookup(saved, field)!r} (checkpoint)"
          for field in fields if _lookup(current, field) != _lookup(saved, field)]


def check_config_compatible(saved_config, config, where: str = "the checkpoint") -> None:
  """Raise ConfigMismatchError (a UsageError) naming every field of `config_differences`."""
  differences = config_differences(saved_config, config)
  if differences:
    raise ConfigMismatchError(
        f"the config does not match the checkpoint in {where}: {'; '.join(differences)}. "
        f"Use the checkpoint's config (its config.json) or a fresh --workdir.")
