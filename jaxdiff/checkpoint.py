"""Orbax checkpoints of the whole train state, restorable on any topology.

A checkpoint is WORKDIR/checkpoints/STEP/ with four items:
  train       step, params, optimizer state and RNG key (as key data)
  ema_params  the EMA params alone, so sampling reads nothing else
  data        the input iterator's state (JSON)
  config      the resolved config (JSON)

Rules that keep the product of training safe:
  * a step that exists is never overwritten;
  * a step that cannot be restored is reported by number and moved aside to
    checkpoints/broken_STEP (never deleted), and the newest good step is used instead;
  * old steps are pruned (beyond `max_to_keep`) by Orbax only after a newer save has committed.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from jaxdiff import parallel, training

# Fields that fix parameter shapes or the meaning of what the network learned; a config that
# differs from its checkpoint in any of them cannot continue it.
_MODEL_FIELDS_FREE_TO_CHANGE = ("dropout", "remat", "dtype")
_OTHER_FIXED_FIELDS = ("data.image_size", "data.num_channels", "diffusion.schedule",
                       "diffusion.num_timesteps", "diffusion.prediction")


class CheckpointError(Exception):
  """A checkpoint problem, said in one line: what was wrong and what to do."""


def _as_tuples(value):
  """JSON lists back to the tuples configs use (`ch_mult`, `attn_resolutions`)."""
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def config_from_json(config_dict: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_as_tuples(config_dict))


def _config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _lookup(config_dict: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(config_dict, dict) or part not in config_dict:
      return None
    config_dict = config_dict[part]
  return config_dict


def check_config_compatible(saved_config, config, where: str) -> None:
  """Raise CheckpointError naming every field in which `config` cannot continue `saved_config`."""
  saved, current = _config_to_json(saved_config), _config_to_json(config)
  model_fields = sorted(set(saved.get("model", {})) | set(current.get("model", {})))
  fields = [f"model.{name}" for name in model_fields
            if name not in _MODEL_FIELDS_FREE_TO_CHANGE] + list(_OTHER_FIXED_FIELDS)
  differences = [f"{field} {_lookup(current, field)!r} (config) vs "
                 f"{_lookup(saved, field)!r} (checkpoint)"
                 for field in fields if _lookup(current, field) != _lookup(saved, field)]
  if differences:
    raise CheckpointError(
        f"the config does not match the checkpoint in {where}: {'; '.join(differences)}. "
        f"Use the checkpoint's config (its config.json) or a fresh --workdir.")


def abstract_train_state(config, model, mesh) -> training.TrainState:
  """The TrainState's shapes and dtypes, replicated over `mesh`: the target a restore fills."""
  shapes = jax.eval_shape(lambda key: training.init_state(config, model, key), jax.random.key(0))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _train_item(state: training.TrainState, rng_data=None) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": jax.random.key_data(state.rng) if rng_data is None else rng_data}


def _abstract_train_item(abstract_state: training.TrainState) -> dict:
  key_data = jax.eval_shape(jax.random.key_data, abstract_state.rng)
  rng = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=abstract_state.rng.sharding)
  return _train_item(abstract_state, rng_data=rng)


