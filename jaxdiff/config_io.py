"""Configs as JSON, the one dotted-field lookup, and whether a config can continue what another
one trained.

`config_to_json` / `config_from_json` round-trip a resolved ConfigDict through the JSON kept
with every checkpoint and export (JSON lists become the tuples configs use again).
`check_config_compatible` names every field in which a new config would change the parameter
shapes or the meaning of what the network learned.
"""

import json

import ml_collections

from jaxdiff import errors, models, processes, train_step

# The data's fields that fix the shapes of what the network learned.
_DATA_FIXED_FIELDS = ("data.image_size", "data.num_channels")
ABSENT = "(absent)"


class ConfigMismatchError(ValueError):
  """The config cannot continue a checkpoint's config; the message names every field (the
  training job reports it as a usage error)."""


def _as_tuples(value):
  """JSON lists back to the tuples configs use (`ch_mult`, `attn_resolutions`)."""
  if isinstance(value, dict):
    return {key: _as_tuples(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(item) for item in value)
  return value


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def config_from_json(config_json: dict) -> ml_collections.ConfigDict:
  """The ConfigDict that `config_to_json` came from (lists become tuples again)."""
  return ml_collections.ConfigDict(_as_tuples(config_json))


def lookup(config, dotted_name: str, default=ABSENT):
  """The value at `dotted_name` ('train.batch_size') of a config (or dict); `default` where
  any part is absent."""
  for part in dotted_name.split("."):
    if not hasattr(config, "items") or part not in config:
      return default
    config = config[part]
  return config


def _fixed_values(config) -> dict:
  """{field: value} of every field a checkpoint of `config` fixes: the network's
  (`models.fixed_fields`, with its class defaults where the config is older than a field), the
  image's and the noise process's (`processes.fixed_fields`; configs older than processes are
  DDPM's)."""
  fields = models.network_fields(config.model)
  values = {f"model.{name}": _as_tuples(fields.get(name, models.network_name(config.model)))
            for name in models.fixed_fields(config.model)}
  values.update({field: _as_tuples(lookup(config, field)) for field in _DATA_FIXED_FIELDS})
  process = {"process": processes.process_name(config.diffusion)}
  values.update({f"diffusion.{name}": _as_tuples(process.get(name, lookup(config.diffusion, name)))
                 for name in processes.fixed_fields(config.diffusion)})
  profiles = train_step.phema_profiles(config.train)
  if profiles:  # a run that did not track them, or will not, starts or drops them freely
    values["train.phema_sigma_rels"] = _as_tuples(profiles)
  return values


def config_differences(saved_config, config) -> list[str]:
  """'FIELD NEW (config) vs OLD (checkpoint)' for every field in which `config` cannot continue
  `saved_config`: the network's name and fields (but those it declares free to change), the
  image size and channels, the noise process and what its network learned depends on (DDPM:
  schedule, step count and prediction target; EDM: σ_data), and the post-hoc EMA profiles
  where both track them. Empty when compatible."""
  saved, current = _fixed_values(saved_config), _fixed_values(config)
  fields = dict.fromkeys([field for field in [*current, *saved]
                          if field in saved and field in current or not field.startswith("train.")])
  if saved["diffusion.process"] != current["diffusion.process"]:  # the others are not comparable
    fields = [field for field in fields
              if not field.startswith("diffusion.") or field == "diffusion.process"]
  return [f"{field} {current.get(field, ABSENT)!r} (config) vs {saved.get(field, ABSENT)!r} "
          f"(checkpoint)" for field in fields
          if current.get(field, ABSENT) != saved.get(field, ABSENT)]


def check_config_compatible(saved_config, config, where: str = "the checkpoint") -> None:
  """Raise ConfigMismatchError naming every field of `config_differences`."""
  differences = config_differences(saved_config, config)
  if differences:
    raise ConfigMismatchError(
        f"the config does not match the checkpoint in {where}: {'; '.join(differences)}. "
        f"Use the checkpoint's config (its config.json) or a fresh --workdir.")
