"""A trained model as a training run (or an export) left it on disk, ready to sample from."""

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxdiff import checkpoint, parallel, schedules, train_step
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


def abstract_ema_params(mesh: Mesh) -> checkpoint.AbstractEmaParams:
  """config → the EMA params' shapes, with the shardings the train state has on `mesh`."""
  return lambda config: train_step.abstract_state(
      config, train_step.create_model(config), mesh).ema_params


def load_model(path: str, step: int | None = None, mesh: Mesh | None = None) -> TrainedModel:
  """The EMA params of `path` (a training workdir or an export) at `step` (default: the newest
  step that reads), placed on `mesh` (default: every local device)."""
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  ema = checkpoint.load_ema(path, abstract_ema_params(mesh), step)
  return TrainedModel(model=train_step.create_model(ema.config), params=ema.params,
                      config=ema.config, step=ema.step,
                      schedule=schedules.from_config(ema.config.diffusion))


def export_ema(workdir: str, export_dir: str, step: int | None = None) -> str:
  """Write the EMA params of `workdir`'s newest readable step (or `step`) and their config to a
  new folder `export_dir` (see `checkpoint.export_ema`); returns its path. One process only."""
  return checkpoint.export_ema(workdir, export_dir,
                               abstract_ema_params(parallel.make_mesh(jax.local_devices()[:1])),
                               step)
