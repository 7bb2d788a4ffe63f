"""A trained model as a training run, an export or a diffusers folder left it on disk, ready to
sample from."""

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxdiff import checkpoint, convert, denoiser as denoiser_lib, errors, parallel
from jaxdiff.denoiser import Denoiser

# configs/default.py of the checkout jaxdiff is imported from: the fields of a diffusers folder's
# config that the folder does not set (configs/ is not installed with the package).
DEFAULT_CONFIG_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
    "default.py")


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
  """The EMA params of `path` (a training workdir, an export, or a diffusers folder:
  `from_diffusers`) at `step` (default: the newest step that reads), placed on `mesh` (default:
  every local device)."""
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  if convert.is_folder(path):
    if step is not None:
      raise errors.UsageError(f"--checkpoint_step={step}: {path} is a diffusers folder, which "
                              "holds one set of weights; leave the flag out")
    return from_diffusers(path, mesh)
  ema = checkpoint.load_ema(path, lambda config: abstract_params(config, mesh), step)
  return TrainedModel(denoiser=denoiser_lib.from_config(ema.config), params=ema.params,
                      step=ema.step, config=ema.config)


def default_config() -> ml_collections.ConfigDict:
  """The config of configs/default.py (`DEFAULT_CONFIG_FILE`); errors.JobError where jaxdiff is
  installed without its checkout."""
  if not os.path.isfile(DEFAULT_CONFIG_FILE):
    raise errors.JobError(f"{DEFAULT_CONFIG_FILE} does not exist: a diffusers folder's config "
                          "starts from configs/default.py of a jaxdiff checkout; give a "
                          "base_config")
  spec = importlib.util.spec_from_file_location("jaxdiff_default_config", DEFAULT_CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def from_diffusers(path: str, mesh: Mesh | None = None,
                   base_config: ml_collections.ConfigDict | None = None) -> TrainedModel:
  """A diffusers pipeline or UNet2DModel folder (`convert.read`) as the model `load_model`
  gives: the U-Net's params placed on `mesh` (default: every local device) as the train state's
  are, step 0, and the complete config `convert.to_config` makes on `base_config` (default:
  `default_config()`), whose config.sample and config.eval sample as the pipeline does.
  errors.ArgumentError naming the path or the diffusers field that jaxdiff cannot read."""
  pipeline = convert.read(path)
  config = convert.to_config(pipeline, default_config() if base_config is None else base_config)
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  params = jax.tree.map(lambda array, target: jax.device_put(array, target.sharding),
                        pipeline.params, abstract_params(config, mesh))
  return TrainedModel(denoiser=denoiser_lib.from_config(config), params=params, step=0,
                      config=config)


def export_ema(workdir: str, export_dir: str, step: int | None = None) -> str:
  """Write the EMA params of `workdir`'s newest readable step (or `step`) and their config to a
  new folder `export_dir` (see `checkpoint.export_ema`); returns its path. One process only."""
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  return checkpoint.export_ema(workdir, export_dir, lambda config: abstract_params(config, mesh),
                               step)
