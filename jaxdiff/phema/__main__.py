"""Make the EMA of any length after training, from a workdir's post-hoc EMA snapshots.

  python -m jaxdiff.phema --workdir=workdirs/run --sigma_rel=0.08 --output=exports/ema_0.08
  python sample.py --workdir=exports/ema_0.08

The run must have tracked the profiles (--config.train.phema_every=N). The export holds the
reconstructed EMA params and the run's config; sample.py and evaluate.py read it.
"""

from absl import app, flags, logging

from jaxdiff.jobs import cli
from jaxdiff.jobs import phema as phema_job

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with phema/ snapshots.",
                               required=True)
_SIGMA_REL = flags.DEFINE_float("sigma_rel", None, "The EMA's relative length σ_rel, e.g. 0.08.",
                                required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The new export folder.", required=True)
_STEP = flags.DEFINE_integer("step", None, "The snapshot step to make it at (default: newest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  made = phema_job.run(_WORKDIR.value, _SIGMA_REL.value, _OUTPUT.value, _STEP.value)
  print(f"σ_rel {made['sigma_rel']} at step {made['step']} from {len(made['snapshot_steps'])} "
        f"snapshots (relative fit error {made['relative_error']:.2e})")
  print("wrote", made["output"])


if __name__ == "__main__":
  cli.run(main)
