"""A trained model as a training run (or an export) left it on disk, ready to sample from."""

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxdiff import checkpoint, denoiser as denoiser_lib, parallel
from jaxdiff.denoiser import Denoiser


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A `Denoiser`, its EMA params, the checkpoint step they come from and the config it was
  trained with."""

  denoiser: Denoiser
  params: Any
  step: int
  config: ml_collections.ConfigDict

  @property
  def network(self):
    """The Flax network: `network.apply({'params': params}, x_t, t[, y])`."""
    return self.denoiser.network


def abstract_params(config, mesh: Mesh):
  """The params' shapes and dtypes for `config`'s network, with the shardings the train state
  has on `mesh` (`parallel.state_shardings`)."""
  shapes = jax.eval_shape(denoiser_lib.from_config(config).init, jax.random.key(0))
  return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes, parallel.state_shardings(shapes, mesh))


def load_model(path: str, step: int | None = None, mesh: Mesh | None = None) -> TrainedModel:
  """The EMA params of `path` (a training workdir or an export) at `step` (default: the newest
  step that reads), placed on `mesh` (default: every local device)."""
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  ema = checkpoint.load_ema(path, lambda config: abstract_params(config, mesh), step)
  return TrainedModel(denoiser=denoiser_lib.from_config(ema.config), params=ema.params,
                      step=ema.step, config=ema.config)


def export_ema(workdir: str, export_dir: str, step: int | None = None) -> str:
  """Write the EMA params of `workdir`'s newest readable step (or `step`) and their config to a
  new folder `export_dir` (see `checkpoint.export_ema`); returns its path. One process only."""
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  return checkpoint.export_ema(workdir, export_dir, lambda config: abstract_params(config, mesh),
                               step)
