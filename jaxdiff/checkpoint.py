"""Orbax checkpoints of the whole train state, restorable on any topology, and EMA exports.

A checkpoint is WORKDIR/checkpoints/STEP/ with four items, and a fifth when training tracks
post-hoc EMA profiles:
  train       step, params, optimizer state and RNG key (as key data)
  ema_params  the EMA params alone, so sampling reads nothing else
  data        the input iterator's state (JSON)
  config      the resolved config (JSON)
  phema       the post-hoc EMA profiles' averages (`phema`), to resume tracking them exactly
The profiles' snapshots, from which `phema.reconstruct` makes any EMA length after training,
are kept apart, in WORKDIR/phema/STEP/ (`PhemaSnapshots`).
(Checkpoints written before 2026-12 may also hold `health`, {"good": bool}; a step marked
{"good": false} is never resumed from.)

Rules that keep the product of training safe:
  * Orbax writes a step into STEP.orbax-checkpoint-tmp* and renames it to STEP when complete
    (in a gs:// bucket, which cannot rename, it writes STEP/ and then STEP/commit_success.txt),
    so a step cut off half-way is never listed. Its partial folder is left alone (another
    process may still be writing it): Orbax replaces it if that step is saved again, and it is
    safe to delete.
  * A step that exists is never overwritten. A state whose params or EMA params are not finite
    is never saved (the trainer saves only states it judged healthy).
  * A step that cannot be restored is reported by number and left in place; `restore` uses the
    newest readable step instead. When training then saves again, the broken steps are moved,
    unchanged, to WORKDIR/checkpoints_broken/ (in a bucket: copied, then deleted), out of the
    way of new steps and of clean-up.
  * A step holding non-finite values is never resumed from: `restore` refuses it, naming the
    last good step to resume from with `step=`. After `restore(step=N)`, the steps newer than N
    are moved, unchanged, to WORKDIR/checkpoints_superseded/ when training saves again, so that
    the new steps can be written.
  * `max_to_keep` removes an old step only when `max_to_keep` newer steps are known to be good:
    written by this Checkpointer (Orbax deletes only after the new step has committed) or
    restored by it. Steps found on disk and never read count as unverified, so a broken newer
    step never pushes a good older one out (`_Retention`).

An export (`export_ema`) is a folder with the EMA params alone: EXPORT/ema_params/ (Orbax),
EXPORT/config.json and EXPORT/export.json (the step it came from), written in one piece.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from jaxdiff import config_io, errors, storage, train_step

ITEM_NAMES = ("train", "ema_params", "data", "config", "health", "phema")
EXPORT_MARKER = "export.json"
PHEMA_FOLDER = "phema"
BROKEN_FOLDER = "checkpoints_broken"
SUPERSEDED_FOLDER = "checkpoints_superseded"

# config → the abstract EMA params (shapes, dtypes and the shardings to restore onto).
AbstractEmaParams = Callable[[ml_collections.ConfigDict], Any]
_Read = TypeVar("_Read")


class CheckpointError(errors.JobError):
  """A checkpoint problem, said in one line: what is wrong, what is on disk and what to do."""


class _UnreadableStep(Exception):
  """A step whose files cannot be restored (the cause is chained)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` read: the train state, the data iterator's state, the config
  the checkpoint was written with, and its step."""

  state: train_step.TrainState
  data_state: dict
  config: ml_collections.ConfigDict
  step: int


@dataclasses.dataclass(frozen=True)
class EmaCheckpoint:
  """The EMA params of one checkpoint or export, its config and the step they come from."""

  params: Any
  config: ml_collections.ConfigDict
  step: int


# The operating system's causes a storage error may bury deep in a long message.
_OS_CAUSES = ("No space left on device", "Disk quota exceeded", "Permission denied",
              "Read-only file system")


def _describe(error: BaseException, limit: int = 300) -> str:
  """`Type: message` on one line, cut to `limit` characters (TensorStore's errors are long),
  with the operating system's cause appended where the cut lost it."""
  text, whole = errors.one_line(error, limit), errors.one_line(error)
  lost = [cause for cause in _OS_CAUSES if cause in whole and cause not in text]
  return f"{type(error).__name__}: {text}" + (f" [{lost[0]}]" if lost else "")


def _checkpoints_folder(workdir: str) -> str:
  return storage.join(workdir, "checkpoints")


def list_steps(workdir: str) -> list[int]:
  """The committed steps under WORKDIR/checkpoints, oldest first (none if it does not exist):
  locally Orbax names a step's folder by its number only once it is complete; in a bucket a
  step counts once its commit_success.txt is written."""
  directory = _checkpoints_folder(workdir)
  return sorted(int(name) for name in storage.listdir(directory) if name.isdigit()
                and ocp.step.is_path_finalized(storage.as_path(storage.join(directory, name))))


def _read_newest(workdir: str, step: int | None, read: Callable[[int], _Read],
                 broken: dict[int, BaseException]) -> _Read:
  """`read(step)`, or without `step` `read` of the newest step that reads (not in `broken`).

  `read` raises _UnreadableStep for a step whose files cannot be used: that step is logged,
  added to `broken` (left in place) and the next older one is tried. CheckpointError when there
  is no such step or none reads; any other error of `read` ends the search.
  """
  directory, steps = _checkpoints_folder(workdir), list_steps(workdir)
  if not steps:
    raise CheckpointError(f"no checkpoint in {workdir} (expected {directory}/STEP); train first "
                          f"or point --workdir at one")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint step {step} in {directory}; steps: {steps}")
    try:
      return read(step)
    except _UnreadableStep as error:
      raise CheckpointError(f"checkpoint step {step} in {directory} cannot be read "
                            f"({_describe(error.__cause__)})") from error
  for candidate in reversed(steps):
    if candidate in broken:
      continue
    try:
      return read(candidate)
    except _UnreadableStep as error:
      broken[candidate] = error.__cause__
      logging.warning("checkpoint step %d in %s cannot be read (%s); it is left as it is and "
                      "an older step is tried", candidate, directory, _describe(error.__cause__))
  newest = max(broken)
  raise CheckpointError(
      f"no readable checkpoint in {directory}: steps {sorted(broken)} all fail to restore "
      f"(step {newest}: {_describe(broken[newest])}). They are left as they are; restore a "
      f"copy or start a fresh --workdir.")


def _restore_args(directory: str, step: int, abstract_state) -> ocp.args.Composite:
  """What to restore of a step: the train item, the EMA params and, where training tracks
  post-hoc EMA profiles and the step holds them, their averages; onto `abstract_state`."""
  arrays = {"train": _train_item(abstract_state, _abstract_key_data(abstract_state.rng)),
            "ema_params": abstract_state.ema_params}
  if abstract_state.phema and storage.isdir(storage.join(directory, str(step), "phema")):
    arrays["phema"] = abstract_state.phema
  return ocp.args.Composite(**{name: ocp.args.StandardRestore(item)
                               for name, item in arrays.items()})


def _phema_of(arrays: dict, abstract_state, params) -> tuple:
  """The restored post-hoc EMA averages; where training tracks them but the checkpoint has none
  (written before it did), every profile starts at the restored params (said in the log)."""
  if "phema" in arrays or not abstract_state.phema:
    return tuple(arrays.get("phema", ()))
  logging.warning("the checkpoint holds no post-hoc EMA profiles: they start at its params")
  return tuple(params for _ in abstract_state.phema)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every element of every leaf of `tree` is finite, as one reduction."""
  finite = jnp.bool_(True)
  for leaf in jax.tree.leaves(tree):
    finite &= jnp.isfinite(leaf).all()
  return finite


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
class _Retention:
  """Orbax's preservation policy: keep a step until `max_to_keep` newer steps are known good
  (`good_steps`: written by this Checkpointer, whose Orbax deletes only after the new step has
  committed, or restored by it). Steps found on disk and never read count as unverified, so a
  broken newer step never pushes a good older one out."""

  max_to_keep: int | None
  good_steps: set[int] = dataclasses.field(default_factory=set)

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    if self.max_to_keep is None:
      return [True] * len(checkpoints)
    return [sum(newer > info.step for newer in self.good_steps) < self.max_to_keep
            for info in checkpoints]


@dataclasses.dataclass
class _SetAside:
  """Steps to move out of the way, unchanged, when training next saves: those `restore` found
  `broken` (to WORKDIR/checkpoints_broken/) and those newer than an explicitly restored step
  (`superseded`, to WORKDIR/checkpoints_superseded/), so that new steps can be written."""

  broken: dict[int, BaseException] = dataclasses.field(default_factory=dict)
  superseded: set[int] = dataclasses.field(default_factory=set)

  def move(self, workdir: str) -> set[int]:
    """Move them (process 0; every process waits); returns the steps moved."""
    folders = {**{step: SUPERSEDED_FOLDER for step in self.superseded},
               **{step: BROKEN_FOLDER for step in self.broken}}
    if folders and jax.process_index() == 0:
      for step, folder in sorted(folders.items()):
        target = storage.join(workdir, folder, str(step))
        copy = 1
        while storage.exists(target):
          target, copy = storage.join(workdir, folder, f"{step}-{copy}"), copy + 1
        try:
          storage.move(storage.join(_checkpoints_folder(workdir), str(step)), target)
        except Exception as error:  # OSError locally; each GCS client has its own errors
          raise CheckpointError(f"cannot move checkpoint step {step} to {target}: "
                                f"{getattr(error, 'strerror', None) or error}") from error
        logging.warning("moved checkpoint step %d to %s", step, target)
    if folders:
      _sync_processes("set_aside")
    self.broken.clear()
    self.superseded.clear()
    return set(folders)


def _marked_bad(manager: ocp.CheckpointManager, directory: str, step: int) -> bool:
  """Whether `step` carries the health mark {"good": false}, which jaxdiff before 2026-12
  wrote for states saved during a loss spike (steps without the mark are good)."""
  if not storage.isdir(storage.join(directory, str(step), "health")):
    return False
  return not manager.restore(step, args=ocp.args.Composite(
      health=ocp.args.JsonRestore()))["health"].get("good", False)


def _resume_advice(workdir: str, manager: ocp.CheckpointManager, unreadable,
                   below: int | None = None) -> str:
  """A sentence: the steps on disk, and the newest readable good one (below `below`) to resume
  from with --config.train.resume_step."""
  directory, steps = _checkpoints_folder(workdir), list_steps(workdir)
  good = None
  for step in reversed(steps):
    if (below is None or step < below) and step not in unreadable:
      try:
        if not _marked_bad(manager, directory, step):
          good = step
          break
      except Exception:  # an unreadable mark: not known good
        continue
  resume = (f"the last good step is {good}: resume from it with "
            f"--config.train.resume_step={good}" if good is not None else
            "no step is marked good: start a fresh --workdir")
  return f"On disk in {directory}: steps {steps}; {resume}."


@functools.cache
def _write_replicas_from_every_host_only_when_there_are_several() -> None:
  """Orbax's replica-parallel saving (its default off GPU) splits every replicated array into
  one slice per device, each cut by its own compiled program, so that several hosts share the
  writing. With one host it only costs: that host writes every byte either way, and cutting the
  slices compiled for 10 s at the first save of a small model on 8 CPU devices. Orbax keeps its
  type handlers in one process-wide registry, so this sets it there, once (after
  jax.distributed has started: the process count decides)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns of every override; this one is the point
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
        override=True)
  finally:
    logging.set_verbosity(verbosity)


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxdiff_checkpoint_{name}")


class Checkpointer:
  """Saves and restores TrainStates under WORKDIR/checkpoints with Orbax, asynchronously.
  Every process of a multi-host job makes the same calls. Usable as a context manager."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    if max_to_keep is not None and max_to_keep < 1:
      raise CheckpointError(f"max_to_keep must be at least 1 (or None: keep all), got "
                            f"{max_to_keep}")
    self.workdir = storage.resolve(workdir)
    self.directory = _checkpoints_folder(self.workdir)
    self._retention, self._set_aside = _Retention(max_to_keep), _SetAside()
    self._pending_step: int | None = None
    try:  # every process, so that all of them fail alike rather than wait for each other
      storage.check_writable(self.directory)
    except Exception as error:  # OSError locally; each GCS client has its own errors
      raise CheckpointError(f"cannot write checkpoints to {self.directory}: "
                            f"{getattr(error, 'strerror', None) or error}") from error
    _write_replicas_from_every_host_only_when_there_are_several()
    options = ocp.CheckpointManagerOptions(preservation_policy=self._retention,
                                           enable_async_checkpointing=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def save(self, step: int, state: train_step.TrainState, data_state: dict, config, *,
           wait: bool = False) -> None:
    """Start writing `state`, the data iterator's state and the config as `step`; training
    goes on while it is written. `wait`: return only once it is on disk (preemption, the end).
    A step that already exists is left as it is. CheckpointError, writing nothing, if the
    params or EMA params are not finite; and if this or the previous save failed (older steps
    stay)."""
    step = int(step)
    self.wait()
    if not bool(_all_finite((state.params, state.ema_params))):
      raise CheckpointError(
          f"refused to save checkpoint step {step}: its params or EMA params are not finite. "
          f"{_resume_advice(self.workdir, self._manager, self._set_aside.broken)}")
    moved = self._set_aside.move(self.workdir)
    if moved:
      self._retention.good_steps.difference_update(moved)
      self._manager.reload()
    if step not in list_steps(self.workdir):
      self._retention.good_steps.add(step)
      self._pending_step = step
      phema_item = {"phema": ocp.args.StandardSave(state.phema)} if state.phema else {}
      try:  # force: otherwise Orbax silently skips a step older than the newest on disk
        self._manager.save(step, force=True, args=ocp.args.Composite(
            train=ocp.args.StandardSave(_train_item(state, jax.random.key_data(state.rng))),
            ema_params=ocp.args.StandardSave(state.ema_params),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_io.config_to_json(config)), **phema_item))
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
    self._retention.good_steps.discard(step)
    self._manager.reload()
    raise CheckpointError(
        f"could not write checkpoint step {step} to {self.directory} ({_describe(error)}); "
        f"the earlier steps {list_steps(self.workdir)} are intact. Free disk space (the partial "
        f"{step}.orbax-checkpoint-tmp* folder can go) or fix permissions, then rerun to "
        f"resume.") from error

  def restore(self, abstract_state: train_step.TrainState, step: int | None = None, *,
              config=None) -> Restored:
    """The state, data state and saved config of `step`, or else of the newest readable step
    (the rules of the module doc), its arrays with the shardings of `abstract_state` whatever
    topology wrote them. With `config`, the checkpoint's config is checked first
    (config_io.ConfigMismatchError naming the fields that differ)."""
    self.wait()
    read = functools.partial(self._read_step, abstract_state, config)
    restored = _read_newest(self.workdir, step, read, self._set_aside.broken)
    self._retention.good_steps.add(restored.step)
    if step is not None:
      self._set_aside.superseded.update(s for s in list_steps(self.workdir) if s > step)
    return restored

  def _read_step(self, abstract_state: train_step.TrainState, config, step: int) -> Restored:
    def refusal(what: str) -> CheckpointError:
      advice = _resume_advice(self.workdir, self._manager, self._set_aside.broken, below=step)
      return CheckpointError(f"checkpoint step {step} {what} and is not resumed from. {advice}")

    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
      saved_config = config_io.config_from_json(saved["config"])
      marked_bad = _marked_bad(self._manager, self.directory, step)
    except Exception as error:  # whatever the cause, this step cannot be used
      raise _UnreadableStep() from error
    if config is not None:
      config_io.check_config_compatible(saved_config, config, self.workdir)
    if marked_bad:
      raise refusal("was saved marked bad (during a non-finite streak or a loss spike)")
    try:
      arrays = self._manager.restore(step, args=_restore_args(self.directory, step,
                                                              abstract_state))
    except Exception as error:  # whatever the cause, this step cannot be used
      raise _UnreadableStep() from error
    train = arrays["train"]
    if not bool(_all_finite((train["params"], arrays["ema_params"]))):
      raise refusal("holds non-finite params or EMA params")
    state = train_step.TrainState(
        step=train["step"], params=train["params"], ema_params=arrays["ema_params"],
        opt_state=train["opt_state"],
        rng=jax.random.wrap_key_data(train["rng"], impl=_key_impl(abstract_state.rng)),
        phema=_phema_of(arrays, abstract_state, train["params"]))
    return Restored(state=state, data_state=saved["data"], config=saved_config, step=step)

  def close(self) -> None:
    """Wait for the pending save, then release Orbax's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()


def load_ema(path: str, abstract_ema_params: AbstractEmaParams,
             step: int | None = None) -> EmaCheckpoint:
  """The EMA params, config and step of a training workdir's `step` (default: the newest step
  that reads) or of an export folder.

  Reads the EMA params and the config only (no optimizer state, no data), onto the shapes and
  shardings `abstract_ema_params(config)` gives.
  """
  path = storage.resolve(path)
  if not storage.isdir(path):
    raise CheckpointError(f"{path} does not exist (or is not a folder)")
  if storage.exists(storage.join(path, EXPORT_MARKER)):
    return _load_export(path, abstract_ema_params)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:

    def read(candidate: int) -> EmaCheckpoint:
      step_dir = storage.join(_checkpoints_folder(path), str(candidate))
      try:
        config = config_io.config_from_json(reader.restore(step_dir, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"])
        restored = reader.restore(step_dir, args=ocp.args.Composite(
            ema_params=ocp.args.StandardRestore(abstract_ema_params(config))))
      except Exception as error:  # whatever the cause, this step cannot be used
        raise _UnreadableStep() from error
      return EmaCheckpoint(params=restored["ema_params"], config=config, step=candidate)

    return _read_newest(path, step, read, broken={})


def _load_export(path: str, abstract_ema_params: AbstractEmaParams) -> EmaCheckpoint:
  try:
    config = config_io.config_from_json(json.loads(storage.read_text(
        storage.join(path, "config.json"))))
    step = json.loads(storage.read_text(storage.join(path, EXPORT_MARKER)))["step"]
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(storage.join(path, "ema_params"), abstract_ema_params(config))
  except Exception as error:  # whatever the cause, the export cannot be used
    raise CheckpointError(f"the export in {path} cannot be read ({_describe(error)})") from error
  return EmaCheckpoint(params=params, config=config, step=step)


def _refuse_existing(export_dir: str) -> None:
  if storage.exists(export_dir):
    raise CheckpointError(f"{storage.resolve(export_dir)} already exists; choose a new export "
                          f"folder")


def write_export(export_dir: str, params, config, source: dict) -> str:
  """A new export folder `export_dir` holding `params` as the EMA params, `config`, and in
  export.json `source` (where they came from: at least the "step"); written in one piece
  (`storage.staged`). One process only."""
  export_dir = storage.resolve(export_dir)
  _refuse_existing(export_dir)
  parent = os.path.dirname(export_dir)
  try:
    storage.check_writable(parent)
  except Exception as error:  # OSError locally; each GCS client has its own errors
    raise CheckpointError(f"cannot write to {parent}: "
                          f"{getattr(error, 'strerror', None) or error}") from error
  _write_replicas_from_every_host_only_when_there_are_several()
  try:
    with storage.staged(export_dir) as staging:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(storage.join(staging, "ema_params"), params)
        checkpointer.wait_until_finished()
      storage.write_text(storage.join(staging, "config.json"), config.to_json_best_effort(indent=2))
      storage.write_text(storage.join(staging, EXPORT_MARKER), json.dumps(source, indent=2))
  except Exception as error:  # OSError locally; each GCS client has its own errors
    raise CheckpointError(
        f"could not write the export {export_dir} ({_describe(error)})") from error
  return export_dir


def export_ema(workdir: str, export_dir: str, abstract_ema_params: AbstractEmaParams,
               step: int | None = None) -> str:
  """Write the EMA params of `workdir`'s newest readable step (or `step`) and their config to a
  new folder `export_dir` (`write_export`), all sampling needs; returns its path. One process
  only. `abstract_ema_params`: as for `load_ema` (one device is enough)."""
  _refuse_existing(export_dir)
  ema = load_ema(workdir, abstract_ema_params, step)
  return write_export(export_dir, ema.params, ema.config,
                      {"step": ema.step, "workdir": storage.resolve(workdir)})


class PhemaSnapshots:
  """The post-hoc EMA profiles' snapshots of a workdir: WORKDIR/phema/STEP/ holds the averages
  of every tracked profile at that step and their σ_rel (Orbax, written asynchronously, in a
  bucket too), kept all (`max_to_keep` None) or the newest `max_to_keep`. Every process of a
  multi-host job makes the same calls. Usable as a context manager."""

  def __init__(self, workdir: str, max_to_keep: int | None = None):
    self.directory = storage.join(storage.resolve(workdir), PHEMA_FOLDER)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("averages", "profiles"))

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, averages: tuple, sigma_rels) -> None:
    """Start writing the averages at `step` (a step already there is left as it is)."""
    if step not in self.steps():
      self._manager.save(step, args=ocp.args.Composite(
          averages=ocp.args.StandardSave(tuple(averages)),
          profiles=ocp.args.JsonSave({"sigma_rels": list(sigma_rels)})))

  def read(self, step: int, abstract_averages) -> tuple[tuple, list[float]]:
    """(the averages of `step` onto `abstract_averages`, their σ_rel)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        averages=ocp.args.StandardRestore(tuple(abstract_averages)),
        profiles=ocp.args.JsonRestore()))
    return tuple(restored["averages"]), restored["profiles"]["sigma_rels"]

  def close(self) -> None:
    """Wait for the pending write, then release Orbax's threads."""
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()
