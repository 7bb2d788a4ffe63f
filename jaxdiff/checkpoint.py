"""Orbax checkpoints of the whole train state, restorable on any topology, and EMA exports.

A checkpoint is WORKDIR/checkpoints/STEP/ with four items:
  train       step, params, optimizer state and RNG key (as key data)
  ema_params  the EMA params alone, so sampling reads nothing else
  data        the input iterator's state (JSON)
  config      the resolved config (JSON)

Rules that keep the product of training safe:
  * Orbax writes a step into STEP.orbax-checkpoint-tmp* and renames it to STEP when complete,
    so a step cut off half-way is never listed. Its partial folder is left alone (another
    process may still be writing it): Orbax replaces it if that step is saved again, and it is
    safe to delete.
  * A step that exists is never overwritten.
  * A step that cannot be restored is reported by number and left in place; `restore` uses the
    newest good step instead. When training then saves again, the broken steps are moved,
    unchanged, to WORKDIR/checkpoints_broken/ (out of the way of new steps and of clean-up).
  * `max_to_keep` removes an old step only when `max_to_keep` newer steps are known to be good:
    written by this Checkpointer (Orbax deletes only after the new step has committed) or
    restored by it. Steps found on disk and never read count as unverified, so a broken newer
    step never pushes a good older one out.

An export (`export_ema`) is a folder with the EMA params alone: EXPORT/ema_params/ (Orbax),
EXPORT/config.json and EXPORT/export.json (the step it came from; written last).
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxdiff import parallel, train_step

ITEM_NAMES = ("train", "ema_params", "data", "config")
EXPORT_MARKER = "export.json"

# Model fields that may change between runs; every other model field fixes parameter shapes.
_MODEL_FIELDS_FREE_TO_CHANGE = ("dropout", "remat", "dtype")
# Other fields that fix the shapes or the meaning of what the network learned.
_OTHER_FIXED_FIELDS = ("data.image_size", "data.num_channels", "diffusion.num_timesteps",
                       "diffusion.schedule", "diffusion.prediction")
_ABSENT = "(absent)"


class CheckpointError(Exception):
  """A checkpoint problem, said in one line: what is wrong and what to do."""


class _UnreadableStep(Exception):
  """A step whose files cannot be restored (the cause is chained)."""


def _describe(error: BaseException, limit: int = 300) -> str:
  """`Type: message` on one line, cut to `limit` characters (TensorStore's errors are long)."""
  text = " ".join(str(error).split())
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


def _as_tuples(value):
  """JSON lists back to the tuples configs use (`ch_mult`, `attn_resolutions`)."""
  if isinstance(value, dict):
    return {key: _as_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(item) for item in value)
  return value


def config_to_json(config: ml_collections.ConfigDict) -> dict:
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


def check_config_compatible(saved_config, config, where: str = "the checkpoint") -> None:
  """Raise CheckpointError naming every field in which `config` cannot continue `saved_config`:
  `model.*` (but dropout, remat, dtype), the image size and channels, and the diffusion's
  schedule, step count and prediction target."""
  saved, current = config_to_json(saved_config), config_to_json(config)
  model_fields = sorted((set(saved.get("model", {})) | set(current.get("model", {})))
                        - set(_MODEL_FIELDS_FREE_TO_CHANGE))
  fields = [f"model.{name}" for name in model_fields] + list(_OTHER_FIXED_FIELDS)
  differences = [f"{field} {_lookup(current, field)!r} (config) vs "
                 f"{_lookup(saved, field)!r} (checkpoint)"
                 for field in fields if _lookup(current, field) != _lookup(saved, field)]
  if differences:
    raise CheckpointError(
        f"the config does not match the checkpoint in {where}: {'; '.join(differences)}. "
        f"Use the checkpoint's config (its config.json) or a fresh --workdir.")


def _train_item(state: train_step.TrainState, rng_data) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": rng_data}


def _abstract_key_data(abstract_key: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  key_data = jax.eval_shape(jax.random.key_data, abstract_key)
  return jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=abstract_key.sharding)


def _key_impl(abstract_key: jax.ShapeDtypeStruct):
  """The PRNG implementation of an abstract typed key (`key_impl` wants an array: trace one)."""
  impls = []
  jax.eval_shape(lambda key: impls.append(jax.random.key_impl(key)), abstract_key)
  return impls[0]


@dataclasses.dataclass
class _KeepAfterGoodSteps:
  """Orbax preservation policy: keep a step until `max_to_keep` newer steps are known good."""

  max_to_keep: int | None
  good_steps: set[int]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    if self.max_to_keep is None:
      return [True] * len(checkpoints)
    return [sum(good > info.step for good in self.good_steps) < self.max_to_keep
            for info in checkpoints]


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxdiff_checkpoint_{name}")


class Checkpointer:
  """Saves and restores TrainStates under WORKDIR/checkpoints with Orbax, asynchronously.

  Every process of a multi-host job makes the same calls. Usable as a context manager.
  """

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    if max_to_keep is not None and max_to_keep < 1:
      raise CheckpointError(f"max_to_keep must be at least 1 (or None: keep all), got "
                            f"{max_to_keep}")
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._good_steps: set[int] = set()
    self._broken_steps: dict[int, Exception] = {}
    self._pending_step: int | None = None
    try:  # every process, so that all of them fail alike rather than wait for each other
      os.makedirs(self.directory, exist_ok=True)
      with tempfile.TemporaryFile(dir=self.directory):
        pass
    except OSError as error:
      raise CheckpointError(f"cannot write checkpoints to {self.directory}: "
                            f"{error.strerror or error}") from error
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_KeepAfterGoodSteps(max_to_keep, self._good_steps),
        enable_async_checkpointing=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def all_steps(self) -> list[int]:
    """Every step in the checkpoints folder (complete ones: half-written steps are not listed)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step not found broken; `restore` reads it and falls back if it is."""
    steps = [step for step in self.all_steps() if step not in self._broken_steps]
    return steps[-1] if steps else None

  def save(self, step: int, state: train_step.TrainState, data_state: dict, config, *,
           wait: bool = False) -> None:
    """Start writing `state`, the data iterator's state and the config as `step`; training
    goes on while it is written. `wait`: return only once it is on disk (preemption, the end).

    A step that already exists is left as it is (the call does nothing). Raises
    CheckpointError if this or the previous save could not be written; older steps stay.
    """
    step = int(step)
    self.wait()
    self._set_aside_broken_steps()
    if step not in self.all_steps():
      self._good_steps.add(step)
      self._pending_step = step
      try:  # force: otherwise Orbax silently skips a step older than the newest on disk
        self._manager.save(step, force=True, args=ocp.args.Composite(
            train=ocp.args.StandardSave(_train_item(state, jax.random.key_data(state.rng))),
            ema_params=ocp.args.StandardSave(state.ema_params),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_to_json(config))))
      except (OSError, ValueError, RuntimeError) as error:
        self._save_failed(error)
    if wait:
      self.wait()

  def wait(self) -> None:
    """Block until the pending save is on disk; CheckpointError if it could not be written."""
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as error:
      self._save_failed(error)
    self._pending_step = None

  def _save_failed(self, error: Exception):
    step, self._pending_step = self._pending_step, None
    self._good_steps.discard(step)
    self._manager.reload()
    raise CheckpointError(
        f"could not write checkpoint step {step} to {self.directory} ({_describe(error)}); "
        f"the earlier steps {self.all_steps()} are intact. Free disk space (the partial "
        f"{step}.orbax-checkpoint-tmp* folder can go) or fix permissions, then rerun to "
        f"resume.") from error

  def restore(self, abstract_state: train_step.TrainState, step: int | None = None, *,
              config=None) -> tuple[train_step.TrainState, dict, ml_collections.ConfigDict]:
    """(state, data_state, saved config) from `step`, or else the newest step that restores.

    The arrays land with the shardings of `abstract_state` (see `train_step.abstract_state`),
    whatever topology wrote them. With `config`, the checkpoint's config is checked first
    (CheckpointError naming the fields that differ). A step that cannot be read is reported
    and left in place, and the next newest is tried.
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.workdir} (expected {self.directory}/STEP)")
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint step {step} in {self.directory}; steps: {steps}")
      try:
        restored = self._restore_step(step, abstract_state, config)
      except _UnreadableStep as error:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read "
                              f"({_describe(error.__cause__)})") from error
      self._good_steps.add(step)
      return restored
    for candidate in reversed(steps):
      if candidate in self._broken_steps:
        continue
      try:
        restored = self._restore_step(candidate, abstract_state, config)
      except _UnreadableStep as error:
        self._broken_steps[candidate] = error.__cause__
        logging.warning("checkpoint step %d in %s cannot be read (%s); it is left as it is and "
                        "an older step is tried", candidate, self.directory,
                        _describe(error.__cause__))
        continue
      self._good_steps.add(candidate)
      return restored
    broken = sorted(self._broken_steps)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory}: steps {broken} all fail to restore "
        f"(step {broken[-1]}: {_describe(self._broken_steps[broken[-1]])}). They are left as "
        f"they are; restore a copy or start a fresh --workdir.")

  def _restore_step(self, step: int, abstract_state: train_step.TrainState, config):
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
      saved_config = config_from_json(saved["config"])
    except Exception as error:  # whatever the cause, this step cannot be used
      raise _UnreadableStep() from error
    if config is not None:
      check_config_compatible(saved_config, config, self.workdir)
    abstract_train = _train_item(abstract_state, _abstract_key_data(abstract_state.rng))
    try:
      arrays = self._manager.restore(step, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(abstract_train),
          ema_params=ocp.args.StandardRestore(abstract_state.ema_params)))
    except Exception as error:  # whatever the cause, this step cannot be used
      raise _UnreadableStep() from error
    train = arrays["train"]
    state = train_step.TrainState(
        step=train["step"], params=train["params"], ema_params=arrays["ema_params"],
        opt_state=train["opt_state"],
        rng=jax.random.wrap_key_data(train["rng"], impl=_key_impl(abstract_state.rng)))
    return state, saved["data"], saved_config

  def _set_aside_broken_steps(self) -> None:
    """Move the steps `restore` found broken, unchanged, to WORKDIR/checkpoints_broken/."""
    if not self._broken_steps:
      return
    broken_dir = os.path.join(self.workdir, "checkpoints_broken")
    if jax.process_index() == 0:
      for step in sorted(self._broken_steps):
        target, copy = os.path.join(broken_dir, str(step)), 1
        while os.path.exists(target):
          target, copy = os.path.join(broken_dir, f"{step}-{copy}"), copy + 1
        try:
          os.makedirs(broken_dir, exist_ok=True)
          os.rename(os.path.join(self.directory, str(step)), target)
        except OSError as error:
          raise CheckpointError(f"cannot move the unreadable checkpoint step {step} to {target}: "
                                f"{error.strerror or error}") from error
        logging.warning("moved the unreadable checkpoint step %d to %s", step, target)
    _sync_processes("set_aside")
    self._broken_steps.clear()
    self._manager.reload()

  def close(self) -> None:
    """Wait for the pending save, then release Orbax's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()