class Checkpointer:
  """Saves and restores TrainStates under WORKDIR/checkpoints with Orbax (asynchronously)."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_names=("train", "ema_params", "data", "config"))
    except OSError as error:
      raise CheckpointError(f"cannot write checkpoints to {self.directory}: {error}") from error

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step on disk (not yet checked: `restore` falls back past broken ones)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: training.TrainState, data_state: dict, config, *,
           wait: bool = False) -> None:
    """Start writing `state` at `step` (skipped if that step exists); `wait` blocks until it is
    committed to disk."""
    step = int(step)
    try:
      if step not in self.all_steps():
        self._manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave(_train_item(state)),
            ema_params=ocp.args.StandardSave(state.ema_params),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(_config_to_json(config))))
      if wait:
        self._manager.wait_until_finished()
    except (OSError, ValueError) as error:
      raise CheckpointError(
          f"could not save step {step} in {self.directory}: {error}. Earlier checkpoints are "
          f"untouched; free disk space or fix permissions, then resume.") from error

  def restore(self, abstract_state: training.TrainState, config=None, step: int | None = None):
    """(state, data_state, saved config) from `step` or the newest good step.

    The arrays land with the shardings in `abstract_state`, whatever topology wrote them. With
    `config`, first check it can continue the checkpoint (CheckpointError naming the fields).
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    for candidate in steps:
      try:
        saved = self._manager.restore(candidate, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
      except Exception as error:  # noqa: BLE001 — any failure means this step is unreadable
        self._set_aside(candidate, error)
        continue
      saved_config = config_from_json(saved["config"])
      if config is not None:
        check_config_compatible(saved_config, config, self.directory)
      try:
        arrays = self._manager.restore(candidate, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(_abstract_train_item(abstract_state)),
            ema_params=ocp.args.StandardRestore(abstract_state.ema_params)))
      except Exception as error:  # noqa: BLE001
        self._set_aside(candidate, error)
        continue
      train = arrays["train"]
      state = training.TrainState(
          step=train["step"], params=train["params"], ema_params=arrays["ema_params"],
          opt_state=train["opt_state"], rng=jax.random.wrap_key_data(train["rng"]))
      return state, saved["data"], saved_config
    raise CheckpointError(
        f"no readable checkpoint in {self.directory}: every step was broken (set aside as "
        f"broken_STEP); start a fresh --workdir or restore a copy")

  def _set_aside(self, step: int, error: Exception) -> None:
    """Report a step that cannot be restored and move it out of Orbax's sight, undeleted."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, f"broken_{step}")
    logging.warning("checkpoint step %d in %s is broken (%s: %s); moved to %s, using an older "
                    "step", step, self.directory, type(error).__name__, error, target)
    print(f"warning: checkpoint step {step} is broken ({type(error).__name__}); moved to "
          f"{target}; resuming from an older step")
    if jax.process_index() == 0 and os.path.isdir(source):
      os.rename(source, target)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _checkpoint_steps(directory: str) -> list[int]:
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_for_sampling(path: str, step: int | None = None, mesh=None):
  """(EMA params, config, step) from a workdir or an export, replicated over `mesh` (default:
  every local device). Reads only the EMA params and the config: no optimizer state, no data."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} does not exist")
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  if os.path.exists(os.path.join(path, "export_config.json")):
    with open(os.path.join(path, "export_config.json")) as f:
      config = config_from_json(json.load(f))
    ema_dir, found_step = os.path.join(path, "ema_params"), config.get("exported_step")
    return _restore_ema(ema_dir, config, mesh), config, found_step
  directory = os.path.join(path, "checkpoints")
  steps = _checkpoint_steps(directory) if os.path.isdir(directory) else []
  if not steps:
    raise CheckpointError(f"no checkpoint in {path} (expected {directory}/STEP); train first "
                          f"or point --workdir at a training workdir or an export")
  candidates = [step] if step is not None else steps[::-1]
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint step {step} in {directory}; steps there: {steps}")
  for candidate in candidates:
    step_dir = os.path.join(directory, str(candidate))
    try:
      with open(os.path.join(step_dir, "config", "metadata")) as f:
        config = config_from_json(json.load(f))
      return _restore_ema(os.path.join(step_dir, "ema_params"), config, mesh), config, candidate
    except Exception as error:  # noqa: BLE001 — report and try an older step
      print(f"warning: checkpoint step {candidate} in {directory} is broken "
            f"({type(error).__name__}: {error}); trying an older step")
  raise CheckpointError(f"no readable checkpoint in {directory}")


def _restore_ema(ema_dir: str, config, mesh):
  model = training.create_model(config)
  abstract = abstract_train_state(config, model, mesh).ema_params
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(ema_dir, abstract)


def export_ema(workdir: str, export_dir: str, step: int | None = None) -> str:
  """Write the EMA params alone (EXPORT/ema_params) and their config (EXPORT/export_config.json):
  everything `sample.py` needs, a fraction of a full checkpoint's size."""
  ema_params, config, found_step = load_for_sampling(workdir, step)
  export_dir = os.path.abspath(os.path.expanduser(export_dir))
  if os.path.exists(export_dir):
    raise CheckpointError(f"{export_dir} already exists; choose a new export folder")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(export_dir, "ema_params"), ema_params)
  config.exported_step = found_step
  with open(os.path.join(export_dir, "export_config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return export_dir
