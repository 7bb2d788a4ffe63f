"""Checkpoints: bit-exact round trips across topologies, broken steps, clean-up that keeps good
steps, non-finite states and steps older versions marked bad, mismatched configs, failed writes,
sampling restores and exports."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxdiff import checkpoint, config_io, denoiser, errors, parallel, train_step
from jaxdiff.jobs import workdir


def small_config():
  config = default.get_config()
  config.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
  config.diffusion.num_timesteps = 100
  return config


CONFIG = small_config()
DENOISER = denoiser.from_config(CONFIG)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_of(num_devices):
  return parallel.make_mesh(jax.devices()[:num_devices])


def make_state(num_devices, seed=7):
  """A state whose params, EMA params and optimizer state all differ, so a mix-up shows."""
  init = jax.jit(functools.partial(train_step.init_state, DENOISER, CONFIG.train),
                 out_shardings=parallel.replicated(mesh_of(num_devices)))
  state = init(jax.random.key(seed))
  return state.replace(
      step=state.step + 3,
      ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params),
      opt_state=jax.tree.map(lambda x: x + 2 if x.dtype.kind == "f" else x + 5, state.opt_state))


saved_state = functools.cache(make_state)


def host_leaves(state):
  return jax.tree.leaves(jax.device_get(state.replace(rng=jax.random.key_data(state.rng))))


def assert_same_state(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for x, y in zip(host_leaves(actual), host_leaves(expected), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def assert_same_tree(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(x, y)


def abstract(num_devices):
  return train_step.abstract_state(DENOISER, CONFIG.train, mesh_of(num_devices))


def ema_shapes(num_devices):
  mesh = mesh_of(num_devices)
  return lambda config: workdir.abstract_params(config, mesh)


def files_under(path):
  """{relative path: bytes} of every file under `path`."""
  contents = {}
  for root, _, names in os.walk(path):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        contents[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return contents


def damage(step_dir, item="train"):
  """Truncate every file of one item of a step to half its length, as a failing disk might."""
  for relative_path, content in files_under(os.path.join(step_dir, item)).items():
    with open(os.path.join(step_dir, item, relative_path), "wb") as f:
      f.write(content[:len(content) // 2])


def test_async_save_is_bit_exact_even_if_training_reuses_the_buffers(tmp_path):
  state = make_state(1)
  expected = jax.device_get(state.replace(rng=jax.random.key_data(state.rng)))
  # What the trainer does right after an asynchronous save: a step that donates the state's
  # buffers (on CPU, JAX copies instead while the save still references them).
  next_step = jax.jit(lambda s: s.replace(step=s.step + 1,
                                          params=jax.tree.map(lambda x: x * 2, s.params)),
                      donate_argnums=0)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {"next_batch": 3, "seed": 0}, CONFIG)
    next_step(state)
    checkpointer.wait()
    restored = checkpointer.restore(abstract(1))
  rng_data = jax.random.key_data(restored.state.rng)
  assert_same_tree(jax.device_get(restored.state.replace(rng=rng_data)), expected)
  assert restored.state.rng.dtype == state.rng.dtype  # a typed key again
  assert restored.data_state == {"next_batch": 3, "seed": 0} and restored.step == 3
  assert restored.config == CONFIG and restored.config.model.ch_mult == (1, 2)


@pytest.mark.parametrize("save_devices, restore_devices", [(4, 1), (1, 4)])
def test_a_checkpoint_restores_onto_another_topology(tmp_path, save_devices, restore_devices):
  state = saved_state(save_devices)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {}, CONFIG, wait=True)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    restored = checkpointer.restore(abstract(restore_devices), config=CONFIG).state
  assert_same_state(restored, state)
  expected_sharding = parallel.replicated(mesh_of(restore_devices))
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == expected_sharding


def test_an_existing_step_is_never_overwritten(tmp_path):
  state = saved_state(1)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {"n": 1}, CONFIG, wait=True)
    checkpointer.save(3, state.replace(params=state.ema_params), {"n": 2}, CONFIG, wait=True)
    restored = checkpointer.restore(abstract(1))
    assert checkpoint.list_steps(str(tmp_path)) == [3]
  assert restored.data_state == {"n": 1}
  assert_same_state(restored.state, state)


@pytest.mark.slow
def test_a_broken_newest_step_is_reported_left_in_place_and_skipped(tmp_path, caplog):
  older, newer = saved_state(1), saved_state(1, seed=8)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as checkpointer:
    checkpointer.save(1, older, {"n": 1}, CONFIG)
    checkpointer.save(2, newer, {"n": 2}, CONFIG, wait=True)
  step_2 = tmp_path / "checkpoints" / "2"
  damage(step_2)
  damaged = files_under(step_2)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as checkpointer:
    restored = checkpointer.restore(abstract(1))
    assert restored.data_state == {"n": 1} and restored.step == 1
    assert_same_state(restored.state, older)
    assert "checkpoint step 2" in caplog.text and "cannot be read" in caplog.text
    assert files_under(step_2) == damaged  # untouched, for the user to inspect
    # Training goes on from step 1 and saves step 2 afresh: the broken one is moved aside.
    checkpointer.save(2, newer, {"n": 2}, CONFIG, wait=True)
    assert checkpoint.list_steps(str(tmp_path)) == [1, 2]
    assert files_under(tmp_path / "checkpoints_broken" / "2") == damaged
    restored = checkpointer.restore(abstract(1))
  assert restored.data_state == {"n": 2} and restored.step == 2
  assert_same_state(restored.state, newer)


def test_every_step_broken_is_a_clear_error(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, saved_state(1), {}, CONFIG, wait=True)
  damage(tmp_path / "checkpoints" / "3", "ema_params")
  before = files_under(tmp_path)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint .*steps \[3\]"):
      checkpointer.restore(abstract(1))
    with pytest.raises(checkpoint.CheckpointError, match="step 3 .* cannot be read"):
      checkpointer.restore(abstract(1), step=3)
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint .*steps \[3\]"):
    checkpoint.load_ema(str(tmp_path), ema_shapes(1))
  assert files_under(tmp_path) == before


@pytest.mark.slow
def test_clean_up_never_removes_a_good_step_for_an_unverified_newer_one(tmp_path):
  state = saved_state(1)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as checkpointer:
    for step in (1, 2, 3):
      checkpointer.save(step, state, {"n": step}, CONFIG)
  damage(tmp_path / "checkpoints" / "3")
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as checkpointer:
    checkpointer.save(4, state, {"n": 4}, CONFIG, wait=True)
    # Keeping the newest two (3 and 4) would leave one good step: 1, 2 and 3 stay.
    assert checkpoint.list_steps(str(tmp_path)) == [1, 2, 3, 4]
    checkpointer.save(5, state, {"n": 5}, CONFIG, wait=True)
    assert checkpoint.list_steps(str(tmp_path)) == [4, 5]  # two good steps newer than the rest


@pytest.mark.slow
def test_clean_up_after_falling_back_keeps_max_to_keep_good_steps(tmp_path):
  state = saved_state(1)
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=3) as checkpointer:
    for step in (1, 2, 3):
      checkpointer.save(step, state, {"n": step}, CONFIG)
  damage(tmp_path / "checkpoints" / "3")
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as checkpointer:
    assert checkpointer.restore(abstract(1)).data_state == {"n": 2}
    checkpointer.save(4, state, {"n": 4}, CONFIG, wait=True)
    assert checkpoint.list_steps(str(tmp_path)) == [2, 4]
  assert os.listdir(tmp_path / "checkpoints_broken") == ["3"]


@pytest.mark.slow
def test_half_written_steps_are_ignored(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, saved_state(1), {"n": 3}, CONFIG, wait=True)
  # What a save cut off by preemption leaves: Orbax's temporary folder, never renamed.
  half_written = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
  (half_written / "train").mkdir(parents=True)
  (half_written / "train" / "_METADATA").write_bytes(b"{")
  assert checkpoint.load_ema(str(tmp_path), ema_shapes(1)).step == 3
  assert checkpoint.list_steps(str(tmp_path)) == [3]
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    assert checkpointer.restore(abstract(1)).data_state == {"n": 3}
    checkpointer.save(5, saved_state(1), {"n": 5}, CONFIG, wait=True)
    assert checkpoint.list_steps(str(tmp_path)) == [3, 5]
  assert half_written.is_dir()  # left alone: another process might still be writing it


def test_a_config_that_does_not_match_is_a_usage_error_naming_the_fields(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, saved_state(1), {}, CONFIG, wait=True)
    other = small_config()
    other.model.ch = 16
    with pytest.raises(config_io.ConfigMismatchError) as error:
      checkpointer.restore(abstract(1), config=other)
    compatible = small_config()
    compatible.model.update(dropout=0.3, remat=True, dtype="bfloat16")
    compatible.train.update(learning_rate=1.0, batch_size=8)
    assert checkpointer.restore(abstract(1), config=compatible).config == CONFIG
  assert isinstance(error.value, ValueError)  # the training job reports it as a UsageError
  message = str(error.value)
  assert "model.ch 16 (config) vs 8 (checkpoint)" in message
  assert str(tmp_path) in message and "\n" not in message


def test_sampling_reads_only_the_ema_params_and_config(tmp_path):
  state = saved_state(4)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {}, CONFIG, wait=True)
  step_dir = tmp_path / "checkpoints" / "3"
  for item in ("train", "data"):  # no params, optimizer state, RNG key, data position
    for relative_path in files_under(step_dir / item):
      os.remove(step_dir / item / relative_path)
  ema = checkpoint.load_ema(str(tmp_path), ema_shapes(1))
  assert ema.step == 3 and ema.config == CONFIG
  assert_same_tree(ema.params, jax.device_get(state.ema_params))
  assert all(leaf.sharding == parallel.replicated(mesh_of(1))
             for leaf in jax.tree.leaves(ema.params))
  trained = workdir.load_model(str(tmp_path), mesh=mesh_of(2))
  assert trained.step == 3 and trained.config == CONFIG
  assert trained.denoiser.process.num_timesteps == CONFIG.diffusion.num_timesteps
  assert_same_tree(trained.params, jax.device_get(state.ema_params))
  assert all(leaf.sharding == parallel.replicated(mesh_of(2))
             for leaf in jax.tree.leaves(trained.params))


def test_an_export_holds_the_ema_params_and_config(tmp_path):
  state = saved_state(1)
  with checkpoint.Checkpointer(str(tmp_path / "work")) as checkpointer:
    checkpointer.save(3, state, {}, CONFIG)
    checkpointer.save(4, state.replace(ema_params=state.params), {}, CONFIG)
  export = workdir.export_ema(str(tmp_path / "work"), str(tmp_path / "export"), step=3)
  assert sorted(os.listdir(export)) == ["config.json", "ema_params", "export.json"]
  ema = checkpoint.load_ema(export, ema_shapes(2))
  assert ema.step == 3 and ema.config == CONFIG
  assert_same_tree(ema.params, jax.device_get(state.ema_params))
  assert workdir.load_model(export, mesh=mesh_of(1)).step == 3
  with pytest.raises(checkpoint.CheckpointError, match="already exists"):
    workdir.export_ema(str(tmp_path / "work"), export)


def test_missing_or_empty_workdirs_are_one_line_errors(tmp_path):
  for load in (lambda path: checkpoint.load_ema(path, ema_shapes(1)),
               lambda path: workdir.export_ema(path, str(tmp_path / "export"))):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist") as error:
      load(str(tmp_path / "nowhere"))
    assert "\n" not in str(error.value)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in") as error:
      load(str(tmp_path))
    assert "\n" not in str(error.value)
  assert checkpoint.list_steps(str(tmp_path / "nowhere")) == []
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    assert checkpoint.list_steps(str(tmp_path)) == []
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
      checkpointer.restore(abstract(1))
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, saved_state(1), {}, CONFIG, wait=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint step 5 .*\[3\]"):
      checkpointer.restore(abstract(1), step=5)
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint step 5 .*\[3\]"):
    checkpoint.load_ema(str(tmp_path), ema_shapes(1), step=5)


def test_checkpoint_errors_are_job_errors():
  assert issubclass(checkpoint.CheckpointError, errors.JobError)


def test_a_workdir_under_a_file_is_a_clear_error(tmp_path):
  (tmp_path / "file.txt").write_text("not a folder")
  with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoints to .*file.txt"):
    checkpoint.Checkpointer(str(tmp_path / "file.txt" / "workdir"))


def test_a_checkpoints_folder_that_takes_no_files_is_a_clear_error(tmp_path):
  # /proc/self is a folder no one can create files in, root included.
  (tmp_path / "checkpoints").symlink_to("/proc/self")
  with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoints to .*checkpoints"):
    checkpoint.Checkpointer(str(tmp_path))


def test_a_non_finite_state_is_never_saved(tmp_path):
  state = saved_state(1)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(3, state, {}, CONFIG, wait=True)
    for poisoned in (
        state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                          state.params)),
        state.replace(ema_params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf),
                                              state.ema_params))):
      with pytest.raises(checkpoint.CheckpointError) as error:
        checkpointer.save(4, poisoned, {}, CONFIG, wait=True)
      assert str(error.value) == (
          f"refused to save checkpoint step 4: its params or EMA params are not finite. "
          f"On disk in {tmp_path}/checkpoints: steps [3]; the last good step is 3: resume from "
          f"it with --config.train.resume_step=3.")
      assert checkpoint.list_steps(str(tmp_path)) == [3]


def mark_bad(step_dir):
  """The health item jaxdiff wrote before 2026-12 for a state saved during a loss spike."""
  os.makedirs(step_dir / "health")
  (step_dir / "health" / "metadata").write_text('{"good": false}')
  (step_dir / "health" / "commit_success.txt").write_text("")


def test_a_step_marked_bad_by_older_versions_is_refused_naming_the_last_good_one(tmp_path):
  state = tiny_state()
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=None) as checkpointer:
    for step in (1, 2, 3):
      checkpointer.save(step, state, {"n": step}, CONFIG, wait=True)
  for step in (2, 3):
    mark_bad(tmp_path / "checkpoints" / str(step))
  before = files_under(tmp_path)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    for step in (None, 3, 2):
      with pytest.raises(checkpoint.CheckpointError) as error:
        checkpointer.restore(tiny_abstract_state(), step=step)
      saved = step or 3
      assert str(error.value) == (
          f"checkpoint step {saved} was saved marked bad (during a non-finite streak or a loss "
          f"spike) and is not resumed from. On disk in {tmp_path}/checkpoints: steps [1, 2, 3]; "
          f"the last good step is 1: resume from it with --config.train.resume_step=1.")
    restored = checkpointer.restore(tiny_abstract_state(), step=1)
    assert restored.step == 1 and restored.data_state == {"n": 1}
    assert_same_state(restored.state, state)
    assert files_under(tmp_path) == before
    # Training goes on from step 1: the steps after it move aside and step 2 is written afresh.
    checkpointer.save(2, state, {"n": 22}, CONFIG, wait=True)
  assert checkpoint.list_steps(str(tmp_path)) == [1, 2]
  assert sorted(os.listdir(tmp_path / "checkpoints_superseded")) == ["2", "3"]
  assert files_under(tmp_path / "checkpoints_superseded" / "3") == {
      path[len("checkpoints/3/"):]: content for path, content in before.items()
      if path.startswith("checkpoints/3/")}
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    assert checkpointer.restore(tiny_abstract_state()).data_state == {"n": 22}


def test_checkpoints_without_health_marks_restore_unless_non_finite(tmp_path, monkeypatch):
  state = tiny_state()
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint, "_all_finite", lambda tree: True)  # older versions did not check
    with checkpoint.Checkpointer(str(tmp_path), max_to_keep=None) as checkpointer:
      for step, params in ((1, state.params), (2, {"w": state.params["w"] + 1}),
                           (3, {"w": state.params["w"] * jnp.nan})):
        checkpointer.save(step, state.replace(params=params), {"n": step}, CONFIG, wait=True)
  with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
    with pytest.raises(checkpoint.CheckpointError) as error:
      checkpointer.restore(tiny_abstract_state())
    assert str(error.value) == (
        f"checkpoint step 3 holds non-finite params or EMA params and is not resumed from. "
        f"On disk in {tmp_path}/checkpoints: steps [1, 2, 3]; the last good step is 2: resume "
        f"from it with --config.train.resume_step=2.")
    for step in (2, 1):
      restored = checkpointer.restore(tiny_abstract_state(), step=step)
      assert restored.step == step and restored.data_state == {"n": step}
      np.testing.assert_array_equal(restored.state.params["w"], np.arange(4.0) + step - 1)


def tiny_state():
  """A TrainState of a few numbers: nothing to compile, for a quick process of its own."""
  return train_step.TrainState(
      step=jnp.int32(1), params={"w": jnp.arange(4.0)}, ema_params={"w": jnp.arange(4.0) + 1},
      opt_state={"count": jnp.int32(1)}, rng=jax.random.key(1))


def tiny_abstract_state():
  sharding = parallel.replicated(mesh_of(1))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(tiny_state))


# Runs in its own process, as in training: the failed write's leftover Orbax threads end with it.
FAILED_WRITE_SCRIPT = """
import resource, signal, sys
from jaxdiff import checkpoint
from tests.test_checkpoint import CONFIG, tiny_state
checkpointer = checkpoint.Checkpointer(sys.argv[1], max_to_keep=1)
checkpointer.save(1, tiny_state(), {"n": 1}, CONFIG, wait=True)
# Writes past 200 bytes now fail with EFBIG, as they would on a full disk (root included).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
  checkpointer.save(2, tiny_state(), {"n": 2}, CONFIG)
  checkpointer.wait()
