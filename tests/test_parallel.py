"""The ('data', 'fsdp') mesh from config, the FSDP sharding rule, refusals of meshes and batches
that do not fit, sampling from a sharded state, and checkpoints across mesh shapes."""

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from jaxdiff import denoiser as denoiser_lib, generate, parallel, samplers, train_step
from jaxdiff.errors import ArgumentError
from jaxdiff.models import count_params


def mesh_config(data, fsdp):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def mesh_of(data, fsdp):
  return parallel.make_mesh(jax.devices()[:data * fsdp], mesh_config(data, fsdp))


@pytest.mark.parametrize("sizes, expected", [((-1, 1), (8, 1)), ((2, -1), (2, 4)),
                                             ((-1, 4), (2, 4)), ((1, 8), (1, 8))])
def test_mesh_sizes_come_from_the_config(sizes, expected):
  mesh = parallel.make_mesh(mesh_config=mesh_config(*sizes))
  assert mesh.axis_names == ("data", "fsdp")
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == expected
  assert list(mesh.devices.flat) == jax.devices()  # simulated CPUs: physical order = id order


def test_a_mesh_of_given_devices_is_all_data():
  mesh = parallel.make_mesh(jax.devices()[2:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1}
  assert list(mesh.devices.flat) == jax.devices()[2:4]


@pytest.mark.parametrize("sizes, problem", [
    ((3, 2), "does not fit the 8 devices"),
    ((-1, 3), "does not fit the 8 devices"),
    ((-1, -1), "expected positive sizes, at most one of them -1"),
    ((0, 8), "expected positive sizes")])
def test_meshes_that_do_not_fit_are_refused_in_one_line(sizes, problem):
  data, fsdp = sizes
  with pytest.raises(ArgumentError, match=f"^mesh = {{'data': {data}, 'fsdp': {fsdp}}}: "
                     f"{problem}") as error:
    parallel.make_mesh(mesh_config=mesh_config(*sizes))
  message = str(error.value)
  assert (error.value.name, error.value.value) == ("mesh", {"data": data, "fsdp": fsdp})
  assert "\n" not in message and "product is 8" in message


def test_batches_that_do_not_split_are_refused_in_one_line():
  mesh = parallel.make_mesh(mesh_config=mesh_config(2, 4))
  with pytest.raises(ArgumentError) as error:
    parallel.check_divisible(12, mesh)
  assert str(error.value) == (
      "batch_size = 12: the global batch must split evenly over the 8 devices: choose a "
      "multiple of 8")
  with pytest.raises(ArgumentError) as error:
    parallel.check_divisible(16, mesh, grad_accum_steps=4)
  assert str(error.value) == (
      "batch_size = 16: the global batch must split into 4 micro-batches (grad_accum_steps), "
      "each evenly over the 8 devices: choose a multiple of 32")
  parallel.check_divisible(32, mesh, grad_accum_steps=4)
  with pytest.raises(ArgumentError) as error:
    parallel.check_batch_split(16, num_devices=8, num_processes=3)
  assert str(error.value) == (
      "batch_size = 16: the global batch must split evenly over the 3 processes (hosts): "
      "choose a multiple of 3")


def test_fsdp_splits_the_largest_divisible_dimension_of_large_tensors():
  fsdp = parallel.FSDP_AXIS
  assert parallel.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, fsdp)
  assert parallel.fsdp_spec((3, 3, 128, 128), 4) == P(None, None, None, fsdp)  # ties: the last
  assert parallel.fsdp_spec((512, 10), 4) == P(fsdp, None)
  assert parallel.fsdp_spec((3, 3, 130, 30), 4) == P()        # no dimension divisible by 4
  assert parallel.fsdp_spec((64, 63), 4) == P()               # 4,032 < FSDP_MIN_SIZE elements
  assert parallel.fsdp_spec((64, 64), 4) == P(None, fsdp)     # exactly FSDP_MIN_SIZE
  assert parallel.fsdp_spec((), 4) == P()
  assert parallel.fsdp_spec((3, 3, 64, 128), 1) == P()


def test_fsdp_4_keeps_under_30_percent_of_the_state_on_each_device():
  config = default.get_config()
  per_device = {}
  for sizes in ((4, 1), (1, 4)):
    state = train_step.abstract_state(denoiser_lib.from_config(config), config.train,
                                      mesh_of(*sizes))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    per_device[sizes] = parallel.bytes_per_device(state, shardings)
  for scalar in (state.step, state.rng, state.opt_state[1][0].count):
    assert scalar.sharding.spec == P()
  # Replicated: params, EMA and Adam's two moments (4 × 4 bytes a parameter), plus the step and
  # the step counts of Adam and of the learning-rate schedule (int32) and the key (2 × uint32).
  assert per_device[(4, 1)] == 16 * count_params(state.params) + 3 * 4 + 8
  assert per_device[(1, 4)] <= 0.30 * per_device[(4, 1)], per_device


def test_sampling_from_a_sharded_state_gives_the_images_of_a_whole_one():
  config = default.get_config()
  config.model.update(ch=16, num_res_blocks=1)
  denoiser = denoiser_lib.from_config(config)
  mesh = mesh_of(1, 4)
  ema_params = train_step.create_state(denoiser, config.train, mesh, jax.random.key(0)).ema_params
  assert any(leaf.sharding.spec != P() for leaf in jax.tree.leaves(ema_params))
  options = samplers.SamplingOptions(sampler="ddim", num_steps=2, batch_size=8)
  common = dict(num_samples=8, progress=False)
  sharded = generate.generate(denoiser, ema_params, jax.random.key(1), options, mesh=mesh, **common)
  whole = generate.generate(denoiser, jax.device_get(ema_params), jax.random.key(1), options,
                            mesh=mesh_of(1, 1), **common)
  np.testing.assert_allclose(sharded["images"], whole["images"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("saved_on, restored_on", [
    ((4, 1), [(2, 2), (1, 4), (1, 1)]), ((1, 4), [(4, 1), (2, 2), (1, 1)])])
def test_restore_across_mesh_shapes(tmp_path, saved_on, restored_on):
  """A state saved on one mesh restores bit-exact, with the target's shardings, on others."""
  config = default.get_config()
  denoiser = denoiser_lib.from_config(config)
  state = train_step.create_state(denoiser, config.train, mesh_of(*saved_on), jax.random.key(0))
  expected = jax.device_get(jax.tree.map(_comparable, state))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  for sizes in restored_on:
    target = train_step.abstract_state(denoiser, config.train, mesh_of(*sizes))
    restored = checkpointer.restore(tmp_path / "state", target)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
      assert got.sharding == want.sharding
    for got, want in zip(jax.tree.leaves(jax.device_get(jax.tree.map(_comparable, restored))),
                         jax.tree.leaves(expected)):
      np.testing.assert_array_equal(got, want)


def _comparable(x):
  """Keys as their raw bits, everything else as is."""
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