def _checkpoint_steps(directory: str) -> list[int]:
  """The committed steps in `directory`: Orbax names a step's folder by its number only once it
  is complete."""
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _abstract_ema_params(config, mesh: Mesh):
  return train_step.abstract_state(config, train_step.create_model(config), mesh).ema_params


def load_for_sampling(path: str, step: int | None = None, mesh: Mesh | None = None):
  """(EMA params, config, step) from a training workdir or an export folder.

  Reads the EMA params and the config only (no optimizer state, no data), replicated over
  `mesh` (default: every local device). Without `step`, the newest step that reads.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} does not exist (or is not a folder)")
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  if os.path.exists(os.path.join(path, EXPORT_MARKER)):
    return _load_export(path, mesh)
  directory = os.path.join(path, "checkpoints")
  steps = _checkpoint_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    raise CheckpointError(f"no checkpoint in {path} (expected {directory}/STEP or an export "
                          f"folder); train first or point --workdir at one")
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint step {step} in {directory}; steps: {steps}")
  errors = {}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
    for candidate in [step] if step is not None else reversed(steps):
      step_dir = os.path.join(directory, str(candidate))
      try:
        config = config_from_json(reader.restore(step_dir, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"])
        restored = reader.restore(step_dir, args=ocp.args.Composite(
            ema_params=ocp.args.StandardRestore(_abstract_ema_params(config, mesh))))
        return restored["ema_params"], config, candidate
      except Exception as error:  # whatever the cause: report it and try an older step
        errors[candidate] = error
        logging.warning("checkpoint step %d in %s cannot be read (%s)", candidate, directory,
                        _describe(error))
  newest = max(errors)
  raise CheckpointError(f"no readable checkpoint in {directory}: steps {sorted(errors)} fail "
                        f"to restore (step {newest}: {_describe(errors[newest])})")


def _load_export(path: str, mesh: Mesh):
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = config_from_json(json.load(f))
    with open(os.path.join(path, EXPORT_MARKER)) as f:
      step = json.load(f)["step"]
    with ocp.StandardCheckpointer() as checkpointer:
      ema_params = checkpointer.restore(os.path.join(path, "ema_params"),
                                        _abstract_ema_params(config, mesh))
  except Exception as error:  # whatever the cause, the export cannot be used
    raise CheckpointError(f"the export in {path} cannot be read ({_describe(error)})") from error
  return ema_params, config, step


def export_ema(workdir: str, export_dir: str, step: int | None = None) -> str:
  """Write the EMA params of `workdir`'s newest good step (or `step`) and their config to a new
  folder `export_dir`, all `sample.py` needs; returns its path. One process only."""
  export_dir = os.path.abspath(os.path.expanduser(export_dir))
  if os.path.exists(export_dir):
    raise CheckpointError(f"{export_dir} already exists; choose a new export folder")
  ema_params, config, found_step = load_for_sampling(
      workdir, step, mesh=parallel.make_mesh(jax.local_devices()[:1]))
  parent = os.path.dirname(export_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.partial-", dir=parent)
  except OSError as error:
    raise CheckpointError(f"cannot write to {parent}: {error.strerror or error}") from error
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, "ema_params"), ema_params)
      checkpointer.wait_until_finished()
    with open(os.path.join(staging, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(staging, EXPORT_MARKER), "w") as f:
      json.dump({"step": found_step, "workdir": os.path.abspath(workdir)}, f, indent=2)
    os.rename(staging, export_dir)
  except (OSError, ValueError, RuntimeError) as error:
    shutil.rmtree(staging, ignore_errors=True)
    raise CheckpointError(
        f"could not write the export {export_dir} ({_describe(error)})") from error
  return export_dir
