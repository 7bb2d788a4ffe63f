"""Metrics to sinks: every row the trainer and evaluate.py log goes through one `MetricWriter`
to the sinks `config.train.metric_sinks` names (SINKS).

A sink is a class taken as `Sink(directory)` with `write(step, scalars)`,
`write_image(step, name, uint8 HWC image)` and `close()`; adding one (W&B, CSV, …) is such a
class and a name in SINKS. Both sinks here work in a gs:// workdir: metrics.jsonl is rewritten
whole at each write (objects cannot be appended to), and tensorboardX uploads its whole event
file at each flush (google-cloud-storage, installed with the `gcs` extra).
"""

import json
import math
from typing import Protocol, Sequence

from jaxdiff import storage, validation
from jaxdiff.errors import ArgumentError

DEFAULT_SINKS = ("jsonl", "tensorboard")


class Sink(Protocol):
  def write(self, step: int, scalars: dict) -> None: ...
  def write_image(self, step: int, name: str, image) -> None: ...
  def close(self) -> None: ...


class JsonlSink:
  """One JSON object per row, appended to DIRECTORY/metrics.jsonl; non-finite numbers as
  strings ("nan", "inf"). Images are not written."""

  def __init__(self, directory: str):
    self.path = storage.join(directory, "metrics.jsonl")

  def write(self, step: int, scalars: dict) -> None:
    record = {"step": int(step), **{name: _json_number(value) for name, value in scalars.items()}}
    storage.append_text(self.path, json.dumps(record) + "\n")

  def write_image(self, step: int, name: str, image) -> None:
    del step, name, image

  def close(self) -> None:
    pass


class TensorBoardSink:
  """Every scalar and image to TensorBoard event files under DIRECTORY/tensorboard
  (tensorboardX, no TensorFlow)."""

  def __init__(self, directory: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(storage.join(directory, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), int(step))

  def write_image(self, step: int, name: str, image) -> None:
    self._writer.add_image(name, image, int(step), dataformats="HWC")

  def close(self) -> None:
    self._writer.close()


SINKS = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink}


def check_sinks(names) -> tuple[str, ...]:
  """`names` as a tuple of sink names (errors.ArgumentError naming 'metric_sinks')."""
  if not isinstance(names, (tuple, list)):
    raise ArgumentError("metric_sinks", names, f"expected a tuple of sink names, e.g. "
                        f"{DEFAULT_SINKS}")
  for name in names:
    validation.one_of("metric_sinks", name, SINKS, "metric sink")
  return tuple(names)


class MetricWriter:
  """Writes each row to every sink in `sinks` (names in SINKS) under `directory`. A disabled
  writer (hosts other than process 0) writes nothing. `close` is safe to call twice."""

  def __init__(self, directory: str, sinks: Sequence[str] = DEFAULT_SINKS,
               enabled: bool = True):
    self._sinks = [SINKS[name](directory) for name in check_sinks(sinks)] if enabled else []

  def write(self, step: int, scalars: dict) -> None:
    for sink in self._sinks:
      sink.write(step, scalars)

  def write_image(self, step: int, name: str, image) -> None:
    for sink in self._sinks:
      sink.write_image(step, name, image)

  def close(self) -> None:
    sinks, self._sinks = self._sinks, []
    for sink in sinks:
      sink.close()


def _json_number(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)
