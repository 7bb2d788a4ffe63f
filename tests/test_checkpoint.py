"""Checkpoints: bit-exact round trips across topologies, broken steps, mismatched configs."""

import functools
import os

import jax
import numpy as np
import pytest

from jaxdiff import checkpoint, parallel, training
from test_training import tiny_config

CONFIG = tiny_config()
MODEL = training.create_model(CONFIG)


@functools.cache
def initial_state(num_devices):
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  init = jax.jit(functools.partial(training.init_state, CONFIG, MODEL),
                 out_shardings=parallel.replicated(mesh))
  state = init(jax.random.key(7))
  # Make EMA, optimizer state and params differ, so a mix-up between them is caught.
  return state.replace(step=state.step + 3,
                       ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params),
                       opt_state=jax.tree.map(lambda x: x + 2 if x.dtype.kind == "f" else x,
                                              state.opt_state))


def host_leaves(state):
  return jax.tree.leaves(jax.device_get(state.replace(rng=jax.random.key_data(state.rng))))


def assert_same_state(a, b):
  for x, y in zip(host_leaves(a), host_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def abstract(num_devices):
  return checkpoint.abstract_train_state(CONFIG, MODEL,
                                         parallel.make_mesh(jax.devices()[:num_devices]))


@pytest.mark.parametrize("save_devices, restore_devices", [(4, 1), (1, 4)])
def test_round_trip_across_topologies_is_bit_exact(tmp_path, save_devices, restore_devices):
  state = initial_state(save_devices)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {"batches_yielded": 3}, CONFIG)  # asynchronous
    checkpointer.wait()
    restored, data_state, saved_config = checkpointer.restore(abstract(restore_devices), CONFIG)
  assert_same_state(restored, state)
  assert data_state == {"batches_yielded": 3}
  assert saved_config == CONFIG
  for leaf in jax.tree.leaves(restored.params):
    assert leaf.sharding.mesh.devices.size == restore_devices


def test_existing_step_is_never_overwritten(tmp_path):
  state = initial_state(1)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {"n": 1}, CONFIG, wait=True)
    checkpointer.save(3, state.replace(params=state.ema_params), {"n": 2}, CONFIG, wait=True)
    restored, data_state, _ = checkpointer.restore(abstract(1))
  assert data_state == {"n": 1}
  assert_same_state(restored, state)


def corrupt(step_dir):
  """Damage every data file of the params item, as a failing disk would."""
  for root, _, files in os.walk(os.path.join(step_dir, "train")):
    for name in files:
      if "ocdbt" in root or name == "_METADATA":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\0garbage")


def test_broken_newest_step_falls_back_and_is_kept_aside(tmp_path, capsys):
  state = initial_state(1)
  newer = state.replace(step=state.step + 1)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as checkpointer:
    checkpointer.save(3, state, {"n": 3}, CONFIG, wait=True)
    checkpointer.save(4, newer, {"n": 4}, CONFIG, wait=True)
  corrupt(tmp_path / "checkpoints" / "4")
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as checkpointer:
    restored, data_state, _ = checkpointer.restore(abstract(1))
    assert data_state == {"n": 3}
    assert_same_state(restored, state)
    assert "step 4 is broken" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "broken_4").is_dir()  # kept for inspection
    # Training goes on and saves step 4 afresh; the good step 3 is still there.
    checkpointer.save(4, newer, {"n": 4}, CONFIG, wait=True)
    assert checkpointer.all_steps() == [3, 4]


def test_every_step_broken_is_a_clear_error(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, initial_state(1), {}, CONFIG, wait=True)
  corrupt(tmp_path / "checkpoints" / "3")
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
      checkpointer.restore(abstract(1))


def test_config_mismatch_names_the_fields(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, initial_state(1), {}, CONFIG, wait=True)
    other = tiny_config()
    other.model.ch = 32
    other.data.image_size = 16
    other.model.dropout = 0.3  # free to change between runs
    with pytest.raises(checkpoint.CheckpointError) as error:
      checkpointer.restore(abstract(1), other)
  message = str(error.value)
  assert "model.ch 32 (config) vs 16 (checkpoint)" in message
  assert "data.image_size 16 (config) vs 8 (checkpoint)" in message
  assert "dropout" not in message


def test_sampling_reads_only_the_ema_params(tmp_path):
  state = initial_state(4)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {}, CONFIG, wait=True)
  # Without the optimizer state and params on disk, loading for sampling still works.
  corrupt(tmp_path / "checkpoints" / "3")
  ema_params, config, step = checkpoint.load_for_sampling(
      str(tmp_path), mesh=parallel.make_mesh(jax.devices()[:1]))
  assert step == 3 and config == CONFIG
  for x, y in zip(jax.tree.leaves(ema_params), jax.tree.leaves(state.ema_params), strict=True):
    np.testing.assert_array_equal(x, y)


def test_export_holds_the_ema_params_and_config(tmp_path):
  state = initial_state(1)
  with checkpoint.Checkpointer(str(tmp_path / "work")) as checkpointer:
    checkpointer.save(3, state, {}, CONFIG, wait=True)
  checkpoint.export_ema(str(tmp_path / "work"), str(tmp_path / "export"))
  ema_params, config, step = checkpoint.load_for_sampling(str(tmp_path / "export"))
  assert step == 3 and config.model == CONFIG.model
  for x, y in zip(jax.tree.leaves(ema_params), jax.tree.leaves(state.ema_params), strict=True):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(checkpoint.CheckpointError, match="already exists"):
    checkpoint.export_ema(str(tmp_path / "work"), str(tmp_path / "export"))


def test_missing_and_empty_workdirs_and_unwritable_paths(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_for_sampling(str(tmp_path / "nowhere"))
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
    checkpoint.load_for_sampling(str(tmp_path))
  (tmp_path / "file.txt").write_text("not a folder")
  with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoints"):
    checkpoint.Checkpointer(str(tmp_path / "file.txt" / "workdir"))
