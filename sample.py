"""Sample images from a trained workdir (or an exported EMA checkpoint).

  python sample.py --workdir=workdirs/default --sampler=dpm_solver --num_steps=20 \
      --num_samples=64 --output_dir=out/

Writes OUTPUT_DIR/samples.png (a grid), samples.npz (uint8 NHWC images and labels),
settings.json (everything used) and, with --trajectory (or --trajectory_every=K),
trajectory.png: a row per sample from static (left) to the image (right).
Needs no dataset and no TensorFlow; runs data-parallel over the local devices.
"""

import sys

from absl import app, flags, logging

from jaxdiff import checkpoint
from jaxdiff.jobs import sample

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or export folder.",
                               required=True)
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "Which checkpoint (default: the newest good one).")
_SAMPLER = flags.DEFINE_string("sampler", "dpm_solver", "ddpm, ddim or dpm_solver.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 20, "Sampling steps (1 … T).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "How many images.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64,
                                   "Images per compiled call (a multiple of the device count).")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same images, on 1 or N devices.")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", 0.0,
                                     "Classifier-free guidance w (0: the plain conditional model).")
_CLASS_LABEL = flags.DEFINE_integer("class_label", None,
                                    "Class to sample (conditional models; default: all classes "
                                    "in turn).")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM η (0 deterministic, 1 DDPM-like).")
_TRAJECTORY = flags.DEFINE_bool("trajectory", False,
                                 "Also save the reverse process (10 frames) as trajectory.png.")
_TRAJECTORY_EVERY = flags.DEFINE_integer("trajectory_every", None,
                                         "Also save x_t every K steps as trajectory.png.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "samples", "Where the images go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
  try:
    written = sample.run(
        _WORKDIR.value, _OUTPUT_DIR.value, checkpoint_step=_CHECKPOINT_STEP.value,
        sampler=_SAMPLER.value, num_steps=_NUM_STEPS.value, num_samples=_NUM_SAMPLES.value,
        batch_size=_BATCH_SIZE.value, seed=_SEED.value, guidance_scale=_GUIDANCE_SCALE.value,
        class_label=_CLASS_LABEL.value, eta=_ETA.value,
        trajectory_every=_TRAJECTORY_EVERY.value or (
            max(1, _NUM_STEPS.value // 10) if _TRAJECTORY.value else None))
  except (checkpoint.CheckpointError, ValueError) as error:
    sys.exit(f"error: {error}")
  print("wrote " + ", ".join(written))


if __name__ == "__main__":
  app.run(main)
