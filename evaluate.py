"""Look at a trained model.

  python evaluate.py --workdir=workdirs/default --metric=panel --output=panel.png

panel: held-out images noised to t = 50 … 950, the true and the predicted noise, and the image
recovered in one step from the prediction.
"""

import sys

from absl import app, flags, logging

from jaxdiff import checkpoint
from jaxdiff.evaluation import panels

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_METRIC = flags.DEFINE_enum("metric", "panel", ["panel"], "What to compute.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Default: the newest.")
_OUTPUT = flags.DEFINE_string("output", "panel.png", "Where the result goes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    print("wrote", panels.write_panel(_WORKDIR.value, _OUTPUT.value, _CHECKPOINT_STEP.value))
  except (checkpoint.CheckpointError, ValueError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
