"""Metrics to sinks: every row the trainer and evaluate.py log goes through one `MetricWriter`
to the sinks `config.train.metric_sinks` names (SINKS).

A sink is a class taken as `Sink(directory)` with `write(step, scalars)`,
`write_image(step, name, uint8 HWC image)` and `close()`; adding one (W&B, CSV, …) is such a
class and a name in SINKS. Both sinks here work in a gs:// workdir: metrics.jsonl is rewritten
whole at each write (objects cannot be appended to), and tensorboardX uploads its whole event
file at each flush (google-cloud-storage, installed with the `gcs` extra).

A sink that cannot write or close (a full disk, unreachable storage) is a MetricsError, said in
one line; `close` closes every sink whatever the others raise, and leaves nothing to retry at
the interpreter's exit.
"""

import json
import math
from typing import Callable, Protocol, Sequence

from jaxdiff import errors, storage, validation
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
    """Flush (upload) the events and stop tensorboardX's writers, so that nothing is written
    after this: tensorboardX marks a writer closed only once its last flush succeeded, so its
    atexit hook would flush a failed one again (a traceback at exit), and a gs:// event file is
    uploaded again when collected (retried for 120 s where storage is unreachable)."""
    file_writers = list((self._writer.all_writers or {}).values())
    try:
      self._writer.close()
    finally:
      for file_writer in file_writers:
        _stop_event_writer(file_writer.event_writer)


def _stop_event_writer(event_writer) -> None:
  """Mark a tensorboardX (2.6) EventFileWriter closed, its thread stopped, and its gs:// record
  writer's upload at collection disabled."""
  # pylint: disable=protected-access  (no public way: see TensorBoardSink.close)
  if not event_writer._closed:
    event_writer._worker.stop()
    event_writer._closed = True
  record_writer = event_writer._ev_writer._py_recordio_writer._writer
  if type(record_writer).__name__ == "GCSRecordWriter":
    record_writer.close = lambda: None


SINKS = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink}


def check_sinks(names) -> tuple[str, ...]:
  """`names` as a tuple of sink names (errors.ArgumentError naming 'metric_sinks')."""
  if not isinstance(names, (tuple, list)):
    raise ArgumentError("metric_sinks", names, f"expected a tuple of sink names, e.g. "
                        f"{DEFAULT_SINKS}")
  for name in names:
    validation.one_of("metric_sinks", name, SINKS, "metric sink")
  return tuple(names)


class MetricsError(errors.JobError):
  """A metric sink could not write or close; the message says where and why."""


class MetricWriter:
  """Writes each row to every sink in `sinks` (names in SINKS) under `directory`. A disabled
  writer (hosts other than process 0) writes nothing. `close` is safe to call twice."""

  def __init__(self, directory: str, sinks: Sequence[str] = DEFAULT_SINKS,
               enabled: bool = True):
    self.directory = storage.resolve(directory)
    self._sinks = [SINKS[name](directory) for name in check_sinks(sinks)] if enabled else []

  def write(self, step: int, scalars: dict) -> None:
    _each_sink(self._sinks, f"write the metrics in {self.directory}",
               lambda sink: sink.write(step, scalars))

  def write_image(self, step: int, name: str, image) -> None:
    _each_sink(self._sinks, f"write the metrics in {self.directory}",
               lambda sink: sink.write_image(step, name, image))

  def close(self) -> None:
    """Close every sink, whatever the others raise (the first failure is raised after)."""
    sinks, self._sinks = self._sinks, []
    _each_sink(sinks, f"close the metrics in {self.directory}", lambda sink: sink.close())


def _each_sink(sinks: Sequence[Sink], what: str, action: Callable[[Sink], None]) -> None:
  """`action(sink)` for every sink, whatever the others raise; then MetricsError for the first
  that failed."""
  failures = []
  for sink in sinks:
    try:
      action(sink)
    except Exception as error:  # pylint: disable=broad-exception-caught  (OSError, GCS errors)
      failures.append(error)
  if failures:
    raise MetricsError(f"could not {what} ({type(failures[0]).__name__}: "
                       f"{errors.one_line(failures[0], 300)})") from failures[0]


def _json_number(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)
