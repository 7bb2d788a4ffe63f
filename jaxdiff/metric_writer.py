"""Scalars to `metrics.jsonl` and TensorBoard event files (tensorboardX, no TensorFlow)."""

import json
import math
import os

from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors every scalar
  to TensorBoard under WORKDIR/tensorboard. Disabled writers (hosts other than process 0)
  write nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _json_number(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def write_image(self, step: int, name: str, image) -> None:
    """An HWC uint8 image to TensorBoard."""
    if self.enabled:
      self._tensorboard.add_image(name, image, int(step), dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _json_number(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)
