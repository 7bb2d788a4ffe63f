"""Sample images from a trained workdir (or an exported EMA checkpoint).

  python sample.py --workdir=workdirs/default --num_samples=64 --output_dir=out/
  python sample.py --workdir=workdirs/default --sampler=dpm_solver --num_steps=20

Samples as the model's own config.sample says (sampler, steps, spacing, x̂0 policy, guidance);
each sampling flag given overrides it, and settings.json records what was used.

Prints the time of the first (compiling) batch and the images/s after it. Writes
OUTPUT_DIR/samples.png (a grid), samples.npz (uint8 NHWC images and labels), settings.json
(everything used, and the timing) and, with --trajectory (or --trajectory_every=K),
trajectory.png: a row per sample from static (left) to the image (right).
Needs no dataset and no TensorFlow; runs data-parallel over the local devices.
"""


from absl import app, flags, logging

from jaxdiff import generate
from jaxdiff.jobs import cli, sample

_SAMPLING = cli.SamplingFlags()
flags.adopt_module_key_flags(cli)  # --help lists the shared flags too
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, export or diffusers folder.",
                               required=True)
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None,
                                        "Which checkpoint (default: the newest good one).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "How many images.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64,
                                   "Images per compiled call (a multiple of the device count).")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same images, on 1 or N devices.")
_CLASS_LABEL = flags.DEFINE_integer("class_label", None,
                                    "Class to sample (conditional models; default: all classes "
                                    "in turn).")
_ETA = flags.DEFINE_float("eta", None, "DDIM η (0 deterministic, 1 DDPM-like; default 0).")
_TRAJECTORY = flags.DEFINE_bool("trajectory", False,
                                 "Also save the reverse process (10 frames) as trajectory.png.")
_TRAJECTORY_EVERY = flags.DEFINE_integer("trajectory_every", None,
                                         "Also save x_t every K steps as trajectory.png.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "samples", "Where the images go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
  trajectory_every = _TRAJECTORY_EVERY.value
  if trajectory_every is None and _TRAJECTORY.value:
    trajectory_every = max(1, (_SAMPLING.num_steps.value or cli.FALLBACK_NUM_STEPS) // 10)
  sampling = {**_SAMPLING.given(), "batch_size": _BATCH_SIZE.value,
              **({"eta": _ETA.value} if _ETA.value is not None else {})}
  written = sample.run(
      _WORKDIR.value, _OUTPUT_DIR.value, sampling, checkpoint_step=_CHECKPOINT_STEP.value,
      num_samples=_NUM_SAMPLES.value, seed=_SEED.value, class_label=_CLASS_LABEL.value,
      trajectory_every=trajectory_every, dtype=_SAMPLING.dtype.value)
  print(generate.timing_line(**written.timing))
  print("wrote " + ", ".join(written.paths))


if __name__ == "__main__":
  cli.run(main)
