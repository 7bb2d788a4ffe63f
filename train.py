"""Train a diffusion model.

  python train.py                                   # the embedded default (digits), offline
  python train.py --config=configs/cifar10.py --workdir=gs://bucket/cifar10
  python train.py --config.train.batch_size=64 --config.train.num_steps=1000

Resumes from the newest checkpoint in --workdir. On a multi-host TPU pod, run the same
command on every host: where a TPU is attached, jax.distributed starts by itself (JAX finds the
other hosts); GPU clusters pass --coordinator_address, --num_processes and --process_id.
"""

import glob

import jax
from absl import app, flags, logging

from jaxdiff.jobs import cli, train

_CONFIG = cli.define_config_file("configs/default.py",
                                 "Config file (a get_config() returning a ConfigDict).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default",
                               "Where checkpoints, metrics, TensorBoard logs and samples go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: where a TPU is attached; "
    "JAX then finds the pod's hosts itself).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process outside TPU VMs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def tpu_attached() -> bool:
  """Whether this machine has TPU chips (Cloud TPU VMs expose them as /dev/accel* or vfio)."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
  distributed = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else tpu_attached()
  if distributed or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  summary = train.run(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(summary)


if __name__ == "__main__":
  cli.run(main)
