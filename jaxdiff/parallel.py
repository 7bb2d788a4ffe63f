"""The device mesh and shardings: a 2-D mesh ('data', 'fsdp') over every device of every host.

The batch is split over both axes (every device gets its own rows). The train state is split over
`fsdp` only (fully sharded data parallelism): each device keeps 1/fsdp of every large parameter,
EMA parameter and optimizer moment, and XLA gathers what a layer needs when it needs it. With
fsdp = 1 (the default) this is plain data parallelism with a replicated state.
"""

import math
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.errors import ArgumentError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch's leading axis is split over both
# Tensors with fewer elements stay replicated under FSDP: biases and norm scales (≤ a few
# thousand floats) cost more in gather latency than the memory their shards would save.
FSDP_MIN_SIZE = 2**12


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) from `config.mesh` (one of them may be −1: the remaining devices);
  ArgumentError (name "mesh", value {'data': …, 'fsdp': …}) unless they multiply to
  `num_devices`."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  sizes = {"data": data, "fsdp": fsdp}
  fix = (f"choose sizes whose product is {num_devices} (one of them may be -1: the remaining "
         f"devices)")
  if data == -1 and fsdp == -1 or min(data, fsdp) < -1 or 0 in (data, fsdp):
    raise ArgumentError("mesh", sizes, f"expected positive sizes, at most one of them -1; {fix}")
  if data == -1 and num_devices % fsdp == 0:
    data = num_devices // fsdp
  elif fsdp == -1 and num_devices % data == 0:
    fsdp = num_devices // data
  if data * fsdp != num_devices:
    raise ArgumentError("mesh", sizes, f"does not fit the {num_devices} devices; {fix}")
  return data, fsdp


def make_mesh(devices: Sequence[jax.Device] | None = None,
              mesh_config: ml_collections.ConfigDict | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all hosts) with the sizes
  of `mesh_config` (default: data = every device, fsdp = 1).

  The devices are laid out in their physical order (`mesh_utils.create_device_mesh`), so that
  neighbours on the `fsdp` axis, which exchange parameter shards every layer, are neighbours on
  the chips' interconnect (ICI). On several TPU slices (multi-slice), `data` spans the slices:
  each slice holds whole fsdp groups, and only the gradient all-reduce crosses the slower
  data-centre network (DCN) (`mesh_utils.create_hybrid_device_mesh` with DCN shape
  (slices, 1)); `data` must then be a multiple of the number of slices.
  """
  devices = jax.devices() if devices is None else list(devices)
  data, fsdp = mesh_shape(mesh_config or ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                          len(devices))
  num_slices = len({getattr(device, "slice_index", 0) for device in devices})
  if num_slices > 1:
    if data % num_slices:
      raise ArgumentError("mesh", {"data": data, "fsdp": fsdp},
                          f"data is not a multiple of the {num_slices} slices, which the data "
                          f"axis spans; choose a multiple of {num_slices}")
    device_grid = mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp), (num_slices, 1), devices)
  else:
    device_grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  return Mesh(device_grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device ('data' and 'fsdp'), the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """K stacked batches [K, B, ...]: K whole, the batch axis split as in `batch_sharding`."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Where a state tensor of `shape` is split over 'fsdp': along its largest dimension divisible
  by `fsdp_size` (the last such, on ties); whole if it has fewer than FSDP_MIN_SIZE elements or
  no such dimension."""
  if fsdp_size == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  divisible = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda axis: (shape[axis], axis))
  return P(*[FSDP_AXIS if a == axis else None for a in range(len(shape))])


def state_shardings(abstract_state, mesh: Mesh):
  """The sharding of every leaf of the train state (or any part of it, such as the EMA params)
  over `mesh`: the one place that decides it. Init, restore, the train step and sampling all use
  it. Params, EMA params and optimizer moments are split over 'fsdp' (`fsdp_spec`); scalars
  (step, RNG key, Adam's count) and small tensors are replicated."""
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)),
                      abstract_state)


def split_loss_fn(loss_fn: Callable, mesh: Mesh) -> Callable:
  """`loss_fn(params, batch, draws, key)` computed with whole parameters on a batch (and its
  per-example draws) split over every device. Under FSDP every device all-gathers the
  parameter shards it lacks before the forward pass, and the gradients are reduce-scattered
  back onto the shards, so activations stay split by batch (no layer is split by channel); the
  batch's constraint also holds each micro-batch of gradient accumulation in place. With
  fsdp = 1 and a whole batch, nothing moves."""

  def split(params, batch, draws, key):
    params = jax.lax.with_sharding_constraint(params, replicated(mesh))
    batch, draws = jax.lax.with_sharding_constraint((batch, draws), batch_sharding(mesh))
    return loss_fn(params, batch, draws, key)

  return split


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes that the largest share of `abstract_tree` laid out with `shardings` takes on one
  device (every device holds the same amount when dimensions divide evenly)."""
  return sum(math.prod(sharding.shard_shape(np.shape(x))) * x.dtype.itemsize
             for x, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def global_batch(local_batch, mesh: Mesh, stacked: bool = False):
  """Host-local numpy batch (this host's rows) -> one global array split over the mesh
  (`batch_sharding`, or `stacked_batch_sharding` for [K, B/P, ...] stacks of K batches).

  The global batch is the concatenation of every host's local batch, in process order.
  """
  sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_batch_split(batch_size: int, num_devices: int, num_processes: int,
                      grad_accum_steps: int = 1) -> None:
  """ArgumentError (name "batch_size") unless the global batch splits evenly over the devices,
  each of the `grad_accum_steps` micro-batches too, and over the processes (hosts)."""
  multiple = num_devices * grad_accum_steps
  if batch_size % multiple:
    split = (f"into {grad_accum_steps} micro-batches (grad_accum_steps), each evenly over"
             if grad_accum_steps > 1 else "evenly over")
    raise ArgumentError("batch_size", batch_size, f"the global batch must split {split} the "
                        f"{num_devices} devices: choose a multiple of {multiple}")
  if batch_size % num_processes:
    raise ArgumentError("batch_size", batch_size, f"the global batch must split evenly over "
                        f"the {num_processes} processes (hosts): choose a multiple of "
                        f"{num_processes}")


def check_divisible(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """`check_batch_split` for the devices of `mesh` and this job's processes."""
  check_batch_split(batch_size, mesh.devices.size, jax.process_count(), grad_accum_steps)
