"""What `python -m jaxdiff.convert` does: diffusers folders in and out of jaxdiff.

  from_diffusers(path)                     a diffusers pipeline or UNet2DModel folder as the
                                           `TrainedModel` that `workdir.load_model` gives
  to_diffusers(workdir_or_export, out_dir) the EMA params as a diffusers pipeline folder
  export_diffusers(path, export_dir)       a diffusers folder as a jaxdiff export
  run(...)                                 the program: either direction, its flags checked

The formats themselves are `jaxdiff.convert`'s.
"""

import jax

from jaxdiff import checkpoint, convert, errors, parallel, storage
from jaxdiff.jobs import sample as sample_job
from jaxdiff.jobs import workdir as workdir_lib
from jaxdiff.jobs.workdir import from_diffusers  # the direction in: load_model reads it too

__all__ = ["export_diffusers", "from_diffusers", "run", "to_diffusers"]


def _one_device():
  return parallel.make_mesh(jax.local_devices()[:1])


def to_diffusers(path: str, out_dir: str, step: int | None = None) -> str:
  """Write the EMA params of `path` (a training workdir at `step`, default its newest readable
  one; an export; or a diffusers folder) as a diffusers pipeline folder `out_dir`, which must
  not exist (`convert.write`: model_index.json, unet/, scheduler/; its scheduler from the
  model's config.diffusion and config.sample, `convert.pipeline_of`); returns its path.
  errors.ArgumentError naming the setting that diffusers cannot express (nothing written)."""
  trained = workdir_lib.load_model(path, step, _one_device())
  out_dir = storage.resolve(out_dir)
  convert.write(out_dir, convert.pipeline_of(trained.config, jax.device_get(trained.params)))
  return out_dir


def export_diffusers(path: str, export_dir: str, base_config=None) -> str:
  """Write the diffusers folder `path` as a new jaxdiff export `export_dir`, in the format
  `checkpoint.write_export` writes (ema_params/, config.json and export.json, in one piece), with
  the config `from_diffusers` makes on `base_config` (default: configs/default.py); returns its
  path. sample.py and evaluate.py read it as they read any export."""
  trained = from_diffusers(path, _one_device(), base_config)
  return checkpoint.write_export(export_dir, trained.params, trained.config,
                                 {"step": trained.step, "diffusers": storage.resolve(path)})


def check_flags(**given) -> None:
  """errors.UsageError naming the flag, before anything is read: the flags `given` (name: value,
  None where not given) must be one direction, --from_diffusers=DIR with --output=EXPORT_DIR or
  --workdir=W with --to_diffusers=DIR (and perhaps --checkpoint_step), from a folder that
  exists to a new folder."""
  directions = {"from_diffusers": ("output",), "workdir": ("to_diffusers", "checkpoint_step")}
  sources = [source for source in directions if given.get(source) is not None]
  if len(sources) != 1:
    raise errors.UsageError("give --from_diffusers=DIR --output=EXPORT_DIR (a diffusers folder "
                            "to a jaxdiff export) or --workdir=W --to_diffusers=DIR (a workdir or "
                            "export to a diffusers pipeline), one of the two")
  (source,) = sources
  target = directions[source][0]
  for name, value in given.items():
    if value is not None and name not in (source, *directions[source]):
      raise errors.UsageError(f"--{name}={value}: not a flag of --{source}; it goes with "
                              f"--{next(s for s, flags in directions.items() if name in flags)}")
  if given.get(target) is None:
    raise errors.UsageError(f"--{source} needs --{target}: the folder to write")
  if not storage.isdir(given[source]):
    raise errors.UsageError(f"--{source}={given[source]}: no such folder")
  if storage.exists(given[target]):
    raise errors.UsageError(f"--{target}={given[target]}: exists; choose a new folder")
  sample_job.check_folder(target, given[target])


def run(flags: dict, base_config=None) -> str:
  """What `python -m jaxdiff.convert` does with its `flags` (by name: from_diffusers, output,
  workdir, to_diffusers, checkpoint_step; None where not given): `check_flags`, then
  `export_diffusers(from_diffusers, output, base_config)` or `to_diffusers(workdir,
  to_diffusers, checkpoint_step)`; returns the folder written. A diffusers field or a jaxdiff
  setting that the other side cannot express is an errors.ArgumentError naming it."""
  check_flags(**flags)
  if flags.get("from_diffusers") is not None:
    return export_diffusers(flags["from_diffusers"], flags["output"], base_config)
  return to_diffusers(flags["workdir"], flags["to_diffusers"], flags.get("checkpoint_step"))
