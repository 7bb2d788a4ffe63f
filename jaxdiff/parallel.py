"""Data parallelism: one 1-D mesh axis `data` over every device of every host."""

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device."""
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh):
  """The sharding of every leaf of the train state (or any part of it, such as the EMA params)
  over `mesh`: the one place that decides it. Init, restore, the train step and sampling all use
  it. Today every leaf is replicated."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch (this host's rows) -> one global array sharded over `data`.

  The global batch is the concatenation of every host's local batch, in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """Raise a clear error unless the global batch splits evenly over the devices and hosts."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the {num_devices} devices "
        f"of the mesh; choose a multiple of {num_devices} (--config.train.batch_size=...)")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"{jax.process_count()} hosts")