except checkpoint.CheckpointError as error:
  print("CheckpointError:", error)
"""


@pytest.mark.slow
def test_a_failed_write_is_a_clear_error_and_keeps_the_earlier_steps(tmp_path):
  result = subprocess.run([sys.executable, "-c", FAILED_WRITE_SCRIPT, str(tmp_path)], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  message = result.stdout.strip()
  assert re.fullmatch(r"CheckpointError: could not write checkpoint step 2 .*File too large.*"
                      r"the earlier steps \[1\] are intact\. Free disk space.*", message), message
  assert checkpoint.list_steps(str(tmp_path)) == [1]
  with checkpoint.Checkpointer(str(tmp_path), max_to_keep=1) as checkpointer:
    restored = checkpointer.restore(tiny_abstract_state())
  assert restored.data_state == {"n": 1}
  assert_same_state(restored.state, tiny_state())


def test_a_long_storage_error_keeps_the_operating_systems_cause():
  """TensorStore's RESOURCE_EXHAUSTED messages run to hundreds of characters before the cause."""
  error = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/checkpoints/4.orbax-"
                     "checkpoint-tmp/train/_sharding\": " + "x" * 400 + " [OS error: No space left "
                     "on device]")
  describe = checkpoint._describe  # pylint: disable=protected-access
  described = describe(error)
  assert described.startswith("ValueError: RESOURCE_EXHAUSTED: Error writing local file")
  assert described.endswith(" ... [No space left on device]") and len(described) < 400
  assert describe(OSError(28, "No space left on device")) == (
      "OSError: [Errno 28] No space left on device")
