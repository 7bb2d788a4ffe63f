"""Networks by name: `config.model.name` picks one of NETWORKS (default "unet": configs and
checkpoints without the field are U-Nets).

A network is a Flax module class, called as `network.apply(variables, x_t, t, y=None,
train=False, rngs=...)` → an output shaped like x_t with `out_channels` channels (float32). Its
dataclass fields are its config fields (`config.model.FIELD`; a field the config leaves out
takes the class default), and it says of itself:

  FREE_FIELDS                     fields that change no parameter shape and not what it learned
                                  (a run may resume with other values);
  size_multiple(fields)           how much it downsamples: image height and width must be
                                  multiples of this;
  check_fields(fields, shape)     errors.ArgumentError naming the first of its fields that
                                  cannot build it for images of shape (H, W, C).

Nothing outside this package knows a network's fields.
"""

import dataclasses
from typing import Any

import flax.linen as nn

from jaxdiff import validation
from jaxdiff.errors import ArgumentError
from jaxdiff.models.dit import DiT
from jaxdiff.models.unet import UNet, count_params, timestep_embedding

NETWORKS: dict[str, Any] = {"unet": UNet, "dit": DiT}
DEFAULT_NETWORK = "unet"
_MODULE_ATTRIBUTES = ("parent", "name")  # every Flax module's, not config fields

__all__ = ["NETWORKS", "DiT", "UNet", "check", "count_params", "create", "fixed_fields",
           "network_class", "network_fields", "timestep_embedding"]


def network_name(model_config) -> str:
  return model_config.get("name", DEFAULT_NETWORK)


def network_class(model_config):
  """The class `config.model.name` names (ArgumentError for an unknown name)."""
  return NETWORKS[validation.one_of("name", network_name(model_config), NETWORKS, "network")]


def _field_names(network) -> list[str]:
  return [field.name for field in dataclasses.fields(network)
          if field.init and field.name not in _MODULE_ATTRIBUTES]


def network_fields(model_config) -> dict:
  """The chosen network's fields as `config.model` sets them, class defaults for those it does
  not; other networks' fields in the config are not its own and are left out."""
  network = network_class(model_config)
  defaults = {field.name: field.default for field in dataclasses.fields(network)}
  return {name: model_config.get(name, defaults[name]) for name in _field_names(network)}


def check(model_config, image_shape) -> None:
  """ArgumentError naming the first field of `config.model` (its name included) that cannot
  build the network for images of `image_shape` (H, W, C), or that no network has."""
  network = network_class(model_config)
  known = {"name"} | {name for other in NETWORKS.values() for name in _field_names(other)}
  for name, value in model_config.items():
    if name not in known:
      raise ArgumentError(name, value, f"no network has this field; the fields of "
                          f"{network_name(model_config)} are {', '.join(_field_names(network))}")
  network.check_fields(network_fields(model_config), tuple(image_shape))


def create(model_config) -> nn.Module:
  """The network `config.model` describes."""
  return network_class(model_config)(**network_fields(model_config))


def fixed_fields(model_config) -> list[str]:
  """The `config.model` fields a checkpoint of this network fixes: its name and every field of
  its own but the FREE_FIELDS."""
  network = network_class(model_config)
  return ["name"] + [name for name in _field_names(network) if name not in network.FREE_FIELDS]
