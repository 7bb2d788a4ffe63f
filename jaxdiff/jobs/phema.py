"""What `python -m jaxdiff.phema` does: the EMA of any length σ_rel, made after training from a
workdir's post-hoc EMA snapshots (Karras et al. 2024, §3), written as an export that sample.py
and evaluate.py read."""

import json

import jax
import numpy as np

from jaxdiff import checkpoint, config_io, errors, parallel, phema, storage
from jaxdiff.jobs import cli
from jaxdiff.jobs import workdir as workdir_lib


def _snapshot_steps(workdir: str, step: int | None) -> list[int]:
  """The snapshot steps up to `step` (default: the newest), refused in one line where there
  are none or `step` is not one of them."""
  folder = storage.join(workdir, checkpoint.PHEMA_FOLDER)
  steps = sorted(int(name) for name in storage.listdir(folder) if name.isdigit())
  if not steps:
    raise errors.UsageError(f"--workdir={workdir}: no post-hoc EMA snapshots in {folder}; train "
                            f"with --config.train.phema_every=N to track them")
  if step is not None and step not in steps:
    raise errors.UsageError(f"--step={step}: not a snapshot step; the snapshots are at {steps}")
  return [s for s in steps if s <= (steps[-1] if step is None else step)]


def run(workdir: str, sigma_rel: float, output: str, step: int | None = None) -> dict:
  """The EMA of relative length `sigma_rel` at snapshot `step` (default: the newest) as the
  least-squares combination of the snapshots' profiles (`phema.reconstruction_weights`),
  written to the new export folder `output`; returns what was made (weights, fit error)."""
  workdir = storage.resolve(workdir)
  with cli.naming_flags():
    phema.gamma_from_sigma_rel(sigma_rel)
  if storage.exists(output):
    raise errors.UsageError(f"--output={output}: exists; choose a new folder")
  steps = _snapshot_steps(workdir, step)
  config = config_io.config_from_json(json.loads(storage.read_text(
      storage.join(workdir, "config.json"))))
  abstract = workdir_lib.abstract_params(config, parallel.make_mesh(jax.local_devices()[:1]))
  with checkpoint.PhemaSnapshots(workdir) as snapshots:
    _, sigma_rels = snapshots.read(steps[0], (abstract,) * len(config.train.phema_sigma_rels))
    fit = phema.reconstruction_weights(np.asarray(steps)[:, None], sigma_rels, steps[-1],
                                       sigma_rel)
    averages = (average for s in steps
                for average in snapshots.read(s, (abstract,) * len(sigma_rels))[0])
    params = phema.reconstruct(averages, fit.weights)
  made = {"step": steps[-1], "workdir": workdir, "sigma_rel": sigma_rel,
          "tracked_sigma_rels": list(sigma_rels), "snapshot_steps": steps,
          "relative_error": float(fit.relative_error)}
  checkpoint.write_export(output, params, config, made)
  return {**made, "output": storage.resolve(output)}
