"""Convert between diffusers folders and jaxdiff.

  python -m jaxdiff.convert --from_diffusers=ddpm-cifar10-32 --output=exports/ddpm-cifar10-32
  python -m jaxdiff.convert --from_diffusers=ddpm-cifar10-32 --output=exports/ddpm-cifar10-32 \\
      --config=configs/cifar10.py --config.data.data_dir=/data/tensorflow_datasets
  python -m jaxdiff.convert --workdir=workdirs/cifar10 --to_diffusers=pipelines/cifar10

--from_diffusers reads a DDPM or DDIM pipeline folder (model_index.json, unet/, scheduler/) or a
UNet2DModel folder and writes a jaxdiff export, which sample.py and evaluate.py read; its config
is --config (default configs/default.py: the data set, evaluation and training fields) with the
model, the diffusion, the image size and channels, and sampling as the pipeline does it taken
from the folder. --workdir (a training workdir, an export or a diffusers folder) writes its EMA
params as a diffusers pipeline that `DDPMPipeline.from_pretrained` loads. What the other side
cannot express is refused in one line naming it (exit code 2), before anything is written.
"""

from absl import app, flags, logging

from jaxdiff.jobs import cli
from jaxdiff.jobs import convert as convert_job
from jaxdiff.jobs import workdir as workdir_lib

_CONFIG = cli.define_config_file(
    workdir_lib.DEFAULT_CONFIG_FILE, "With --from_diffusers: the config whose fields the folder "
    "does not set (data set, evaluation, training) the export keeps.")
_FROM_DIFFUSERS = flags.DEFINE_string("from_diffusers", None,
                                      "A diffusers pipeline or UNet2DModel folder to read.")
_OUTPUT = flags.DEFINE_string("output", None, "With --from_diffusers: the export folder to write.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (or export) to read.")
_TO_DIFFUSERS = flags.DEFINE_string("to_diffusers", None,
                                    "With --workdir: the diffusers pipeline folder to write.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "With --workdir: which checkpoint (default: the newest "
                                        "good one).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
  given = {holder.name: holder.value for holder in (_FROM_DIFFUSERS, _OUTPUT, _WORKDIR,
                                                    _TO_DIFFUSERS, _CHECKPOINT_STEP)}
  print("wrote", convert_job.run(given, _CONFIG.value))


if __name__ == "__main__":
  cli.run(main)
