"""A trained model as a training run (or an export) left it on disk, ready to sample from."""

import dataclasses
from typing import Any

import ml_collections
from jax.sharding import Mesh

from jaxdiff import checkpoint, schedules, train_step
from jaxdiff.models import UNet
from jaxdiff.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """The network, its EMA params, the config it was trained with, the checkpoint step they
  come from, and the diffusion schedule of that config."""

  model: UNet
  params: Any
  config: ml_collections.ConfigDict
  step: int
  schedule: Schedule


def load_model(path: str, step: int | None = None, mesh: Mesh | None = None) -> TrainedModel:
  """The EMA params of `path` (a training workdir or an export) at `step` (default: the newest
  step that reads), placed on `mesh` (default: every local device)."""
  params, config, found_step = checkpoint.load_for_sampling(path, step, mesh)
  return TrainedModel(model=train_step.create_model(config), params=params, config=config,
                      step=found_step, schedule=schedules.from_config(config.diffusion))
