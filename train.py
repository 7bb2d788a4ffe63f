"""Train a diffusion model.

  python train.py                                   # the embedded default (digits), offline
  python train.py --config=configs/cifar10.py --workdir=gs://bucket/cifar10
  python train.py --config.train.batch_size=64 --config.train.num_steps=1000

Resumes from the newest checkpoint in --workdir. On a multi-host TPU pod, run the same
command on every host with --distributed.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import checkpoint
from jaxdiff.jobs import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Config file (a get_config() returning a ConfigDict).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default",
                               "Where checkpoints, metrics, TensorBoard logs and samples go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (every host of a TPU pod).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process outside TPU VMs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    summary = train.run(_CONFIG.value, _WORKDIR.value)
  except (train.TrainingError, checkpoint.CheckpointError, ValueError) as error:
    sys.exit(f"error: {error}")
  if jax.process_index() == 0:
    print(summary)


if __name__ == "__main__":
  app.run(main)
