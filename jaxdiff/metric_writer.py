"""Scalars to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow).

Both work in a gs:// workdir: metrics.jsonl is rewritten whole at each `write` (objects cannot be
appended to), and tensorboardX uploads its whole event file at each flush (google-cloud-storage,
installed with the `gcs` extra).
"""

import json
import math

from tensorboardX import SummaryWriter

from jaxdiff import storage


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors every scalar
  to TensorBoard under WORKDIR/tensorboard. Disabled writers (hosts other than process 0)
  write nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._jsonl_path = storage.join(workdir, "metrics.jsonl")
      self._tensorboard = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _json_number(v) for k, v in scalars.items()})
    storage.append_text(self._jsonl_path, json.dumps(record) + "\n")
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def write_image(self, step: int, name: str, image) -> None:
    """An HWC uint8 image to TensorBoard."""
    if self.enabled:
      self._tensorboard.add_image(name, image, int(step), dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()


def _json_number(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)
